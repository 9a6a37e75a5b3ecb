#!/usr/bin/env python
"""Where transfer is lost: validation/test curves of pre-training and of target training (benchmarks/TRANSFER.md).

Three measurements on the platforms and feature cache of `benchmarks/transfer.py` (same work dir, same options):

    # zero-shot quality on the target every --every steps of a pre-training on every other platform
    python benchmarks/transfer_diagnosis.py pretraining --target amazon-office --steps 750 --every 125 \\
        --pretrain-lr 1e-4 --trainable-layers 0 --output pretraining.json
    # one pre-training scored on both targets, on the platforms that are neither, saving the model at every
    # evaluation (under the work dir: a model trained on the data stays outside the repository)
    python benchmarks/transfer_diagnosis.py pretraining --target amazon-office --measure amazon-office hm \\
        --sources amazon-beauty amazon-games movielens-1m movielens-100k --steps 2400 --every 400 \\
        --save-dir /tmp/pmmrec_transfer/diagnosis-models --pretrain-lr 1e-3 --output pretraining.json
    # one target-training run of a row (SASRec, untrained / pre-trained start: the run's pre-training or a saved
    # --start), every --every steps, optionally with the item encoder frozen (only the user encoder trains)
    python benchmarks/transfer_diagnosis.py finetuning --target amazon-office --setting scratch --fraction 0.1 \\
        --lr 1e-4 --steps 96 --every 16 --freeze-item-encoder --quick --output finetuning.json
    python benchmarks/transfer_diagnosis.py finetuning --target amazon-office --setting full --fraction 0.1 \\
        --start /tmp/pmmrec_transfer/diagnosis-models/step-2400 --lr 1e-3 --steps 640 --every 32 --quick \\
        --output finetuning-full.json
    # which transferred part helps or hurts: the pre-trained model and each of its encoders with the other one
    # untrained, on the target, with the mean cosine of two target items
    python benchmarks/transfer_diagnosis.py components --target amazon-office \\
        --start /tmp/pmmrec_transfer/diagnosis-models/step-800 --quick --output components.json

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
UNTRANSFERRED = ("sasrec", "scratch")  # finetuning rows that start from no pre-trained model


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
    parser.add_argument("measurement", choices=("pretraining", "finetuning", "components"))
    parser.add_argument("--target", required=True,
                        help="the measured target (left out of pre-training); one of the run's targets")
    parser.add_argument("--steps", type=int, help="training steps of the measured run (pretraining, finetuning)")
    parser.add_argument("--every", type=int, help="evaluate on the target every this many steps (pretraining, "
                                                   "finetuning)")
    parser.add_argument("--output", required=True, help="JSON list of the records (rewritten after each)")
    parser.add_argument("--setting", default="scratch",
                        choices=("sasrec", "scratch", "full", "item_encoder", "user_encoder"),
                        help="finetuning: the row whose start is trained (its pre-trained model from the work dir)")
    parser.add_argument("--fraction", type=float, default=1.0, help="finetuning: target training-user fraction")
    parser.add_argument("--lr", type=float, default=1e-4, help="finetuning: learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-item-encoder", action="store_true",
                        help="finetuning, pretraining: only the user encoder trains (the item embeddings stay the "
                             "start's; in pre-training, the untrained item encoder's: a user encoder learned over "
                             "the backbones' own similarity structure)")
    parser.add_argument("--sources", nargs="+", default=None,
                        help="pretraining: the platforms pre-trained on (default: every platform of the run but "
                             "--target), e.g. the platforms that are no target at all, to measure one pre-training "
                             "on every target with --measure")
    parser.add_argument("--measure", nargs="+", default=None,
                        help="pretraining: the targets scored at every evaluation (default: --target)")
    parser.add_argument("--save-dir",
                        help="pretraining: save the model at every evaluation into SAVE_DIR/step-N (under --work-dir "
                             "or outside the repository: it is derived from the data)")
    parser.add_argument("--start",
                        help="finetuning, components: the pre-trained model folder (a --save-dir step) used instead "
                             "of the run's own pre-training")
    own, rest = parser.parse_known_args(argv)
    for name in ("steps", "every") if own.measurement != "components" else ():
        if getattr(own, name) is None or getattr(own, name) < 1:
            parser.error(f"{own.measurement}: --{name} must be a positive integer")
    if not 0 < own.fraction <= 1:
        parser.error(f"--fraction {own.fraction}: a fraction lies in (0, 1]")
    only = {"measure": ("pretraining",), "save_dir": ("pretraining",), "start": ("finetuning", "components"),
            "freeze_item_encoder": ("finetuning", "pretraining")}
    for name, measurements in only.items():
        if getattr(own, name) and own.measurement not in measurements:
            parser.error(f"--{name.replace('_', '-')} is an option of {' / '.join(measurements)}, not of "
                         f"{own.measurement}")
    if own.measurement == "finetuning" and own.start and own.setting in UNTRANSFERRED:
        parser.error(f"--start: the {own.setting} row starts from no pre-trained model (give a transferred --setting)")
    if own.freeze_item_encoder and own.measurement == "finetuning" and own.setting == "sasrec":
        parser.error("--freeze-item-encoder: SASRec has no item encoder (its item embeddings are ids)")
    if own.save_dir and Path(own.save_dir).resolve().is_relative_to(HERE.parent):
        parser.error(f"--save-dir {own.save_dir} lies inside the repository: models derived from the data stay "
                     "outside it.")
    return own, rest


def _record(bench, step, model, context, start, item_cosine: bool = False) -> dict:
    """Validation / test NDCG@10 and HR@10 and the co-occurrence AUC of `model` on the target (and, with
    `item_cosine`, the mean cosine of two distinct target items: how collapsed its item embeddings are), from one
    catalogue embedding."""
    import torch
    from pmmrec_hf.training import encode_catalogue

    model.eval()
    embeddings = encode_catalogue(model, context["ids_collator"], 256, torch.device("cpu"),
                                  feature_cache=context["view"])
    val, test, auc = bench.evaluate_splits(model, context["data"], context["ids_collator"], context["view"],
                                           context["pairs"], embeddings=embeddings)
    record = {"step": step, "validation": {k: val[k] for k in ("ndcg@10", "hr@10")},
              "test": {k: test[k] for k in ("ndcg@10", "hr@10")}, "co_occurrence_auc": auc}
    if item_cosine:
        unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
        n = unit.shape[0]
        record["mean_item_cosine"] = float((unit.sum(0).square().sum() - n) / (n * (n - 1)))
    return {**record, "seconds": round(time.perf_counter() - start, 1)}


def _freeze(module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def _pretrained(own, bench, args, platforms, sources, cache, text_model, vision_model):
    """The pre-trained model measured: the saved `--start` folder, or the run's own pre-training on `sources`."""
    if own.start:
        from pmmrec_hf.modeling_pmmrec import PMMRecModel

        return PMMRecModel.from_pretrained(own.start).eval()
    return bench.pretrain(args, platforms, sources, cache, text_model, vision_model, Path(args.work_dir))[0]


def _components(own, bench, pretrained, untrained, context, add, start) -> None:
    """Which transferred part helps or hurts: the pre-trained model, and each of its encoders alone with the other
    one untrained (what `scratch` starts from), scored on the target like every record."""
    import copy

    item_only, user_only = copy.deepcopy(untrained), copy.deepcopy(untrained)
    item_only.item_encoder.load_state_dict(pretrained.item_encoder.state_dict())
    user_only.user_encoder.load_state_dict(pretrained.user_encoder.state_dict())
    for label, model in (("untrained", untrained), ("pre-trained", pretrained),
                         ("pre-trained item encoder + untrained user encoder", item_only),
                         ("untrained item encoder + pre-trained user encoder", user_only)):
        add({"model": label, "start": own.start, **_record(bench, 0, model, context, start, item_cosine=True)})


def main(argv=None) -> list[dict]:
    own, rest = parse_args(argv)
    bench = _load_transfer()
    args = bench.parse_args(rest)  # the run's platforms and targets: transfer.py's defaults unless `rest` says
    if args.warmup_steps and own.measurement != "finetuning":
        raise SystemExit(f"--warmup-steps is an option of finetuning (target training), not of {own.measurement}")
    measured = list(own.measure or [own.target]) if own.measurement == "pretraining" else [own.target]
    for name in [own.target, *measured]:
        if name not in args.targets:
            raise SystemExit(f"{name} is not a target of the run ({', '.join(args.targets)}): give the run's targets "
                             "with transfer.py's --target option after the measurement's options.")
    sources = list(own.sources or [p for p in args.platforms if p != own.target])
    for name in sources:
        if name not in args.platforms or name in measured:
            raise SystemExit(f"--sources {name}: a source is one of the run's platforms ({', '.join(args.platforms)}) "
                             f"and no measured target ({', '.join(measured)})")
    bench.configure_logging(args)
    from pmmrec_hf.data.format import subset_users
    from pmmrec_hf.training import train

    start = time.perf_counter()
    platforms, cache, text_model, vision_model = bench.set_up(args, {})
    contexts = {name: bench.target_context(args, name, platforms, cache) for name in measured}
    context = contexts[measured[0]]
    records: list[dict] = []
    output = Path(own.output)

    def add(record: dict, target: str = measured[0]) -> None:
        record = {"measurement": own.measurement, "target": target, **record}
        records.append(record)
        print(json.dumps(record), flush=True)
        temporary = output.with_name(output.name + ".tmp")
        temporary.write_text(json.dumps(records, indent=1))
        temporary.replace(output)

    untrained = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.FINETUNE_OBJECTIVE, own.seed)
    if own.measurement == "components":
        pretrained = _pretrained(own, bench, args, platforms, sources, cache, text_model, vision_model)
        _components(own, bench, pretrained, untrained.eval(), context, add, start)
        return records
    for name, target_context in contexts.items():
        add({"model": "untrained", **_record(bench, 0, untrained, target_context, start)}, name)
    del untrained
    if own.measurement == "pretraining":
        inputs = bench.pretraining_inputs(args, platforms, sources)
        model = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.pretrain_objective(args), seed=0)
        if own.freeze_item_encoder:
            _freeze(model.item_encoder)
        label = {"model": "pre-training", "sources": sources, "pretrain_lr": args.pretrain_lr,
                 "users": inputs["users"], "freeze_item_encoder": own.freeze_item_encoder}
        # the mixture's own evaluation is skipped (a few rows): the callback scores the targets instead
        few_rows = [dict(platforms.mixture.validation[i]) for i in range(min(8, len(platforms.mixture.validation)))]
        config = bench.training_config(args, own.steps, args.pretrain_lr, 0, str(Path(args.work_dir) / "diagnosis"),
                                       eval_steps=own.every, replace_prob=0.1, shuffle_prob=0.1)

        def on_evaluate(step, metrics, unwrapped, embeddings):
            saved = {}
            if own.save_dir:
                saved = {"saved": str(Path(own.save_dir) / f"step-{step}")}
                unwrapped.save_pretrained(saved["saved"])
            for name, target_context in contexts.items():
                add({**label, **_record(bench, step, unwrapped, target_context, start), **saved}, name)
            return False

        train(model, inputs["train_rows"], inputs["collator"], config, eval_rows=few_rows,
              save_fn=lambda m, out: None, feature_cache=cache, batch_sampler=inputs["sampler"],
              on_evaluate=on_evaluate)
        return records
    pretrained = None
    if own.setting not in UNTRANSFERRED:
        pretrained = _pretrained(own, bench, args, platforms, sources, cache, text_model, vision_model)
    model = bench.build_row_model(own.setting, args, pretrained, text_model, vision_model,
                                  len(context["ids_collator"].items), own.seed)
    if own.freeze_item_encoder:
        _freeze(model.item_encoder)
    rows = subset_users(context["data"]["train"], own.fraction, seed=own.seed)
    label = {"model": own.setting, "start": own.start, "fraction": own.fraction, "lr": own.lr,
             "freeze_item_encoder": own.freeze_item_encoder, "warmup_steps": args.warmup_steps,
             "train_users": len(rows)}
    config = bench.training_config(args, own.steps, own.lr, own.seed, str(Path(args.work_dir) / "diagnosis"),
                                   eval_steps=own.every, warmup_steps=args.warmup_steps)
    curve = bench.fit_with_patience(model, rows, context["data"], context["ids_collator"], context["view"], config,
                                    context["pairs"], patience=own.steps + 1, test_every_point=True)
    for point in curve["points"]:
        add({**label, "step": point["step"],
             "validation": {k: point["validation"][k] for k in ("ndcg@10", "hr@10")},
             "test": {k: point["test"][k] for k in ("ndcg@10", "hr@10")},
             "co_occurrence_auc": point["co_occurrence_auc"]})
    return records


if __name__ == "__main__":
    main()
