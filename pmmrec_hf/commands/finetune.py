"""``pmmrec-finetune``: transfer a pre-trained PMMRec to a target dataset, in every setting the paper has."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..training import TrainingConfig, make_accelerator, popularity_metrics, save_pmmrec_outputs, train
from ..transfer import TRANSFER_SETTINGS, apply_lora, load_for_transfer, save_lora_adapter
from ._common import new_parser, show_defaults, print_saved, run_cli, set_option
from .arguments import (
    add_data_args,
    add_objective_args,
    add_training_args,
    build_collator,
    load_data,
    load_tokenizer_and_processor,
    scoring_overrides,
    training_config_from_args,
)
from .environment import ensure_hub_access, hub_repo_ids, set_torch_threads
from .run_config import parse_args_with_config, save_run_config
from .train import _describe, add_run_args

PROG = "pmmrec-finetune"
DEFAULTS = TrainingConfig(output_dir=None, batch_size=32, learning_rate=1e-3, max_steps=100,
                          eval_steps=50, logging_steps=5)
WEIGHTS = {"next_item": 1.0, "nicl": 0.0, "nid": 0.0, "rcl": 0.0}

DESCRIPTION = """\
Fine-tune a pre-trained PMMRec on a target dataset (next-item objective only by default).

Settings: full (everything transferred), item_encoder (user encoder re-initialised), user_encoder (towers from
their original backbone weights), text / vision (one tower + the user encoder), scratch (the control: no
recommendation pre-training). With --lora only LoRA adapters train; the adapter is saved on its own
(<output-dir>/adapter) and merged into <output-dir>/model. Writes outputs/finetune/<setting>[-lora]/ by default.
Options can come from a YAML/JSON file (--config run.yaml); flags override it."""

EPILOG = """\
examples:
  pmmrec-finetune --pretrained outputs/pretrain/pmmrec/model --setting full
  pmmrec-finetune --pretrained outputs/pretrain/pmmrec/model --lora          # -> outputs/finetune/full-lora
  pmmrec-finetune --item-encoder me/pmmrec-item-encoder --setting item_encoder --dataset data/hm
  pmmrec-finetune --setting scratch --text-model sentence-transformers/all-MiniLM-L6-v2 --dataset data/hm
  pmmrec-finetune --config finetune.yaml --max-steps 500                    # a run-config file, one option overridden"""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_run_args(parser)
    group = parser.add_argument_group("transfer")
    group.add_argument("--setting", default="full", choices=TRANSFER_SETTINGS)
    group.add_argument("--pretrained", default=None, help="pre-trained full model: folder or Hub id")
    group.add_argument("--item-encoder", default=None, help="a separately published item encoder")
    group.add_argument("--user-encoder", default=None, help="a separately published user encoder")
    group.add_argument("--text-model", default=None,
                       help="original text backbone (user_encoder / scratch settings re-start the towers from it)")
    group.add_argument("--vision-model", default=None, help="original vision backbone")
    group.add_argument("--random-towers", action="store_true",
                       help="user_encoder / scratch without --text-model / --vision-model: start the towers from "
                            "random weights (refused otherwise)")
    group.add_argument("--tokenizer", default=None, help="tokenizer folder/id (default: the pre-trained model's)")
    group.add_argument("--lora", action="store_true", help="train LoRA adapters only (towers, fusion, user encoder)")
    group.add_argument("--lora-r", type=int, default=8)
    group.add_argument("--lora-alpha", type=int, default=16)
    group.add_argument("--lora-dropout", type=float, default=0.05)
    add_data_args(parser)
    add_objective_args(parser, WEIGHTS)
    add_training_args(parser, DEFAULTS)
    set_option(parser, "output_dir", help="output folder (default: outputs/finetune/<setting>, +'-lora' with --lora)")
    return show_defaults(parser)


def setting_name(args: argparse.Namespace) -> str:
    """The setting as reported: 'full', or 'full+lora' when only LoRA adapters train."""
    return f"{args.setting}+lora" if args.lora else args.setting


def parse_args(argv=None) -> argparse.Namespace:
    args = parse_args_with_config(build_parser(), argv)
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", "finetune", args.setting + ("-lora" if args.lora else ""))
    args.max_length = None  # taken from the model
    args.research_image_transform = True
    return args


def main(argv=None) -> dict:
    from accelerate.utils import set_seed

    args = parse_args(argv)
    run_args = argparse.Namespace(**vars(args))  # as parsed, before the model fills some in
    ensure_hub_access(hub_repo_ids(args.pretrained, args.item_encoder, args.user_encoder, args.text_model,
                                   args.vision_model, args.tokenizer), PROG)
    datasets = [args.dataset] if isinstance(args.dataset, str) else list(args.dataset)
    ensure_hub_access(hub_repo_ids(*datasets), PROG, repo_type="dataset")
    config = training_config_from_args(args)
    accelerator = make_accelerator(config)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_torch_threads(args.num_threads, print_fn=accelerator.print)
    set_seed(args.seed)
    objective = dict(next_item_weight=args.next_item_weight, nicl_weight=args.nicl_weight,
                     nid_weight=args.nid_weight, rcl_weight=args.rcl_weight, nicl_temperature=args.nicl_temperature,
                     rcl_temperature=args.rcl_temperature, logq_correction=not args.no_logq,
                     replace_prob=args.replace_prob, shuffle_prob=args.shuffle_prob,
                     **scoring_overrides(args, new_model=False))
    model = load_for_transfer(
        args.setting, args.pretrained, item_encoder=args.item_encoder, user_encoder=args.user_encoder,
        text_model=args.text_model, vision_model=args.vision_model, seed=args.seed,
        random_towers=args.random_towers, **objective,
    )
    args.max_length = model.config.user_encoder_config.max_position_embeddings
    args.modality = model.config.item_encoder_config.modality
    source = args.tokenizer or args.pretrained or args.item_encoder or args.text_model
    if args.modality != "vision" and source is None:
        from ..data.synthetic import synthetic_tokenizer

        tokenizer = synthetic_tokenizer()
    else:
        args.text_model = source if args.modality != "vision" else None
        tokenizer, _ = load_tokenizer_and_processor(args)
    corrupt = args.nid_weight > 0 or args.rcl_weight > 0
    config.replace_prob = args.replace_prob if corrupt else 0.0
    config.shuffle_prob = args.shuffle_prob if corrupt else 0.0
    data = load_data(args, accelerator.process_index, accelerator.num_processes)
    collator = build_collator(model, data.items, tokenizer, None, args.max_length)
    train_model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora else model
    setting = setting_name(args)
    saved: dict[str, str] = {}

    def save(unwrapped, output_dir):
        if args.lora:
            # adapter weights only, naming the pre-trained model they adapt (not this machine's path of it when
            # --pretrained is a Hub id) so that PeftModel / AutoPeftModel users load it as published
            save_lora_adapter(unwrapped, f"{output_dir}/adapter", args.pretrained)
            saved["adapter"] = f"{output_dir}/adapter"
            unwrapped = unwrapped.merge_and_unload()
        saved.update(save_pmmrec_outputs(unwrapped, output_dir, tokenizer))

    if accelerator.is_main_process:
        popular = popularity_metrics(data.train_counts, data.eval_rows, collator.items,
                                     repeated_targets=args.repeated_targets)
        accelerator.print(f"setting {setting}; most-popular hr@10 {popular['hr@10']:.4f}")
    summary = train(train_model, data.train, collator, config, eval_rows=data.eval_rows, accelerator=accelerator,
                    save_fn=save, batch_sampler=data.batch_sampler(args, accelerator.num_processes))
    summary["setting"] = setting
    if accelerator.is_main_process and not summary["stopped"]:
        report = {"setting": setting, "final": summary["eval_history"][-1] if summary["eval_history"] else None}
        if args.lora:
            report["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
        accelerator.print(json.dumps(report, indent=1))
        saved["run config"] = str(save_run_config(run_args, args.output_dir))
        saved["metrics"] = os.path.join(args.output_dir, "eval_history.json")
        if "adapter" in saved:
            saved["adapter"] += " (LoRA adapter; model/ holds it merged)"
        print_saved(accelerator.print, _describe(saved))
    summary["saved"] = saved
    return summary


def cli(argv=None) -> int:
    return run_cli(PROG, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
