"""``pmmrec-train``: pre-train PMMRec (or the SASRec ID baseline) with Accelerate."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..training import TrainingConfig, make_accelerator, popularity_metrics, save_pmmrec_outputs, train
from ._common import new_parser, show_defaults, print_saved, run_cli, set_option
from .arguments import (
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
from .environment import ensure_hub_access, hub_repo_ids, set_torch_threads
from .run_config import add_config_argument, parse_args_with_config, save_run_config

PROG = "pmmrec-train"
DEFAULTS = TrainingConfig(output_dir=None, batch_size=32, learning_rate=1e-3, max_steps=200,
                          eval_steps=50, save_steps=0, logging_steps=5)
WEIGHTS = {"next_item": 0.6, "nicl": 0.4, "nid": 0.1, "rcl": 0.1}

DESCRIPTION = """\
Pre-train PMMRec (or the ID-based SASRec baseline) on one or several prepared datasets.

Without arguments it trains on the built-in synthetic dataset with tiny built-in backbones (a minute or two on
a CPU) and writes outputs/pretrain/pmmrec/: model/ (the full model), item_encoder/ and user_encoder/ (each
loadable with from_pretrained), eval_history.json, trainer_state.json, run_config.json.
Options can come from a YAML/JSON file (--config run.yaml, keys spelled like the flags); flags override it."""

EPILOG = """\
examples:
  pmmrec-train                                                   # synthetic data, CPU
  pmmrec-train --model-type sasrec                               # the SASRec baseline -> outputs/pretrain/sasrec
  pmmrec-train --config run.yaml --learning-rate 1e-4            # a run-config file, one option overridden
  pmmrec-train --dataset data/ml-100k --text-model sentence-transformers/all-MiniLM-L6-v2 --save-steps 500
  pmmrec-train --dataset data/ml-1m data/beauty --mixture-sampling temperature   # several platforms
  accelerate launch --multi_gpu --num_processes 2 -m pmmrec_hf.commands.train ...  # 2 GPUs (or 2 CPU processes)
  pmmrec-train --resume-from-checkpoint latest --save-steps 500 ...   # continue a killed run"""


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--config and --num-threads (every training / evaluation command)."""
    group = parser.add_argument_group("run")
    add_config_argument(group)
    group.add_argument("--num-threads", type=int, default=None,
                       help="torch CPU threads per process (default: physical cores / processes on this node, capped "
                            "by the idle cores; OMP_NUM_THREADS when set)")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_run_args(parser)
    add_data_args(parser)
    add_model_args(parser)
    add_objective_args(parser, WEIGHTS)
    add_training_args(parser, DEFAULTS)
    set_option(parser, "output_dir", help="output folder (default: outputs/pretrain/<model-type>)")
    return show_defaults(parser)


def parse_args(argv=None) -> argparse.Namespace:
    args = parse_args_with_config(build_parser(), argv)
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", "pretrain", args.model_type)
    return args


def main(argv=None) -> dict:
    from accelerate.utils import set_seed

    args = parse_args(argv)
    run_args = argparse.Namespace(**vars(args))  # as parsed
    datasets = [args.dataset] if isinstance(args.dataset, str) else list(args.dataset)
    ensure_hub_access(hub_repo_ids(args.text_model, args.vision_model), PROG)
    ensure_hub_access(hub_repo_ids(*datasets), PROG, repo_type="dataset")
    config = training_config_from_args(args)
    corrupt = args.model_type == "pmmrec" and (args.nid_weight > 0 or args.rcl_weight > 0)
    config.replace_prob = args.replace_prob if corrupt else 0.0
    config.shuffle_prob = args.shuffle_prob if corrupt else 0.0
    accelerator = make_accelerator(config)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_torch_threads(args.num_threads, print_fn=accelerator.print)
    set_seed(args.seed)
    data = load_data(args, accelerator.process_index, accelerator.num_processes)
    tokenizer, image_processor = load_tokenizer_and_processor(args)
    model = build_model(args, tokenizer, num_items=len(data.train_counts))
    collator = build_collator(model, data.items, tokenizer, image_processor, args.max_length)
    popular = None
    if accelerator.is_main_process:
        popular = popularity_metrics(data.train_counts, data.eval_rows, collator.items,
                                     repeated_targets=args.repeated_targets)
        accelerator.print(f"most-popular baseline on {args.eval_split}: hr@10 {popular['hr@10']:.4f}, "
                          f"ndcg@10 {popular['ndcg@10']:.4f}")
    saved: dict[str, str] = {}

    def save(unwrapped, output_dir):
        saved.update(save_pmmrec_outputs(unwrapped, output_dir, tokenizer, image_processor))

    summary = train(model, data.train, collator, config, eval_rows=data.eval_rows, accelerator=accelerator,
                    save_fn=save, batch_sampler=data.batch_sampler(args, accelerator.num_processes))
    if accelerator.is_main_process and not summary["stopped"]:
        summary["popularity"] = popular
        accelerator.print(json.dumps({"final": summary["eval_history"][-1] if summary["eval_history"] else None,
                                      "most_popular": popular}, indent=1))
        saved["run config"] = str(save_run_config(run_args, args.output_dir))
        saved["metrics"] = os.path.join(args.output_dir, "eval_history.json")
        print_saved(accelerator.print, _describe(saved))
    summary["saved"] = saved
    return summary


def _describe(saved: dict[str, str]) -> dict[str, str]:
    names = {"model": "full model", "item_encoder": "item encoder", "user_encoder": "user encoder"}
    return {names.get(k, k): v for k, v in saved.items()}


def cli(argv=None) -> int:
    return run_cli(PROG, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
