"""``pmmrec-evaluate``: evaluate a checkpoint by full ranking over all items (HR / NDCG / MRR at 10, 20, 50)."""

from __future__ import annotations

import argparse
import json
import os

from ..metrics import DEFAULT_KS
from ..training import TrainingConfig, evaluate_model, make_accelerator, popularity_metrics
from ._common import new_parser, show_defaults, print_saved, run_cli
from .arguments import SYNTHETIC, build_collator, load_data
from .environment import ensure_hub_access, hub_repo_ids, set_torch_threads
from .run_config import parse_args_with_config
from .train import add_run_args

PROG = "pmmrec-evaluate"

DESCRIPTION = """\
Evaluate a saved PMMRecModel / SASRecModel by full ranking over the dataset's whole catalogue, with the most-popular
baseline beside it. Under N processes (a launcher) each process embeds its share of the catalogue and ranks its
share of the users; the metrics equal the single-process metrics exactly. A model evaluated on a dataset it never
trained on is zero-shot transfer. Options can come from a YAML/JSON file (--config); flags override it."""

EPILOG = """\
examples:
  pmmrec-evaluate --model outputs/pretrain/pmmrec/model --split test
  pmmrec-evaluate --model outputs/finetune/full/model --dataset data/hm --output metrics.json
  accelerate launch --multi_gpu --num_processes 2 -m pmmrec_hf.commands.evaluate --model ...   # 2 processes"""


def build_parser() -> argparse.ArgumentParser:
    import torch

    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_run_args(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--model", required=True, help="a saved PMMRecModel / SASRecModel: folder or Hub id")
    group.add_argument("--dataset", default=SYNTHETIC, help="'synthetic', a prepared folder or a Hub dataset id")
    group.add_argument("--split", default="test", choices=["validation", "test"])
    group.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="cut-offs, comma-separated")
    group.add_argument("--batch-size", type=int, default=256, help="users per batch")
    group.add_argument("--catalogue-batch-size", type=int, default=256, help="items per batch")
    group.add_argument("--max-eval-users", type=int, default=None)
    group.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    group.add_argument("--synthetic-users", type=int, default=2000)
    group.add_argument("--synthetic-items", type=int, default=500)
    group.add_argument("--output", default=None, help="write the metrics as JSON here")
    group.add_argument("--repeated-targets", default="rank", choices=["rank", "miss"],
                       help="a target already in the user's history: ranked (default) or a miss (the research code)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return show_defaults(parser)


def parse_args(argv=None) -> argparse.Namespace:
    args = parse_args_with_config(build_parser(), argv)
    args.eval_split, args.streaming = args.split, False
    return args


def main(argv=None) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from ..data.synthetic import synthetic_tokenizer

    args = parse_args(argv)
    ensure_hub_access(hub_repo_ids(args.model), PROG)
    ensure_hub_access(hub_repo_ids(args.dataset), PROG, repo_type="dataset")
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # started by a launcher: split the work over processes
        accelerator = make_accelerator(TrainingConfig(report_to="none", mixed_precision="no"))
        args.device = accelerator.device
    is_main = accelerator is None or accelerator.is_main_process
    set_torch_threads(args.num_threads, print_fn=print if is_main else (lambda *_: None))
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
    if not is_main:
        return result
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print_saved(print, {"metrics": args.output})
    else:
        print("(metrics printed only; --output FILE saves them)")
    return result


def cli(argv=None) -> int:
    return run_cli(PROG, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
