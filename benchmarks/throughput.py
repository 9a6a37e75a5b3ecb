#!/usr/bin/env python
"""PMMRec training-step throughput benchmark (protocol: shared/reference/performance.md; see benchmarks/README.md).

Model step only (forward + backward + AdamW step) on synthetic batches, random weights built from configs,
each configuration in a fresh model and optimiser:

    python benchmarks/throughput.py --size small --device cpu --steps 5 --warmup 2      # CPU, reduced size
    python benchmarks/throughput.py --size full --device cuda --output results.json      # GPU, real shapes

Imports only torch, transformers, numpy and pmmrec_hf's model code (never `datasets` / `evaluate`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

import transformers  # noqa: E402
from transformers import CLIPVisionConfig, XLMRobertaConfig  # noqa: E402

from pmmrec_hf import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecModel, PMMRecUserEncoderConfig  # noqa: E402
from pmmrec_hf.feature_cache import FeatureCache  # noqa: E402
from pmmrec_hf.packing import TokenPacking, bucket_size, geometric_buckets  # noqa: E402

SWITCHES = ("dedup", "bf16", "sdpa", "fused_adamw", "compile", "cache", "packed", "static")
CONFIGS = ("baseline",) + SWITCHES + ("all",)
MODES = ("full-length", "realistic")
DEFAULT_ALL = ("dedup", "bf16", "sdpa", "fused_adamw", "cache", "packed")  # when no single-switch result decides
DEFAULT_DATA_DIR = "../shared/data/movielens-100k/ml-100k"  # relative to the repository root
# research code, performance.md: sequences/s at batch 64, eager attention, fp16 autocast (2026-11-26)
REFERENCE_SEQ_PER_S = {"H200": 287.6, "H100": 250.9}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0}  # dense bf16; 989 taken for both (see README)
# built-in approximation of MovieLens-100K (used when u.data is absent): histogram of the leave-one-out
# train-row lengths cut to L + 1 = 21 (943 users) and a Zipf popularity over 1682 items whose exponent gives
# the same number of distinct items per 64-user batch as the real data (~640 of ~1330 real slots)
ML100K_TRAIN_LENGTHS = {18: 32, 19: 24, 20: 23, 21: 864}
ML100K_NUM_ITEMS, ML100K_ZIPF = 1682, 0.82
# built-in title token lengths (used when tmdb_items.csv is absent): histogram of `approx_title_tokens` over the
# 1746 titles of ../shared/data/movielens-100k/tmdb_items.csv (mean 9.1 tokens), measured 2026-12-02
ML100K_TITLE_TOKENS = {4: 1, 6: 131, 7: 372, 8: 335, 9: 333, 10: 201, 11: 117, 12: 98, 13: 50, 14: 30, 15: 26,
                       16: 9, 17: 21, 18: 8, 19: 2, 20: 2, 21: 5, 23: 3, 24: 1, 26: 1}
TITLES_FILE = "tmdb_items.csv"  # next to ml-100k/ (the parent of --data-dir)
GIB = 1024**3


# --------------------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------------------


@dataclass
class SizeSpec:
    name: str
    text: dict  # XLMRobertaConfig kwargs
    vision: dict  # CLIPVisionConfig kwargs
    hidden: int  # d
    fusion_heads: int
    fusion_ffn: int
    user_heads: int
    user_ffn: int
    text_tokens: int
    batch_size: int
    trainable_layers: int = 2
    max_length: int = 20  # L

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]


def size_spec(size: str) -> SizeSpec:
    if size == "full":  # xlm-roberta-base + CLIP ViT-B/32 vision, d = 768 (the paper)
        return SizeSpec(
            "full",
            text=dict(vocab_size=250002, max_position_embeddings=514),  # XLMRobertaConfig() defaults otherwise
            vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32),
            hidden=768, fusion_heads=12, fusion_ffn=3072, user_heads=2, user_ffn=3072, text_tokens=50, batch_size=64,
        )
    if size == "small":  # ~1 s per CPU step at batch 8; 12 blocks per tower (top 2 trainable) like the paper
        return SizeSpec(
            "small",
            text=dict(vocab_size=8000, hidden_size=128, num_hidden_layers=12, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=66),
            vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                        image_size=96, patch_size=16),
            hidden=128, fusion_heads=4, fusion_ffn=512, user_heads=2, user_ffn=512, text_tokens=32, batch_size=8,
        )
    if size == "tiny":  # for tests
        return SizeSpec(
            "tiny",
            text=dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
                      max_position_embeddings=20),
            vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                        image_size=30, patch_size=10),
            hidden=16, fusion_heads=2, fusion_ffn=24, user_heads=2, user_ffn=32, text_tokens=8, batch_size=4,
        )
    raise ValueError(f"--size must be tiny, small or full, got {size!r}.")


def model_config(spec: SizeSpec, attn: str = "eager", dropout: bool = True) -> PMMRecConfig:
    """PMMRec config of the given shapes; `attn` is the backbones' attention implementation (eager / sdpa)."""
    text_kw = dict(spec.text)
    vision_kw = dict(spec.vision)
    drop = {} if dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text_config = XLMRobertaConfig(**text_kw, **drop)
    vision_config = CLIPVisionConfig(**vision_kw)
    for cfg in (text_config, vision_config):
        cfg._attn_implementation = attn
    item = PMMRecItemEncoderConfig(
        text_config=text_config, vision_config=vision_config, hidden_size=spec.hidden,
        fusion_num_attention_heads=spec.fusion_heads, fusion_intermediate_size=spec.fusion_ffn,
        fusion_dropout=0.1 if dropout else 0.0,
        text_trainable_layers=spec.trainable_layers, vision_trainable_layers=spec.trainable_layers,
        max_text_length=spec.text_tokens, image_size=spec.image_size,
    )
    user = PMMRecUserEncoderConfig(
        hidden_size=spec.hidden, num_attention_heads=spec.user_heads, intermediate_size=spec.user_ffn,
        max_position_embeddings=spec.max_length,
        hidden_dropout_prob=0.1 if dropout else 0.0, attention_probs_dropout_prob=0.1 if dropout else 0.0,
    )
    # the research code's objectives: 0.6 next-item + 0.4 NICL (no corruption given, so no NID / RCL)
    return PMMRecConfig(item_encoder_config=item, user_encoder_config=user, gather_negatives=False)


def set_backbone_attention(model: PMMRecModel, attn: str) -> PMMRecModel:
    """Switch both backbones' attention implementation (eager / sdpa) in place; weights unchanged."""
    for backbone in (model.item_encoder.text_model, model.item_encoder.vision_model):
        if hasattr(backbone, "set_attn_implementation"):
            backbone.set_attn_implementation(attn)
        else:  # pragma: no cover - older transformers
            backbone.config._attn_implementation = attn
    return model


def build_model(spec: SizeSpec, attn: str = "eager", seed: int = 0, dropout: bool = True) -> PMMRecModel:
    torch.manual_seed(seed)
    return set_backbone_attention(PMMRecModel(model_config(spec, attn, dropout)), attn)


# --------------------------------------------------------------------------------------------------
# FLOP model
# --------------------------------------------------------------------------------------------------

FLOP_FORMULA = (
    "per transformer layer over T tokens of width h, FFN f: 2*T*(4*h^2 + 2*h*f) + 4*T^2*h (matmuls; norms, "
    "softmax, biases ignored). Per item: text tower (12 layers x 50 tokens at full size), vision tower (patch "
    "embedding 2*P*3*p^2*h + 12 layers x 50 tokens), projections 2*(T+V)*h*d, fusion 1 layer x (T+V) tokens. "
    "frozen forward = embeddings + lower blocks; trainable forward = top 2 blocks of each tower + projections + "
    "fusion; backward = 2 x trainable forward. Per user: user encoder forward (2 layers x L tokens) x 3 (fwd+bwd). "
    "step FLOPs = items_encoded x (frozen forward [not with the cache] + trainable forward + backward) + "
    "users x user encoder. At full size: 18.97 GFLOP forward per item (performance.md: ~19), 8.85 GFLOP "
    "backward (performance.md: ~8.6), 14.54 GFLOP of it frozen; 37.4 TFLOP per 1344-item step."
)


def _layer_flops(tokens: int, h: int, f: int) -> float:
    return 2.0 * tokens * (4 * h * h + 2 * h * f) + 4.0 * tokens * tokens * h


def flop_model(spec: SizeSpec) -> dict:
    t, v = spec.text, spec.vision
    th = t.get("hidden_size", 768)
    tf = t.get("intermediate_size", 3072)
    tl = t.get("num_hidden_layers", 12)
    vh, vf, vl = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vtokens = patches + 1
    T, d, k = spec.text_tokens, spec.hidden, spec.trainable_layers
    text_layer, vision_layer = _layer_flops(T, th, tf), _layer_flops(vtokens, vh, vf)
    patch_embed = 2.0 * patches * 3 * v["patch_size"] ** 2 * vh
    frozen = (tl - k) * text_layer + (vl - k) * vision_layer + patch_embed
    trainable = k * text_layer + k * vision_layer + 2.0 * (T * th + vtokens * vh) * d + _layer_flops(T + vtokens, d,
                                                                                                     spec.fusion_ffn)
    user = 2 * _layer_flops(spec.max_length, d, spec.user_ffn)
    return {
        "formula": FLOP_FORMULA,
        "forward_gflop_per_item": (frozen + trainable) / 1e9,
        "forward_frozen_gflop_per_item": frozen / 1e9,
        "forward_trainable_gflop_per_item": trainable / 1e9,
        "backward_gflop_per_item": 2 * trainable / 1e9,
        "user_encoder_gflop_per_user_step": 3 * user / 1e9,
    }


def step_flops(flops: dict, items: float, users: int, cached: bool) -> float:
    per_item = flops["forward_trainable_gflop_per_item"] + flops["backward_gflop_per_item"]
    if not cached:
        per_item += flops["forward_frozen_gflop_per_item"]
    return (items * per_item + users * flops["user_encoder_gflop_per_user_step"]) * 1e9


# --------------------------------------------------------------------------------------------------
# synthetic data: catalogue, sequences, batches
# --------------------------------------------------------------------------------------------------


@dataclass
class Catalogue:
    """Synthetic item contents: I items + one padding item (row `pad_row`), stored on `device`."""

    num_items: int
    spec: SizeSpec
    device: torch.device
    log_q: torch.Tensor  # (I,) log popularity (on CPU)
    seed: int = 0
    text_lengths: torch.Tensor | None = None  # (I,) real tokens per title (None: every title T tokens)
    tokens: torch.Tensor = field(init=False)
    mask: torch.Tensor = field(init=False)
    lengths: torch.Tensor = field(init=False)  # (I + 1,) on CPU, the padding item's included
    images: torch.Tensor = field(init=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        rows, T, size = self.num_items + 1, self.spec.text_tokens, self.spec.image_size
        vocab = self.spec.text.get("vocab_size", 250002)
        tokens = torch.randint(5, vocab, (rows, T), generator=g)
        if self.text_lengths is None:
            lengths = torch.full((rows,), T, dtype=torch.long)  # every title uses all 50 tokens (the protocol)
        else:  # real title lengths; the padding item gets 2 tokens (<s> </s>)
            lengths = torch.cat([torch.as_tensor(self.text_lengths, dtype=torch.long).clamp(2, T), torch.tensor([2])])
        position = torch.arange(T)[None]
        mask = position < lengths[:, None]  # (rows, T) real tokens first, right-padded
        tokens = torch.where(mask, tokens, torch.ones_like(tokens))  # pad id 1 (XLM-R)
        tokens[:, 0] = 0  # <s>
        tokens[torch.arange(rows), lengths - 1] = 2  # </s>
        self.lengths = lengths
        self.tokens = tokens.to(self.device)
        self.mask = mask.long().to(self.device)
        self.images = torch.randint(0, 256, (rows, 3, size, size), generator=g, dtype=torch.uint8).to(self.device)

    @property
    def pad_row(self) -> int:
        return self.num_items

    def raw_inputs(self, rows: torch.Tensor) -> dict:
        rows = rows.to(self.device)
        pixels = self.images[rows].float().div_(255.0).sub_(0.5).div_(0.5)  # mean = std = 0.5
        return {"input_ids": self.tokens[rows], "attention_mask": self.mask[rows], "pixel_values": pixels}

    def chunks(self, batch_size: int):
        for start in range(0, self.num_items + 1, batch_size):
            rows = torch.arange(start, min(start + batch_size, self.num_items + 1))
            yield dict(item_ids=rows, **self.raw_inputs(rows))


@dataclass
class ModeData:
    mode: str
    num_items: int
    log_q: torch.Tensor  # (I,)
    source: str
    sequences: list  # per step: list of B lists of item ids (each <= L + 1 long)
    text_lengths: np.ndarray | None = None  # (I,) title token lengths (None: every title padded-length)
    text_source: str = "every title T tokens (the protocol's padded length)"

    def stats(self, slots: int) -> dict:
        real = [sum(len(s) for s in step) for step in self.sequences]
        distinct = [len({i for s in step for i in s}) for step in self.sequences]
        users = len(self.sequences[0])
        return {
            "source": self.source,
            "catalogue_items": self.num_items,
            "users_per_step": users,
            "slots_per_step": users * slots,
            "mean_real_items_per_step": statistics.fmean(real),
            "mean_distinct_items_per_step": statistics.fmean(distinct),
            "padding_fraction": 1 - statistics.fmean(real) / (users * slots),
            "repeat_fraction": 1 - statistics.fmean(distinct) / statistics.fmean(real),
            "text_tokens_source": self.text_source,
            "mean_title_tokens": (float(np.mean(self.text_lengths)) if self.text_lengths is not None else None),
        }


def _log_q(counts: np.ndarray) -> torch.Tensor:
    q = (counts + 1.0) / (counts + 1.0).sum()
    return torch.from_numpy(np.log(q)).float()


def approx_title_tokens(title: str) -> int:
    """Approximate XLM-R token count of a title, <s> and </s> included (no tokenizer is downloaded): one token
    per punctuation mark, ceil(len / 6) per word ("Toy Story (1995)": 7, XLM-R's own count is 7)."""
    return 2 + sum(math.ceil(len(piece) / 6) for piece in re.findall(r"\w+|[^\w\s]", title))


def read_title_lengths(path: Path) -> dict[str, int] | None:
    """movie id -> approximate title token count, from tmdb_items.csv (columns movie_id, title)."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["movie_id"]: approx_title_tokens(row["title"]) for row in csv.DictReader(handle)}


def read_movielens(data_dir: Path, max_length: int, return_names: bool = False):
    """Leave-one-out train rows of MovieLens-100K (u.data): per user, the last L + 3 items minus the last 2."""
    path = data_dir / "u.data"
    if not path.is_file():
        return None
    users: dict[str, list] = {}
    with open(path) as handle:
        for line_no, line in enumerate(handle):
            parts = line.split()
            if len(parts) < 4:
                continue
            users.setdefault(parts[0], []).append((int(parts[3]), line_no, parts[1]))
    rows = []
    for events in users.values():
        if len(events) < 3:
            continue
        events.sort()
        seq = [item for _, _, item in events][-(max_length + 3):][:-2]
        rows.append(seq)
    names = sorted({i for s in rows for i in s})
    index = {name: k for k, name in enumerate(names)}
    if return_names:
        return [[index[i] for i in s] for s in rows], len(names), names
    return [[index[i] for i in s] for s in rows], len(names)


def make_mode_data(mode: str, spec: SizeSpec, batch_size: int, num_steps: int, data_dir: Path | None, seed: int):
    rng = np.random.default_rng(seed)
    slots = spec.max_length + 1
    if mode == "full-length":
        # every user has L + 1 items, all distinct within the batch: B * (L + 1) items per step
        num_items = 2 * batch_size * slots
        steps = []
        for _ in range(num_steps):
            perm = rng.permutation(num_items)[: batch_size * slots].tolist()
            steps.append([perm[b * slots : (b + 1) * slots] for b in range(batch_size)])
        source = f"synthetic: {batch_size} users x {slots} items, all distinct, uniform over {num_items} items"
        return ModeData(mode, num_items, _log_q(np.zeros(num_items)), source, steps)
    if mode != "realistic":
        raise ValueError(f"unknown mode {mode!r}")
    real = read_movielens(data_dir, spec.max_length, return_names=True) if data_dir is not None else None
    names = None
    if real is not None:
        rows, num_items, names = real
        lengths = np.array([len(s) for s in rows])
        counts = np.bincount(np.concatenate([np.array(s) for s in rows]), minlength=num_items).astype(float)
        source = (f"MovieLens-100K u.data ({data_dir}): {len(rows)} users' leave-one-out train rows cut to "
                  f"{slots} (lengths and item popularity of those rows)")
    else:
        num_items = ML100K_NUM_ITEMS
        lengths = np.repeat(list(ML100K_TRAIN_LENGTHS), list(ML100K_TRAIN_LENGTHS.values()))
        lengths = np.minimum(lengths, slots)
        counts = 1.0 / np.arange(1, num_items + 1) ** ML100K_ZIPF
        counts = counts / counts.sum() * lengths.sum()
        source = (f"built-in approximation of MovieLens-100K (u.data not found under {data_dir}): train-row length "
                  f"histogram {ML100K_TRAIN_LENGTHS}, Zipf({ML100K_ZIPF}) popularity over {num_items} items")
    p = counts / counts.sum()
    titles = read_title_lengths(data_dir.parent / TITLES_FILE) if data_dir is not None else None
    hist_lengths = np.repeat(list(ML100K_TITLE_TOKENS), list(ML100K_TITLE_TOKENS.values()))
    if titles is not None and names is not None:
        fallback = int(np.median(list(titles.values())))
        text_lengths = np.array([titles.get(name, fallback) for name in names])
        text_source = (f"title token lengths of {data_dir.parent / TITLES_FILE} (approx_title_tokens, "
                       f"{sum(n in titles for n in names)} of {len(names)} items found)")
    else:
        text_lengths = np.random.default_rng(seed + 1).choice(hist_lengths, size=num_items)
        text_source = (f"built-in title token-length histogram ({TITLES_FILE} not found under {data_dir.parent} "
                       "or u.data absent): ML100K_TITLE_TOKENS")
    text_lengths = np.minimum(text_lengths, spec.text_tokens)
    steps = []
    for _ in range(num_steps):
        users = []
        for length in rng.choice(lengths, size=batch_size):
            users.append(rng.choice(num_items, size=int(min(length, slots)), replace=False, p=p).tolist())
        steps.append(users)
    return ModeData(mode, num_items, _log_q(counts), source, steps, text_lengths, text_source)


def item_buckets(max_items: int) -> tuple[int, ...]:
    """Sizes the number of a step's distinct items is padded to with `static` (4 per doubling, from 16)."""
    return geometric_buckets(min(16, max_items), max_items, per_doubling=4, multiple=8)


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Sizes a step's packed text token count is padded to with `static` (4 per doubling, from 64)."""
    return geometric_buckets(min(64, max_tokens), max_tokens, per_doubling=4, multiple=64)


def make_batch(sequences: list, catalogue: Catalogue, slots: int, dedup: bool, raw: bool, packed: bool = False,
               static: bool = False) -> dict:
    """The model batch of docs/formats.md for B sequences (left-padded to `slots`).

    dedup=True: the distinct items once, no padding encoded. dedup=False (the research code's layout): every
    slot of the (B, slots) grid is its own row, repeats and padding included (the padding rows hold the padding
    item and come last, their model id repeating the first row's, so the losses mask them like the research
    code masks padding candidates).
    `cache_ids` are the rows' catalogue rows (the feature cache's keys); `raw` adds the raw inputs.
    packed=True adds the `token_packing` plan (host-computed from the catalogue's title lengths) and, with raw
    inputs, cuts the text to the batch's longest title (rounded up to a multiple of 8); static=True pads the
    number of distinct items to `item_buckets` (padding rows: the padding item, the first row's id, held by no
    user, so both losses mask them: the same losses) and the packed token count to `token_buckets`.
    """
    batch_size = len(sequences)
    index = torch.full((batch_size, slots), -1, dtype=torch.long)
    if dedup:
        order: dict[int, int] = {}
        for seq in sequences:
            for item in seq:
                order.setdefault(item, len(order))
        for b, seq in enumerate(sequences):
            if seq:
                index[b, slots - len(seq):] = torch.tensor([order[i] for i in seq])
        rows = torch.tensor(list(order), dtype=torch.long)
        item_ids = rows.clone()
        if static:
            extra = bucket_size(len(order), item_buckets(batch_size * slots)) - len(order)
            rows = torch.cat([rows, torch.full((extra,), catalogue.pad_row, dtype=torch.long)])
            item_ids = torch.cat([item_ids, item_ids[:1].expand(extra)])
    else:
        # real slots first (row order is free), then one row per padding slot
        rows = torch.full((batch_size * slots,), catalogue.pad_row, dtype=torch.long)
        start = 0
        for b, seq in enumerate(sequences):
            if seq:
                rows[start : start + len(seq)] = torch.tensor(seq)
                index[b, slots - len(seq):] = torch.arange(start, start + len(seq))
                start += len(seq)
        # padding rows repeat the first row's id after it: the next-item loss masks them as duplicates and NICL
        # ignores them (no user holds them), as the research code masks its padding candidates
        item_ids = rows.clone()
        item_ids[start:] = rows[0]
    batch = {
        "item_ids": item_ids,
        "item_index": index,
        "item_log_popularity": catalogue.log_q[item_ids],
        "cache_ids": rows,
    }
    batch = {k: v.to(catalogue.device) for k, v in batch.items()}
    if raw:
        batch.update(catalogue.raw_inputs(rows))
    if packed:
        lengths = catalogue.lengths[rows]  # (N,) on the host: no device sync
        width = catalogue.spec.text_tokens
        if raw:  # the frozen part runs on the batch's longest title only
            width = min(width, int(math.ceil(int(lengths.max()) / 8) * 8))
            batch["input_ids"] = batch["input_ids"][:, :width]
            batch["attention_mask"] = batch["attention_mask"][:, :width]
        vision_tokens = (catalogue.spec.image_size // catalogue.spec.vision["patch_size"]) ** 2 + 1
        buckets = token_buckets(batch_size * slots * catalogue.spec.text_tokens) if static else None
        batch["token_packing"] = TokenPacking.build(lengths, width, vision_tokens, token_buckets=buckets).to(
            catalogue.device)
    if static:
        batch["sync_free"] = True
    return batch


# --------------------------------------------------------------------------------------------------
# the step and its switches
# --------------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, fused: bool, device: torch.device, lr: float = 1e-4):
    """AdamW over the trainable parameters; weight decay 0 for the towers, 0.1 for the rest (research code).

    fused=True: fused kernels on CUDA, the foreach implementation elsewhere; fused=False: torch's defaults.
    """
    towers, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (towers if "_tower." in name else rest).append(param)
    groups = [{"params": towers, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.1}]
    kwargs = {}
    if fused:
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def apply_compile(model: PMMRecModel, backend: str = "inductor", dynamic: bool | None = None,
                  mode: str | None = None) -> list[str]:
    """torch.compile the trainable layers' forwards: the fusion layers, the user-encoder layers, and the
    towers' trainable top blocks (each block's forward, so the towers' hooks stay outside the graphs)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    compiled = []
    encoder = model.item_encoder
    targets = [("fusion", layer) for layer in (encoder.fusion or [])]
    targets += [("user_encoder", layer) for layer in model.user_encoder.layers]
    from pmmrec_hf.modeling_pmmrec import find_blocks

    for kind in ("text", "vision"):
        tower = getattr(encoder, f"{kind}_tower")
        if tower is None:
            continue
        _, _, blocks = find_blocks(tower.backbone)
        targets += [(f"{kind}_top_block", block) for block in list(blocks)[tower.first_trainable :]]
    for kind, module in targets:
        module.forward = torch.compile(module.forward, backend=backend, dynamic=dynamic, mode=mode)
        compiled.append(kind)
    return compiled


def autocast_context(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_MODEL_KEYS = ("item_ids", "item_index", "item_log_popularity", "input_ids", "attention_mask", "pixel_values")


def model_inputs(batch: dict, cache: FeatureCache | None, device: torch.device, feature_dtype=torch.float32) -> dict:
    inputs = {k: batch[k] for k in _MODEL_KEYS + ("token_packing", "sync_free") if k in batch}
    if cache is not None:
        for key in ("input_ids", "attention_mask", "pixel_values"):
            inputs.pop(key, None)
        inputs.update(cache.lookup(batch["cache_ids"], device=device, dtype=feature_dtype, check=False))
    return inputs


def compute_loss(model, batch, cache=None, bf16=False, device=torch.device("cpu"), feature_dtype=torch.float32):
    with autocast_context(device, bf16):
        return model(**model_inputs(batch, cache, device, feature_dtype)).loss


def train_step(model, optimizer, batch, cache=None, bf16=False, device=torch.device("cpu"),
               feature_dtype=torch.float32) -> torch.Tensor:
    loss = compute_loss(model, batch, cache, bf16, device, feature_dtype)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def build_cache(model, catalogue: Catalogue, device, dtype, bf16: bool, batch_size: int) -> FeatureCache:
    cache = FeatureCache.create(model.item_encoder, catalogue.num_items + 1, dtype=dtype, device=device)
    return cache.build(model.item_encoder, catalogue.chunks(batch_size), batch_size=batch_size,
                       autocast_dtype=torch.bfloat16 if bf16 else None, check_fingerprint=False)


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
                handle.write("5")


def _peak_memory(device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB, "process RSS peak (VmHWM, reset per configuration)"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "process RSS peak (lifetime)"


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _reset_peak(device)


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and "out of memory" in str(error).lower()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def card_kind(name: str) -> str | None:
    for kind in ("H200", "H100"):
        if kind in name:
            return kind
    return None


def run_config(name: str, switches: set, data: ModeData, catalogue: Catalogue, templates: dict, args, spec,
               flops: dict, device: torch.device) -> dict:
    result = {"mode": data.mode, "config": name, "switches": sorted(switches), "status": "ok"}
    bf16, cached, dedup = "bf16" in switches, "cache" in switches, "dedup" in switches
    feature_dtype = torch.float32
    slots = spec.max_length + 1
    model = optimizer = cache = batch = loss = None
    _free(device)  # peak memory of this configuration only
    try:
        started = time.perf_counter()
        model = copy.deepcopy(templates["sdpa" if "sdpa" in switches else "eager"]).to(device).train()
        optimizer = make_optimizer(model, "fused_adamw" in switches, device)
        if "compile" in switches:
            # the number of items per step varies only with deduplication on realistic data
            dynamic = True if ((dedup and data.mode == "realistic") or "packed" in switches) else None
            if "static" in switches:  # bucketed shapes: one compilation per bucket
                dynamic = False
            torch._dynamo.utils.counters.clear()
            result["compiled"] = sorted(set(apply_compile(model, args.compile_backend, dynamic, args.compile_mode)))
            result["compile_mode"] = args.compile_mode or "default"
        if cached:
            cache_dtype = args.cache_dtype or ("bfloat16" if bf16 else "float32")
            _sync(device)
            t0 = time.perf_counter()
            cache = build_cache(model, catalogue, device, cache_dtype, bf16, args.cache_batch_size)
            _sync(device)
            result["cache_build_s"] = time.perf_counter() - t0
            result["cache_items"] = catalogue.num_items + 1
            result["cache_dtype"] = cache_dtype
            result["cache_gib"] = cache.nbytes / GIB
        result["setup_s"] = time.perf_counter() - started
        warmup = max(args.warmup, 3) if "compile" in switches else args.warmup
        total = warmup + args.steps
        times, items, losses, text_tokens = [], [], [], []
        warmup_started = time.perf_counter()
        packed, static = "packed" in switches, "static" in switches

        def batch_of(step):
            return make_batch(data.sequences[step % len(data.sequences)], catalogue, slots, dedup, raw=not cached,
                              packed=packed, static=static)

        if (dedup and data.mode == "realistic") or packed:
            # the number of distinct items changes every step, and the first step of each new shape pays for
            # kernel selection (cuBLAS heuristics, allocator growth): run the timed batches once untimed, so
            # the figure is the steady state a long training run sees, whatever ran before in this process
            for step in range(warmup, total):
                batch = batch_of(step)
                train_step(model, optimizer, batch, cache, bf16, device, feature_dtype)
            result["shape_warmup"] = True
        for step in range(total):
            batch = batch_of(step)
            _sync(device)
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, batch, cache, bf16, device, feature_dtype)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if step == warmup - 1 or (warmup == 0 and step == 0):
                result["warmup_s"] = time.perf_counter() - warmup_started
            if step >= warmup:
                times.append(elapsed)
                items.append(batch["item_ids"].numel())
                losses.append(float(loss))
                if "token_packing" in batch:
                    text_tokens.append(batch["token_packing"].packed_text_tokens)
            batch = None
        median = statistics.median(times)
        mean_items = statistics.fmean(items)
        achieved = step_flops(flops, mean_items, len(data.sequences[0]), cached) / median
        peak, peak_kind = _peak_memory(device)
        result.update(
            steps=len(times),
            median_step_s=median,
            mean_step_s=statistics.fmean(times),
            min_step_s=min(times),
            sequences_per_s=len(data.sequences[0]) / median,
            items_encoded_per_step=mean_items,
            peak_memory_gib=peak,
            peak_memory_kind=peak_kind,
            model_tflop_per_step=achieved * median / 1e12,
            achieved_tflops=achieved / 1e12,
            loss_first=losses[0],
            loss_last=losses[-1],
        )
        if text_tokens:
            result["packed_text_tokens_per_step"] = statistics.fmean(text_tokens)
        if "compile" in switches:
            stats = torch._dynamo.utils.counters["stats"]
            result["compiled_graphs"] = int(stats.get("unique_graphs", 0))
            result["compile_calls"] = int(stats.get("calls_captured", 0))
        if device.type == "cuda" and static:
            result["host_syncs_in_step"] = count_cuda_syncs(lambda: train_step(model, optimizer, batch_of(warmup),
                                                                            cache, bf16, device, feature_dtype))
        if args.profile_configs and name in args.profile_configs.split(","):
            result["profile_file"] = write_profile(model, optimizer, [batch_of(s) for s in range(warmup, warmup + 3)],
                                                   cache, bf16, device, feature_dtype, args, data.mode, name)
        if not all(math.isfinite(x) for x in losses):
            result["status"] = "non-finite loss"
    except Exception as error:  # noqa: BLE001 - every configuration reports, none stops the run
        if _is_oom(error):
            result["status"] = "OOM"
        else:
            result["status"] = f"error: {type(error).__name__}: {str(error)[:300]}"
        if args.raise_errors and not _is_oom(error):
            raise
    finally:
        model = optimizer = cache = batch = loss = None  # noqa: F841 - release before freeing memory
        if "compile" in switches:
            torch._dynamo.reset()
        _free(device)
    return result


def count_cuda_syncs(step) -> int:
    """Device-to-host synchronisations during one call of `step` (CUDA only), counted through
    torch.cuda.set_sync_debug_mode("warn"): one warning per synchronising call (.item(), nonzero, ...)."""
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def write_profile(model, optimizer, batches, cache, bf16, device, feature_dtype, args, mode, name) -> str:
    """torch.profiler table (top 40 ops by self time) of `len(batches)` steps, written under --profile-dir."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for batch in batches:
            train_step(model, optimizer, batch, cache, bf16, device, feature_dtype)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    folder = Path(args.profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"profile_{args.size}_{device.type}_{mode}_{re.sub(r'[^A-Za-z0-9+_-]', '_', name)}.txt"
    header = (f"torch.profiler, {len(batches)} training steps after timing; size {args.size}, device "
              f"{device_name(device)}, torch {torch.__version__}; mode {mode}, configuration {name}\n")
    path.write_text(header + table + "\n")
    return str(path)


def resolve_all(mode_results: list, other_results: list, forced: str | None) -> tuple[set, str]:
    """The switches of `all`: forced by --all-switches, else per switch: dedup, cache and packed always (they
    only remove work); bf16 / sdpa / fused_adamw when they beat the baseline by > 1% in this mode (else in the other
    mode, where this one did not measure them; unmeasured: on); compile only when measured in this mode and
    > 5% faster (its compile time is not free, and its shapes differ between modes)."""
    if forced:
        return set(forced.split(",")) - {"", "baseline"}, "given by --all-switches"

    def speedups(results):
        ok = {r["config"]: r for r in results if r["status"] == "ok"}
        base = ok.get("baseline")
        if base is None:
            return {}
        return {s: ok[s]["sequences_per_s"] / base["sequences_per_s"] for s in SWITCHES if s in ok}

    here, there = speedups(mode_results), speedups(other_results)
    chosen, reasons = set(), []
    for switch in SWITCHES:
        threshold = 1.05 if switch == "compile" else 1.01
        if switch in ("dedup", "cache", "packed"):
            keep, why = True, "removes work"
        elif switch in here:
            keep, why = here[switch] > threshold, f"x{here[switch]:.2f} here"
        elif switch == "compile":
            keep, why = False, "not measured in this mode"
        elif switch in there:
            keep, why = there[switch] > threshold, f"x{there[switch]:.2f} in the other mode"
        else:
            keep, why = switch in DEFAULT_ALL, "not measured: default"
        if keep:
            chosen.add(switch)
        reasons.append(f"{switch} {'on' if keep else 'off'} ({why})")
    return chosen, "; ".join(reasons)


def parse_configs(text: str) -> list[tuple[str, set | None, set]]:
    """(name, switches, extras) per configuration, in the given order. `all` (switches None) is resolved when
    it runs, from the results measured before it; `all+compile` adds switches to that set."""
    out = []
    for name in [c.strip() for c in text.split(",") if c.strip()]:
        parts = set(name.split("+"))
        unknown = parts - set(SWITCHES) - {"baseline", "all"}
        if unknown:
            raise SystemExit(f"unknown configuration {name!r}: use {', '.join(CONFIGS)}, or switches joined by '+' "
                             "(dedup+cache, all+compile).")
        if "all" in parts:
            out.append((name, None, parts - {"all", "baseline"}))
        else:
            out.append((name, parts - {"baseline"}, set()))
    return out


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    rows = ["| mode | config | status | median step (s) | seq/s | vs baseline | items/step | peak mem (GiB) "
            "| TFLOP/s | % of peak | vs research code | warm-up (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        rows.append(
            f"| {r['mode']} | {r['config']}{' (' + '+'.join(r['switches']) + ')' if r['config'].startswith('all') else ''} "
            f"| {r['status']} | {_fmt(r.get('median_step_s'), '.4f')} | {_fmt(r.get('sequences_per_s'), '.1f')} "
            f"| {_fmt(r.get('speedup_vs_baseline'), '.2f')}x | {_fmt(r.get('items_encoded_per_step'), '.0f')} "
            f"| {_fmt(r.get('peak_memory_gib'), '.2f')} | {_fmt(r.get('achieved_tflops'), '.2f')} "
            f"| {_fmt(None if r.get('fraction_of_peak') is None else 100 * r['fraction_of_peak'], '.1f')} "
            f"| {_fmt(r.get('ratio_to_reference'), '.2f')} | {_fmt(r.get('warmup_s'), '.1f')} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="full")
    parser.add_argument("--device", default=None, help="cuda / cpu / cuda:1 (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="users per step (default: 64 full, 8 small, 4 tiny)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (>= 20 for a report)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 3 with compile)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated among {', '.join(CONFIGS)}; switches combine with '+' (dedup+cache)")
    parser.add_argument("--modes", default=",".join(MODES), help="full-length and/or realistic")
    parser.add_argument("--realistic-configs", default=None, help="configurations for the realistic mode "
                        "(default: --configs)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="folder with MovieLens-100K's u.data (relative paths: from the repository root)")
    parser.add_argument("--output", default=None, help="JSON report (rewritten after every configuration)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune",
                                                                  "max-autotune-no-cudagraphs"),
                        help="torch.compile mode (reduce-overhead: CUDA graphs, with static shapes)")
    parser.add_argument("--all-switches", default=None, help="force the switches of `all` (comma-separated)")
    parser.add_argument("--cache-dtype", default=None, help="cache storage dtype (default: bfloat16 with bf16, "
                        "else float32)")
    parser.add_argument("--cache-batch-size", type=int, default=256, help="items per frozen forward when building")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="skip configurations that would start after this many seconds")
    parser.add_argument("--raise-errors", action="store_true", help="re-raise non-OOM errors (debugging)")
    parser.add_argument("--profile-configs", default=None,
                        help="comma-separated configuration names to profile (3 steps after timing, torch.profiler "
                             "table written under --profile-dir)")
    parser.add_argument("--profile-dir", default="benchmarks/results", help="folder for the profile tables")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    previous_threads = torch.get_num_threads()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        return _run(args, started, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, started: float, device: torch.device) -> dict:
    spec = size_spec(args.size)
    batch_size = args.batch_size or spec.batch_size
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0.")
    data_dir = Path(args.data_dir)
    if not data_dir.is_absolute():
        data_dir = REPO_ROOT / data_dir
    name = device_name(device)
    kind = card_kind(name) if device.type == "cuda" else None
    peak_tflops = args.peak_tflops or (PEAK_BF16_TFLOPS.get(kind) if kind else None)
    reference = REFERENCE_SEQ_PER_S.get(kind) if kind and args.size == "full" and batch_size == 64 else None
    flops = flop_model(spec)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}: use {', '.join(MODES)}.")
    configs = {mode: parse_configs(args.configs) for mode in modes}
    if "realistic" in configs and args.realistic_configs:
        configs["realistic"] = parse_configs(args.realistic_configs)
    # one set of random weights for every configuration; the sdpa template is a copy with sdpa backbones
    template = build_model(spec, "eager", seed=args.seed)
    templates = {"eager": template}
    if any(s is None or "sdpa" in s for mode in modes for _, s, _ in configs[mode]):
        templates["sdpa"] = set_backbone_attention(copy.deepcopy(template), "sdpa")
    report = {
        "benchmark": "pmmrec_hf training-step throughput (model step only: forward + backward + AdamW step)",
        "arguments": vars(args),
        "size": args.size,
        "device": str(device),
        "device_name": name,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "cuda": torch.version.cuda if device.type == "cuda" else None},
        "protocol": {
            "batch_size_users": batch_size, "max_length_L": spec.max_length, "slots_per_user": spec.max_length + 1,
            "text_tokens": spec.text_tokens, "image_size": spec.image_size,
            "trainable_top_blocks": spec.trainable_layers, "d": spec.hidden, "steps": args.steps,
            "warmup": args.warmup, "optimizer": "AdamW lr 1e-4 (wd 0 towers, 0.1 rest)",
            "objectives": "0.6 next-item + 0.4 NICL (the research code's; no NID/RCL)",
            "model_mode": "train (dropout on)",
            "timing": "per step: batch built and synchronised outside, step timed with device synchronisation; "
                      "sequences/s = users / median step time",
            "baseline": "eager attention, fp32, torch-default AdamW, every slot of the B x (L+1) grid encoded as its "
                        "own item (padding and repeats included) like the research code",
        },
        "model": {
            "parameters": sum(p.numel() for p in template.parameters()),
            "trainable_parameters": sum(p.numel() for p in template.parameters() if p.requires_grad),
        },
        "flop_model": flops,
        "peak_tflops": peak_tflops,
        "peak_tflops_note": ("dense bf16 peak, 989 TFLOP/s taken for H100 SXM and H200" if peak_tflops and not
                             args.peak_tflops else ("given by --peak-tflops" if args.peak_tflops else
                                                    "unknown device: no fraction of peak")),
        "reference": ({"card": kind, "sequences_per_s": reference, "source": "performance.md (research code, "
                       "fp16 autocast, eager attention, batch 64)"} if reference else None),
        "modes": {},
        "results": [],
    }

    def save():
        report["elapsed_s"] = time.perf_counter() - started
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(args.output) + ".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            os.replace(tmp, args.output)

    for mode in modes:
        total_steps = (max(args.warmup, 3) + args.steps)
        data = make_mode_data(mode, spec, batch_size, total_steps, data_dir, args.seed)
        report["modes"][mode] = data.stats(spec.max_length + 1)
        catalogue = Catalogue(data.num_items, spec, device, data.log_q, seed=args.seed,
                              text_lengths=data.text_lengths)
        mode_results: list = []
        for name_, switches, extras in configs[mode]:
            if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
                result = {"mode": mode, "config": name_, "switches": sorted(switches or extras),
                          "status": "skipped (time budget)"}
            else:
                note = None
                if switches is None:
                    other = [r for r in report["results"] if r["mode"] != mode]
                    switches, note = resolve_all(mode_results, other, args.all_switches)
                    if extras:
                        switches = switches | extras
                        note += f"; + {'+'.join(sorted(extras))} (asked)"
                result = run_config(name_, switches, data, catalogue, templates, args, spec, flops, device)
                if note:
                    result["switches_chosen_by"] = note
            base = next((r for r in mode_results if r["config"] == "baseline" and r["status"] == "ok"), None)
            if result["status"] == "ok":
                if base is not None:
                    result["speedup_vs_baseline"] = result["sequences_per_s"] / base["sequences_per_s"]
                result["fraction_of_peak"] = result["achieved_tflops"] / peak_tflops if peak_tflops else None
                result["ratio_to_reference"] = result["sequences_per_s"] / reference if reference else None
            mode_results.append(result)
            report["results"].append(result)
            print(f"[{time.perf_counter() - started:7.1f}s] {mode:11s} {name_:12s} {result['status']:8s} "
                  f"median {_fmt(result.get('median_step_s'), '.4f')} s  "
                  f"{_fmt(result.get('sequences_per_s'), '.1f')} seq/s  "
                  f"x{_fmt(result.get('speedup_vs_baseline'), '.2f')}", flush=True)
            save()
        del catalogue
        _free(device)
    save()
    print()
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}; size {args.size}, "
          f"batch {batch_size} users, {args.steps} timed steps after {args.warmup} warm-up")
    for mode, stats in report["modes"].items():
        print(f"{mode}: {stats['source']}; {stats['mean_real_items_per_step']:.0f} real / "
              f"{stats['slots_per_step']} slots, {stats['mean_distinct_items_per_step']:.0f} distinct items per step; "
              f"text: {stats['text_tokens_source']}")
    print(f"FLOP model: {flops['forward_gflop_per_item']:.2f} GFLOP forward per item "
          f"({flops['forward_frozen_gflop_per_item']:.2f} frozen), {flops['backward_gflop_per_item']:.2f} backward")
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
