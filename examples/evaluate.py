#!/usr/bin/env python
"""Evaluate a checkpoint by full ranking over all items (HR / NDCG / MRR at 10, 20, 50).

    python examples/evaluate.py --model outputs/pretrain/model --split test
    python examples/evaluate.py --model outputs/pretrain/model --dataset data/hm --split validation --output m.json
    accelerate launch --num_processes 2 examples/evaluate.py --model ...   # catalogue and users split over processes

Under N processes each process embeds its share of the catalogue and ranks its share of the users; the metrics
equal the single-process metrics exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# this file is named like the Hugging Face `evaluate` package: keep its folder off the import path so that
# `import evaluate` anywhere in the process finds the package, not this script
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

import torch  # noqa: E402

from pmmrec_hf.data.synthetic import synthetic_tokenizer  # noqa: E402
from pmmrec_hf.metrics import DEFAULT_KS  # noqa: E402
from pmmrec_hf.pipeline import SYNTHETIC, build_collator, load_data  # noqa: E402
from pmmrec_hf.training import TrainingConfig, evaluate_model, make_accelerator, popularity_metrics  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved PMMRecModel / SASRecModel: folder or Hub id")
    parser.add_argument("--dataset", default=SYNTHETIC)
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)))
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch")
    parser.add_argument("--catalogue-batch-size", type=int, default=256, help="items per batch")
    parser.add_argument("--max-eval-users", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--synthetic-users", type=int, default=2000)
    parser.add_argument("--synthetic-items", type=int, default=500)
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument("--repeated-targets", default="rank", choices=["rank", "miss"],
                        help="a target already in the user's history: ranked (default) or a miss (the research code)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.eval_split, args.streaming = args.split, False
    return args


def main(argv=None) -> dict:
    from transformers import AutoModel, AutoTokenizer

    import pmmrec_hf  # noqa: F401  (registers the model types)

    args = parse_args(argv)
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # started by a launcher: split the work over processes
        accelerator = make_accelerator(TrainingConfig(report_to="none", mixed_precision="no"))
        args.device = accelerator.device
    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    item_config = getattr(model.config, "item_encoder_config", None)
    tokenizer = None
    if item_config is not None and item_config.modality != "vision":
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            tokenizer = synthetic_tokenizer()
    args.max_length = model.config.user_encoder_config.max_position_embeddings
    data = load_data(args)
    collator = build_collator(model, data.items, tokenizer, None, args.max_length)
    ks = tuple(int(k) for k in args.ks.split(","))
    metrics = evaluate_model(model, collator, data.eval_rows, ks=ks, batch_size=args.batch_size,
                             catalogue_batch_size=args.catalogue_batch_size, accelerator=accelerator,
                             repeated_targets=args.repeated_targets)
    result = {"model": args.model, "dataset": args.dataset, "split": args.split, "metrics": metrics,
              "repeated_targets": args.repeated_targets,
              "most_popular": popularity_metrics(data.train_counts, data.eval_rows, collator.items, ks=ks,
                                                 repeated_targets=args.repeated_targets),
              "num_processes": accelerator.num_processes if accelerator is not None else 1}
    if accelerator is not None and not accelerator.is_main_process:
        return result
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
