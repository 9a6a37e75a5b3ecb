#!/usr/bin/env python
"""Where transfer is lost: validation/test curves of pre-training and of target training (benchmarks/TRANSFER.md).

Two measurements on the platforms and feature cache of `benchmarks/transfer.py` (same work dir, same options):

    # zero-shot quality on the target every --every steps of a pre-training on every other platform
    python benchmarks/transfer_diagnosis.py pretraining --target amazon-office --steps 750 --every 125 \\
        --pretrain-lr 1e-4 --trainable-layers 0 --output pretraining.json
    # one target-training run of a row (untrained / pre-trained start), every --every steps, optionally with the
    # item encoder frozen (only the user encoder trains)
    python benchmarks/transfer_diagnosis.py finetuning --target amazon-office --setting scratch --fraction 0.1 \\
        --lr 1e-4 --steps 96 --every 16 --freeze-item-encoder --quick --output finetuning.json

Every other option is `benchmarks/transfer.py`'s (`--quick`, `--work-dir`, `--pretrain-steps`, ...). Each record
(step, validation / test NDCG@10 and HR@10 on the target, co-occurrence AUC) is printed and appended to --output,
a JSON list rewritten after every record. Nothing derived from the data is written outside --work-dir except
those metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_transfer():
    """benchmarks/transfer.py as a module (the one already loaded, if any)."""
    if "transfer_benchmark" in sys.modules:
        return sys.modules["transfer_benchmark"]
    spec = importlib.util.spec_from_file_location("transfer_benchmark", HERE / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measurement", choices=("pretraining", "finetuning"))
    parser.add_argument("--target", required=True,
                        help="the measured target (left out of pre-training); one of the run's targets")
    parser.add_argument("--steps", type=int, required=True, help="training steps of the measured run")
    parser.add_argument("--every", type=int, required=True, help="evaluate on the target every this many steps")
    parser.add_argument("--output", required=True, help="JSON list of the records (rewritten after each)")
    parser.add_argument("--setting", default="scratch", choices=("scratch", "full", "item_encoder", "user_encoder"),
                        help="finetuning: the row whose start is trained (its pre-trained model from the work dir)")
    parser.add_argument("--fraction", type=float, default=1.0, help="finetuning: target training-user fraction")
    parser.add_argument("--lr", type=float, default=1e-4, help="finetuning: learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-item-encoder", action="store_true",
                        help="finetuning: only the user encoder trains (the item embeddings stay the start's)")
    own, rest = parser.parse_known_args(argv)
    for name in ("steps", "every"):
        if getattr(own, name) < 1:
            parser.error(f"--{name} must be a positive integer")
    if not 0 < own.fraction <= 1:
        parser.error(f"--fraction {own.fraction}: a fraction lies in (0, 1]")
    return own, rest


def _record(bench, step, model, context, start) -> dict:
    model.eval()
    val, test, auc = bench.evaluate_splits(model, context["data"], context["ids_collator"], context["view"],
                                           context["pairs"])
    return {"step": step, "validation": {k: val[k] for k in ("ndcg@10", "hr@10")},
            "test": {k: test[k] for k in ("ndcg@10", "hr@10")}, "co_occurrence_auc": auc,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> list[dict]:
    own, rest = parse_args(argv)
    bench = _load_transfer()
    args = bench.parse_args(rest)  # the run's platforms and targets: transfer.py's defaults unless `rest` says
    if own.target not in args.targets:
        raise SystemExit(f"--target {own.target} is not a target of the run ({', '.join(args.targets)}): give the "
                         f"run's targets with transfer.py's --target option after the measurement's options.")
    bench.configure_logging(args)
    from pmmrec_hf.data.format import subset_users
    from pmmrec_hf.training import train

    start = time.perf_counter()
    platforms, cache, text_model, vision_model = bench.set_up(args, {})
    context = bench.target_context(args, own.target, platforms, cache)
    records: list[dict] = []
    output = Path(own.output)

    def add(record: dict) -> None:
        record = {"measurement": own.measurement, "target": own.target, **record}
        records.append(record)
        print(json.dumps(record), flush=True)
        temporary = output.with_name(output.name + ".tmp")
        temporary.write_text(json.dumps(records, indent=1))
        temporary.replace(output)

    untrained = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.FINETUNE_OBJECTIVE, own.seed)
    add({"model": "untrained", **_record(bench, 0, untrained, context, start)})
    del untrained
    if own.measurement == "pretraining":
        sources = [p for p in args.platforms if p != own.target]
        inputs = bench.pretraining_inputs(args, platforms, sources)
        model = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.pretrain_objective(args), seed=0)
        label = {"model": "pre-training", "sources": sources, "pretrain_lr": args.pretrain_lr,
                 "users": inputs["users"]}
        # the mixture's own evaluation is skipped (a few rows): the callback scores the target instead
        few_rows = [dict(platforms.mixture.validation[i]) for i in range(min(8, len(platforms.mixture.validation)))]
        config = bench.training_config(args, own.steps, args.pretrain_lr, 0, str(Path(args.work_dir) / "diagnosis"),
                                       eval_steps=own.every, replace_prob=0.1, shuffle_prob=0.1)

        def on_evaluate(step, metrics, unwrapped, embeddings):
            add({**label, **_record(bench, step, unwrapped, context, start)})
            return False

        train(model, inputs["train_rows"], inputs["collator"], config, eval_rows=few_rows,
              save_fn=lambda m, out: None, feature_cache=cache, batch_sampler=inputs["sampler"],
              on_evaluate=on_evaluate)
        return records
    pretrained = None
    if own.setting != "scratch":
        sources = [p for p in args.platforms if p != own.target]
        pretrained, _ = bench.pretrain(args, platforms, sources, cache, text_model, vision_model,
                                       Path(args.work_dir))
    model = bench.build_row_model(own.setting, args, pretrained, text_model, vision_model,
                                  len(context["ids_collator"].items), own.seed)
    if own.freeze_item_encoder:
        for parameter in model.item_encoder.parameters():
            parameter.requires_grad_(False)
    rows = subset_users(context["data"]["train"], own.fraction, seed=own.seed)
    label = {"model": own.setting, "fraction": own.fraction, "lr": own.lr,
             "freeze_item_encoder": own.freeze_item_encoder, "train_users": len(rows)}
    config = bench.training_config(args, own.steps, own.lr, own.seed, str(Path(args.work_dir) / "diagnosis"),
                                   eval_steps=own.every)
    curve = bench.fit_with_patience(model, rows, context["data"], context["ids_collator"], context["view"], config,
                                    context["pairs"], patience=own.steps + 1)
    for point in curve["points"]:
        add({**label, "step": point["step"],
             "validation": {k: point["validation"][k] for k in ("ndcg@10", "hr@10")},
             "test": {k: point["test"][k] for k in ("ndcg@10", "hr@10")},
             "co_occurrence_auc": point["co_occurrence_auc"]})
    return records


if __name__ == "__main__":
    main()
