#!/usr/bin/env python
"""Pre-train PMMRec (or the SASRec ID baseline) with Accelerate.

    python examples/pretrain.py                      # built-in synthetic dataset, a minute or two on a CPU
    accelerate launch examples/pretrain.py --dataset data/ml-100k --text-model ... --vision-model ...
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py   # 2 GPUs, or 2 CPU processes without GPUs
    python examples/pretrain.py --dataset data/ml-1m data/beauty --mixture-sampling temperature   # several platforms

Writes <output-dir>/model (full model), <output-dir>/item_encoder and <output-dir>/user_encoder
(each loadable with from_pretrained), checkpoints under <output-dir>/checkpoints, TensorBoard logs.
"""

from __future__ import annotations

import argparse
import json
import logging

from pmmrec_hf.pipeline import (
    add_data_args,
    add_model_args,
    add_objective_args,
    add_training_args,
    build_collator,
    build_model,
    load_data,
    load_tokenizer_and_processor,
    training_config_from_args,
)
from pmmrec_hf.training import TrainingConfig, make_accelerator, popularity_metrics, save_pmmrec_outputs, train

DEFAULTS = TrainingConfig(output_dir="outputs/pretrain", batch_size=32, learning_rate=1e-3, max_steps=200,
                          eval_steps=50, save_steps=0, logging_steps=5)
WEIGHTS = {"next_item": 0.6, "nicl": 0.4, "nid": 0.1, "rcl": 0.1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser)
    add_objective_args(parser, WEIGHTS)
    add_training_args(parser, DEFAULTS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from accelerate.utils import set_seed

    args = parse_args(argv)
    config = training_config_from_args(args)
    corrupt = args.model_type == "pmmrec" and (args.nid_weight > 0 or args.rcl_weight > 0)
    config.replace_prob = args.replace_prob if corrupt else 0.0
    config.shuffle_prob = args.shuffle_prob if corrupt else 0.0
    accelerator = make_accelerator(config)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    data = load_data(args, accelerator.process_index, accelerator.num_processes)
    tokenizer, image_processor = load_tokenizer_and_processor(args)
    model = build_model(args, tokenizer, num_items=len(data.train_counts))
    collator = build_collator(model, data.items, tokenizer, image_processor, args.max_length)
    if accelerator.is_main_process:
        popular = popularity_metrics(data.train_counts, data.eval_rows, collator.items,
                                     repeated_targets=args.repeated_targets)
        accelerator.print(f"most-popular baseline on {args.eval_split}: hr@10 {popular['hr@10']:.4f}, "
                          f"ndcg@10 {popular['ndcg@10']:.4f}")
    summary = train(
        model, data.train, collator, config, eval_rows=data.eval_rows, accelerator=accelerator,
        save_fn=lambda m, out: save_pmmrec_outputs(m, out, tokenizer, image_processor),
        batch_sampler=data.batch_sampler(args, accelerator.num_processes),
    )
    if accelerator.is_main_process and not summary["stopped"]:
        summary["popularity"] = popular
        accelerator.print(json.dumps({"final": summary["eval_history"][-1] if summary["eval_history"] else None,
                                      "most_popular": popular}, indent=1))
    return summary


if __name__ == "__main__":
    main()
