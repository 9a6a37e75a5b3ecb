"""A per-item cache of the frozen-part features of the PMMRec towers.

The embeddings and the lower blocks of both towers are frozen, so the hidden state entering the first
trainable block (`BackboneTower.frozen_features`) never changes for an item during training. A
`FeatureCache` computes it once per item and hands it back, so a training step runs only the trainable
top blocks, the fusion and the user encoder::

    cache = FeatureCache.create(model.item_encoder, num_items=len(items), path="cache/")  # or path=None
    cache.build(model.item_encoder, item_batches, batch_size=256)     # inference mode, in batches
    features = cache.lookup(batch["item_ids"], device="cuda")         # text_features, attention_mask,
    out = model(item_ids=batch["item_ids"], item_index=batch["item_index"], **features)  # vision_features

Storage, per item id (the integer ids of docs/formats.md, 0..num_items-1):
- ``text_features`` (T, H_text), ``text_mask`` (T,) and the tokenised length, padded with zeros / mask 0 to
  the cache's text length T (the item encoder's ``max_text_length``);
- ``vision_features`` (V, H_vision).
Either in memory (torch tensors, on any device) or in memory-mapped ``.npy`` files under a folder (numpy
memmap; bfloat16 is stored as its raw 16-bit pattern). The stored dtype is float32 by default; bfloat16 or
float16 halve the memory.

Invalidation: a fingerprint of the backbone configs, the frozen depth (``first_trainable``), a hash of the
frozen parameters' and buffers' values, the text length, the image size and normalisation (and any
``extra`` values the caller adds, e.g. the tokenizer name). ``is_valid_for(item_encoder)`` compares it;
loading a folder built for another fingerprint raises `FeatureCacheMismatchError` naming what differs,
unless asked to reset it (``on_mismatch="reset"``, or ``load_or_build(..., rebuild=True)``).

Padded text positions are irrelevant to the model: every later use of the text tokens is masked (the top
blocks' attention keys, the fusion keys, the masked means), so features stored at padding positions (zeros
here) do not change any item embedding; ``tests/test_feature_cache.py`` checks it.

This module imports only torch, numpy and the standard library (plus the package's modeling code).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .modeling_pmmrec import find_blocks

__all__ = ["FeatureCache", "FeatureCacheMismatchError", "compute_fingerprint"]

CACHE_FORMAT_VERSION = 2  # 2: image_missing (items whose image is a placeholder)
METADATA_FILE = "feature_cache.json"
_ARRAYS = ("text_features", "text_mask", "vision_features", "image_missing", "filled")

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# numpy has no bfloat16: it is stored as its raw 16-bit pattern
_NUMPY_STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}

# config fields that do not change what the frozen part computes
_IGNORED_CONFIG_KEYS = {
    "transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict",
    "dtype", "torch_dtype", "_name_or_path", "use_cache", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "tie_word_embeddings", "classifier_dropout", "is_decoder", "add_cross_attention",
    "projection_dim", "num_labels", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
}


class FeatureCacheMismatchError(ValueError):
    """A feature cache was built for another item encoder (different frozen part or preprocessing)."""


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(
            name, name
        )
    else:
        name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"Feature cache dtype must be one of {sorted(_DTYPES)} (or fp32/bf16/fp16), got {dtype!r}.")
    return name


def _clean_config(config) -> dict | None:
    if config is None:
        return None
    raw = config.to_dict()
    return {
        k: v for k, v in sorted(raw.items())
        if k not in _IGNORED_CONFIG_KEYS and not k.startswith("_") and "dropout" not in k
    }


def _hash_frozen_part(tower) -> str:
    """blake2b of the names, dtypes, shapes and values of every parameter and buffer outside the top blocks."""
    backbone = tower.backbone
    _, _, blocks = find_blocks(backbone)
    trainable_ids = {id(t) for block in list(blocks)[tower.first_trainable :] for t in
                     list(block.parameters()) + list(block.buffers())}
    digest = hashlib.blake2b(digest_size=16)
    named = list(backbone.named_parameters()) + list(backbone.named_buffers())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if id(tensor) in trainable_ids:
            continue
        data = tensor.detach()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            raw = data.reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
            digest.update(memoryview(raw))
    return digest.hexdigest()


def compute_fingerprint(item_encoder, extra: Mapping[str, Any] | None = None) -> dict:
    """What the frozen-part features of `item_encoder` depend on, as a JSON-able dict with a `digest`.

    Costs one pass over the frozen weights (a few seconds at the paper's size).
    """
    config = item_encoder.config
    info: dict[str, Any] = {"modality": config.modality}
    for kind, uses in (("text", config.uses_text), ("vision", config.uses_vision)):
        if not uses:
            continue
        tower = getattr(item_encoder, f"{kind}_tower")
        if tower.fully_trainable:
            raise ValueError(
                f"The {kind} tower is fully trainable ({kind}_trainable_layers=-1): it has no frozen part to cache."
            )
        info[f"{kind}_config"] = _clean_config(getattr(config, f"{kind}_config"))
        info[f"{kind}_num_blocks"] = tower.num_blocks
        info[f"{kind}_first_trainable"] = tower.first_trainable
        info[f"{kind}_frozen_hash"] = _hash_frozen_part(tower)
    if config.uses_text:
        info["max_text_length"] = config.max_text_length
    if config.uses_vision:
        info["image_size"] = config.image_size
        info["image_mean"] = list(config.image_mean)
        info["image_std"] = list(config.image_std)
    info["extra"] = dict(extra) if extra else {}
    info["digest"] = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()
    return info


def _differences(stored: Mapping, current: Mapping) -> list[str]:
    keys = sorted((set(stored) | set(current)) - {"digest"})
    return [key for key in keys if json.dumps(stored.get(key), sort_keys=True, default=str)
            != json.dumps(current.get(key), sort_keys=True, default=str)]


def _mismatch_message(where: str, stored: Mapping, current: Mapping) -> str:
    diff = _differences(stored, current)
    details = []
    for key in diff[:8]:
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            details.append(f"{key} (fields {', '.join(sub[:6])})")
        else:
            details.append(f"{key}: cache {a!r} vs model {b!r}")
    return (
        f"Feature cache {where} was built for another item encoder: {'; '.join(details) or 'digest differs'}. "
        "Its features are stale. Rebuild it (FeatureCache.load(..., on_mismatch='reset') then build(), or "
        "FeatureCache.load_or_build(..., rebuild=True)), or use a new folder."
    )


def _from_numpy(data: np.ndarray) -> torch.Tensor:
    if data.dtype == np.uint16:  # raw bfloat16 bit patterns
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def _as_long_ids(item_ids) -> torch.Tensor:
    ids = torch.as_tensor(item_ids)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"item ids must be integers, got {ids.dtype}.")
    return ids.reshape(-1).long()


def _encoder_device(item_encoder) -> torch.device:
    for param in item_encoder.parameters():
        return param.device
    return torch.device("cpu")


def prime_item_encoder(item_encoder) -> None:
    """Run each tower's frozen part once on a dummy item, so features can be fed to a fresh model.

    `BackboneTower.forward_from_features` needs the backbone's stem to be discovered by one raw forward;
    a model that only ever sees cached features (e.g. in a new process) gets it here.
    """
    config = item_encoder.config
    device = _encoder_device(item_encoder)
    if config.uses_text and item_encoder.text_tower._stem_names is None:
        ids = torch.ones(1, 2, dtype=torch.long, device=device)
        item_encoder.text_frozen_features(ids, torch.ones_like(ids))
    if config.uses_vision and item_encoder.vision_tower._stem_names is None:
        size = config.image_size
        item_encoder.vision_frozen_features(torch.zeros(1, 3, size, size, device=device))


class FeatureCache:
    """Frozen-part features of the text and vision towers, per item id; in memory or memory-mapped.

    Build with `FeatureCache.create` (empty) then `build` / `add`, or `FeatureCache.load(folder)`.
    Attributes: `num_items`, `dtype` (stored), `text_length` (T), `fingerprint` (dict), `path` (None in memory).
    """

    def __init__(
        self,
        num_items: int,
        fingerprint: Mapping[str, Any],
        path: str | os.PathLike | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str | None = None,
        text_length: int | None = None,
        uses_text: bool = True,
        uses_vision: bool = True,
    ):
        if not isinstance(num_items, int) or num_items <= 0:
            raise ValueError(f"`num_items` must be a positive integer, got {num_items!r}.")
        self.num_items = num_items
        self.fingerprint = dict(fingerprint)
        self.path = Path(path) if path is not None else None
        self._dtype_name = _dtype_name(dtype)
        if self.path is not None and device is not None and torch.device(device).type != "cpu":
            raise ValueError("A memory-mapped cache lives on the CPU; pass `device` to `lookup` instead.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.text_length = text_length
        self.uses_text = uses_text
        self.uses_vision = uses_vision
        self.text_shape: tuple[int, int] | None = None  # (T, H_text)
        self.vision_shape: tuple[int, int] | None = None  # (V, H_vision)
        self._arrays: dict[str, Any] = {}
        self._filled = self._new_filled()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        item_encoder,
        num_items: int,
        path: str | os.PathLike | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str | None = None,
        extra: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> "FeatureCache":
        """An empty cache for `item_encoder`'s frozen part: in memory (`path=None`, on `device`) or under `path`.

        `extra`: additional values the features depend on (tokenizer, dataset name...), part of the fingerprint.
        An existing cache folder is only replaced with `overwrite=True`.
        """
        config = item_encoder.config
        fingerprint = compute_fingerprint(item_encoder, extra)
        if path is not None:
            path = Path(path)
            if (path / METADATA_FILE).exists():
                if not overwrite:
                    raise FileExistsError(
                        f"{path} already holds a feature cache: load it with FeatureCache.load, or pass overwrite=True."
                    )
                cls._remove_files(path)
            path.mkdir(parents=True, exist_ok=True)
        cache = cls(
            num_items, fingerprint, path=path, dtype=dtype, device=device,
            text_length=config.max_text_length if config.uses_text else None,
            uses_text=config.uses_text, uses_vision=config.uses_vision,
        )
        if path is not None:
            cache._filled = cache._open_array("filled", (num_items,), np.bool_, mode="w+")
            cache._write_metadata()
        return cache

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        item_encoder=None,
        on_mismatch: str = "raise",
        extra: Mapping[str, Any] | None = None,
        in_memory: bool = False,
        device: torch.device | str | None = None,
        read_only: bool = False,
    ) -> "FeatureCache":
        """Open a cache folder (memory-mapped; `in_memory=True` copies it into tensors on `device`).

        With `item_encoder`, the stored fingerprint must match it (and `extra`; None: the stored extra values):
        else `on_mismatch="raise"` raises `FeatureCacheMismatchError`, `"reset"` empties the folder and returns a new
        empty cache for `item_encoder` (fill it with `build`).
        """
        if on_mismatch not in ("raise", "reset"):
            raise ValueError(f"`on_mismatch` must be 'raise' or 'reset', got {on_mismatch!r}.")
        path = Path(path)
        meta_file = path / METADATA_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"No feature cache in {path} (missing {METADATA_FILE}).")
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise FeatureCacheMismatchError(
                f"Feature cache {path} has format version {meta.get('format_version')!r}, this code reads "
                f"{CACHE_FORMAT_VERSION}: rebuild it."
            )
        if item_encoder is not None:
            extra = meta["fingerprint"].get("extra") if extra is None else extra
            current = compute_fingerprint(item_encoder, extra)
            if current["digest"] != meta["fingerprint"].get("digest"):
                if on_mismatch == "raise":
                    raise FeatureCacheMismatchError(_mismatch_message(str(path), meta["fingerprint"], current))
                return cls.create(item_encoder, meta["num_items"], path=path, dtype=meta["dtype"], extra=extra,
                                  overwrite=True)
        cache = cls(
            meta["num_items"], meta["fingerprint"], path=path, dtype=meta["dtype"], text_length=meta["text_length"],
            uses_text=meta["uses_text"], uses_vision=meta["uses_vision"],
        )
        mode = "r" if read_only else "r+"
        cache._filled = cache._open_array("filled", (cache.num_items,), np.bool_, mode=mode)
        if meta.get("text_shape"):
            cache.text_shape = tuple(meta["text_shape"])
            cache._arrays["text_features"] = cache._open_array("text_features", (cache.num_items, *cache.text_shape),
                                                               cache._numpy_dtype, mode=mode)
            cache._arrays["text_mask"] = cache._open_array("text_mask", (cache.num_items, cache.text_shape[0]),
                                                           np.bool_, mode=mode)
        if meta.get("vision_shape"):
            cache.vision_shape = tuple(meta["vision_shape"])
            cache._arrays["vision_features"] = cache._open_array(
                "vision_features", (cache.num_items, *cache.vision_shape), cache._numpy_dtype, mode=mode
            )
            cache._arrays["image_missing"] = cache._open_array("image_missing", (cache.num_items,), np.bool_, mode=mode)
        if item_encoder is not None:
            prime_item_encoder(item_encoder)
        return cache.to_memory(device) if in_memory else cache

    @classmethod
    def load_or_build(
        cls,
        path: str | os.PathLike,
        item_encoder,
        items,
        num_items: int,
        rebuild: bool = False,
        batch_size: int = 256,
        dtype: torch.dtype | str = torch.float32,
        extra: Mapping[str, Any] | None = None,
        **build_kwargs,
    ) -> "FeatureCache":
        """Open the cache under `path` if it matches `item_encoder`, else build it from `items`.

        A folder built for another fingerprint raises `FeatureCacheMismatchError` unless `rebuild=True`, which
        empties it and recomputes. Items missing from a matching cache are computed and added.
        """
        path = Path(path)
        if (path / METADATA_FILE).exists():
            cache = cls.load(path, item_encoder, on_mismatch="reset" if rebuild else "raise", extra=extra)
            if cache.num_items != num_items:
                if not rebuild:
                    raise FeatureCacheMismatchError(
                        f"Feature cache {path} holds {cache.num_items} items, {num_items} were asked for; "
                        "pass rebuild=True to rebuild it."
                    )
                cache = cls.create(item_encoder, num_items, path=path, dtype=dtype, extra=extra, overwrite=True)
        else:
            cache = cls.create(item_encoder, num_items, path=path, dtype=dtype, extra=extra)
        cache.build(item_encoder, items, batch_size=batch_size, skip_filled=True, **build_kwargs)
        return cache

    # ------------------------------------------------------------------ storage
    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self._dtype_name]

    @property
    def _numpy_dtype(self):
        return _NUMPY_STORAGE[self._dtype_name]

    @property
    def in_memory(self) -> bool:
        return self.path is None

    def _new_filled(self):
        return torch.zeros(self.num_items, dtype=torch.bool, device=self.device)

    def _open_array(self, name: str, shape: tuple, dtype, mode: str) -> np.memmap:
        file = self.path / f"{name}.npy"
        if mode == "w+":
            return np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=tuple(int(s) for s in shape))
        array = np.load(file, mmap_mode=mode)
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise FeatureCacheMismatchError(
                f"{file} has shape {array.shape} / {array.dtype}, its metadata says {tuple(shape)} / {np.dtype(dtype)}."
            )
        return array

    @staticmethod
    def _remove_files(path: Path) -> None:
        for name in _ARRAYS:
            (path / f"{name}.npy").unlink(missing_ok=True)
        (path / METADATA_FILE).unlink(missing_ok=True)

    def _metadata(self) -> dict:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "num_items": self.num_items,
            "dtype": self._dtype_name,
            "text_length": self.text_length,
            "uses_text": self.uses_text,
            "uses_vision": self.uses_vision,
            "text_shape": list(self.text_shape) if self.text_shape else None,
            "vision_shape": list(self.vision_shape) if self.vision_shape else None,
            "fingerprint": self.fingerprint,
        }

    def _write_metadata(self) -> None:
        if self.path is None:
            return
        tmp = self.path / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(self._metadata(), indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path / METADATA_FILE)

    def _allocate(self, kind: str, shape: tuple[int, int]) -> None:
        """Create the storage of one modality when its first features arrive (their width fixes the shape)."""
        if kind == "text":
            self.text_shape = (self.text_length, int(shape[1]))
            specs = {"text_features": ((self.num_items, *self.text_shape), "features"),
                     "text_mask": ((self.num_items, self.text_length), "mask")}
        else:
            self.vision_shape = (int(shape[0]), int(shape[1]))
            specs = {"vision_features": ((self.num_items, *self.vision_shape), "features"),
                     "image_missing": ((self.num_items,), "mask")}  # True: a placeholder image (image_mask False)
        for name, (full_shape, role) in specs.items():
            if self.path is not None:
                dtype = self._numpy_dtype if role == "features" else np.bool_
                self._arrays[name] = self._open_array(name, full_shape, dtype, mode="w+")
            else:
                dtype = self.dtype if role == "features" else torch.bool
                with torch.inference_mode(False):
                    self._arrays[name] = torch.zeros(full_shape, dtype=dtype, device=self.device)
        self._write_metadata()

    def _store(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        array = self._arrays[name]
        if isinstance(array, torch.Tensor):
            with torch.inference_mode(False), torch.no_grad():
                array[rows.to(array.device)] = values.to(device=array.device, dtype=array.dtype)
            return
        if array.dtype == np.uint16:  # raw bfloat16
            data = values.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        elif array.dtype == np.bool_:
            data = values.detach().bool().cpu().numpy()
        else:
            data = values.detach().float().cpu().numpy().astype(array.dtype, copy=False)
        array[rows.cpu().numpy()] = data

    def _fetch(self, name: str, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        array = self._arrays[name]
        if isinstance(array, torch.Tensor):
            return array[rows.to(array.device)].to(device, non_blocking=True)
        return _from_numpy(np.ascontiguousarray(array[rows.cpu().numpy()])).to(device)

    # ------------------------------------------------------------------ filling
    def add(
        self,
        item_ids,
        text_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> None:
        """Store frozen features for `item_ids` (N,): text (N, T', H) + mask (N, T'), vision (N, V, H), and
        `image_mask` (N,) (False: the vision features are a placeholder's; default: every image is real).

        Texts shorter than the cache's length T are padded (zeros, mask 0); longer ones are accepted only when
        the extra positions are padding (mask 0): tokenise with `max_length` = the item encoder's
        `max_text_length`, since truncating features afterwards is not the same as truncating the text.
        """
        ids = _as_long_ids(item_ids)
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_items:
            raise IndexError(f"item ids must lie in [0, {self.num_items}); got {int(ids.min())}..{int(ids.max())}.")
        if self.uses_text:
            if text_features is None:
                raise ValueError("This cache stores text features: pass `text_features` (and `text_mask`).")
            if text_features.dim() != 3 or text_features.shape[0] != ids.numel():
                raise ValueError(f"`text_features` must be (N={ids.numel()}, T, H), got {tuple(text_features.shape)}.")
            if text_mask is None:
                text_mask = torch.ones(text_features.shape[:2], dtype=torch.bool, device=text_features.device)
            if tuple(text_mask.shape) != tuple(text_features.shape[:2]):
                raise ValueError(f"`text_mask` must be {tuple(text_features.shape[:2])}, got {tuple(text_mask.shape)}.")
            text_mask = text_mask.bool()
            length = text_features.shape[1]
            if length > self.text_length:
                if text_mask[:, self.text_length :].any():
                    raise ValueError(
                        f"Texts of {length} tokens do not fit the cache's {self.text_length}: tokenise with "
                        f"truncation to max_length={self.text_length} (the item encoder's max_text_length)."
                    )
                text_features, text_mask = text_features[:, : self.text_length], text_mask[:, : self.text_length]
            elif length < self.text_length:
                pad = self.text_length - length
                text_features = torch.nn.functional.pad(text_features, (0, 0, 0, pad))
                text_mask = torch.nn.functional.pad(text_mask, (0, pad), value=False)
            if self.text_shape is None:
                self._allocate("text", tuple(text_features.shape[1:]))
            elif text_features.shape[2] != self.text_shape[1]:
                raise ValueError(
                    f"text features of width {text_features.shape[2]}, the cache holds {self.text_shape[1]}."
                )
            self._store("text_features", ids, text_features)
            self._store("text_mask", ids, text_mask)
        if self.uses_vision:
            if vision_features is None:
                raise ValueError("This cache stores vision features: pass `vision_features`.")
            if vision_features.dim() != 3 or vision_features.shape[0] != ids.numel():
                raise ValueError(
                    f"`vision_features` must be (N={ids.numel()}, V, H), got {tuple(vision_features.shape)}."
                )
            if self.vision_shape is None:
                self._allocate("vision", tuple(vision_features.shape[1:]))
            elif tuple(vision_features.shape[1:]) != self.vision_shape:
                raise ValueError(
                    f"vision features of shape {tuple(vision_features.shape[1:])}, the cache holds {self.vision_shape}."
                )
            self._store("vision_features", ids, vision_features)
            missing = torch.zeros(ids.numel(), dtype=torch.bool) if image_mask is None else ~image_mask.bool().cpu()
            self._store("image_missing", ids, missing)
        if isinstance(self._filled, torch.Tensor):
            self._filled[ids.to(self._filled.device)] = True
        else:
            self._filled[ids.cpu().numpy()] = True

    @staticmethod
    def _chunks(items, batch_size: int):
        sources = [items] if isinstance(items, Mapping) else items
        for source in sources:
            if "item_ids" not in source:
                raise ValueError(
                    "Each item batch needs `item_ids` (plus input_ids/attention_mask and/or pixel_values)."
                )
            total = len(source["item_ids"])
            for start in range(0, total, batch_size):
                yield {k: v[start : start + batch_size] for k, v in source.items()
                       if k in ("item_ids", "input_ids", "attention_mask", "pixel_values", "image_mask") and v is not None}

    def build(
        self,
        item_encoder,
        items: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
        batch_size: int = 256,
        skip_filled: bool = False,
        autocast_dtype: torch.dtype | None = None,
        check_fingerprint: bool = True,
        progress: bool = False,
    ) -> "FeatureCache":
        """Compute and store the frozen features of `items`, in inference mode, `batch_size` items at a time.

        `items`: one dict (e.g. a collator's output, or the whole catalogue) with `item_ids` (N,) and
        `input_ids` + `attention_mask` (N, T) and/or `pixel_values` (N, 3, H, W), or an iterable of such
        dicts. Inputs are moved to the encoder's device. `skip_filled`: do not recompute items already
        stored. `autocast_dtype` (e.g. torch.bfloat16): run the frozen part under autocast.
        """
        if check_fingerprint and not self.is_valid_for(item_encoder):
            raise FeatureCacheMismatchError(
                _mismatch_message(str(self.path or "(in memory)"), self.fingerprint,
                                  compute_fingerprint(item_encoder, self.fingerprint.get("extra")))
            )
        device = _encoder_device(item_encoder)
        done = 0
        for chunk in self._chunks(items, batch_size):
            ids = _as_long_ids(chunk["item_ids"])
            if skip_filled:
                keep = ~self.filled(ids)
                if not keep.any():
                    continue
                ids = ids[keep]
                chunk = {k: v[keep.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
            features: dict[str, torch.Tensor] = {}
            autocast = (
                torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(device.type, enabled=False)
            )
            with torch.inference_mode(), autocast:
                if self.uses_text:
                    if "input_ids" not in chunk:
                        raise ValueError("Building a text cache needs `input_ids` (and `attention_mask`).")
                    input_ids = chunk["input_ids"].to(device)
                    mask = chunk.get("attention_mask")
                    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                    if input_ids.shape[1] > self.text_length:
                        if mask[:, self.text_length :].any():
                            raise ValueError(
                                f"Texts of {input_ids.shape[1]} tokens do not fit the cache's {self.text_length}: "
                                f"tokenise with truncation to max_length={self.text_length}."
                            )
                        input_ids, mask = input_ids[:, : self.text_length], mask[:, : self.text_length]
                    features["text_features"] = item_encoder.text_frozen_features(input_ids, mask)
                    features["text_mask"] = mask
                if self.uses_vision:
                    if "pixel_values" not in chunk:
                        raise ValueError("Building a vision cache needs `pixel_values`.")
                    features["vision_features"] = item_encoder.vision_frozen_features(chunk["pixel_values"].to(device))
                    if chunk.get("image_mask") is not None:
                        features["image_mask"] = chunk["image_mask"]
            self.add(ids, **features)
            done += ids.numel()
            if progress:
                print(f"feature cache: {done} items computed, {self.num_filled}/{self.num_items} stored", flush=True)
        self.flush()
        return self

    # ------------------------------------------------------------------ reading
    def filled(self, item_ids) -> torch.Tensor:
        """(N,) bool: which of `item_ids` are stored."""
        ids = _as_long_ids(item_ids)
        if isinstance(self._filled, torch.Tensor):
            return self._filled[ids.to(self._filled.device)].cpu()
        return torch.from_numpy(np.asarray(self._filled[ids.cpu().numpy()]).copy())

    @property
    def num_filled(self) -> int:
        if isinstance(self._filled, torch.Tensor):
            return int(self._filled.sum())
        return int(np.count_nonzero(self._filled))

    def __len__(self) -> int:
        return self.num_filled

    def __contains__(self, item_id: int) -> bool:
        return 0 <= int(item_id) < self.num_items and bool(self.filled([int(item_id)])[0])

    def lookup(
        self,
        item_ids,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = torch.float32,
        trim: bool = False,
        check: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Features of `item_ids` (N,), ready for the model in place of input_ids / pixel_values.

        Returns `text_features` (N, T, H_text), `attention_mask` (N, T) long and `vision_features`
        (N, V, H_vision) (only the modalities the cache holds; multi-modal, also `image_mask` (N,) bool), on `device` (default: the cache's) in `dtype`
        (default float32, the dtype the backbones compute in; None keeps the stored dtype). An id may appear
        several times. `trim=True` drops trailing text positions that are padding for every looked-up item
        (exact, saves compute for short titles). `check=False` skips the "all ids stored" check (a device sync).
        """
        ids = _as_long_ids(item_ids)
        device = torch.device(device) if device is not None else self.device
        if check and ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= self.num_items:
                raise IndexError(f"item ids must lie in [0, {self.num_items}); got {int(ids.min())}..{int(ids.max())}.")
            stored = self.filled(ids)
            if not bool(stored.all()):
                missing = ids.cpu()[~stored].unique()
                raise KeyError(
                    f"{missing.numel()} item(s) not in the feature cache, e.g. {missing[:10].tolist()}: "
                    "build them first."
                )
        out: dict[str, torch.Tensor] = {}
        if self.uses_text:
            if self.text_shape is None:
                raise KeyError("The feature cache holds no text features yet.")
            features = self._fetch("text_features", ids, device)
            mask = self._fetch("text_mask", ids, device)
            if trim and ids.numel():
                valid_columns = mask.any(0).nonzero()
                keep = int(valid_columns.max()) + 1 if valid_columns.numel() else 1
                features, mask = features[:, :keep], mask[:, :keep]
            out["text_features"] = features.to(dtype) if dtype is not None else features
            out["attention_mask"] = mask.long()
        if self.uses_vision:
            if self.vision_shape is None:
                raise KeyError("The feature cache holds no vision features yet.")
            features = self._fetch("vision_features", ids, device)
            out["vision_features"] = features.to(dtype) if dtype is not None else features
            if self.uses_text:  # multi-modal: which items have a real image (see PMMRecItemEncoder.forward)
                out["image_mask"] = ~self._fetch("image_missing", ids, device).bool()
        return out

    def text_lengths(self, item_ids) -> torch.Tensor:
        """(N,) tokenised lengths (number of valid text positions) of `item_ids`."""
        return self._fetch("text_mask", _as_long_ids(item_ids), torch.device("cpu")).sum(1)

    # ------------------------------------------------------------------ validity, persistence
    def is_valid_for(self, item_encoder, extra: Mapping[str, Any] | None = None) -> bool:
        """Whether the stored features are those `item_encoder`'s frozen part computes (fingerprint match)."""
        extra = self.fingerprint.get("extra") if extra is None else extra
        return compute_fingerprint(item_encoder, extra)["digest"] == self.fingerprint.get("digest")

    def check_valid_for(self, item_encoder, extra: Mapping[str, Any] | None = None) -> None:
        """Raise `FeatureCacheMismatchError`, naming what differs, unless `is_valid_for(item_encoder)`."""
        extra = self.fingerprint.get("extra") if extra is None else extra
        current = compute_fingerprint(item_encoder, extra)
        if current["digest"] != self.fingerprint.get("digest"):
            where = str(self.path or "(in memory)")
            raise FeatureCacheMismatchError(_mismatch_message(where, self.fingerprint, current))

    @property
    def nbytes(self) -> int:
        """Bytes of feature storage (all items, filled or not)."""
        return int(sum(a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
                       for a in self._arrays.values()))

    def flush(self) -> None:
        """Write memory-mapped data to disk (no-op in memory)."""
        if self.path is None:
            return
        for array in list(self._arrays.values()) + [self._filled]:
            if isinstance(array, np.memmap):
                array.flush()
        self._write_metadata()

    def to_memory(self, device: torch.device | str | None = None) -> "FeatureCache":
        """An in-memory copy (torch tensors on `device`)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        copy = FeatureCache(self.num_items, self.fingerprint, path=None, dtype=self._dtype_name, device=device,
                            text_length=self.text_length, uses_text=self.uses_text, uses_vision=self.uses_vision)
        copy.text_shape, copy.vision_shape = self.text_shape, self.vision_shape
        for name, array in self._arrays.items():
            if isinstance(array, torch.Tensor):
                copy._arrays[name] = array.to(device, copy=True)
            else:
                copy._arrays[name] = _from_numpy(np.array(array)).to(device)
        filled = self._filled if isinstance(self._filled, torch.Tensor) else torch.from_numpy(np.array(self._filled))
        copy._filled = filled.to(device, copy=True)
        return copy

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> "FeatureCache":
        """Write this cache to a folder; returns the memory-mapped cache opened there."""
        path = Path(path)
        if (path / METADATA_FILE).exists():
            if not overwrite:
                raise FileExistsError(f"{path} already holds a feature cache (pass overwrite=True).")
            self._remove_files(path)
        path.mkdir(parents=True, exist_ok=True)
        target = FeatureCache(self.num_items, self.fingerprint, path=path, dtype=self._dtype_name,
                              text_length=self.text_length, uses_text=self.uses_text, uses_vision=self.uses_vision)
        target.text_shape, target.vision_shape = self.text_shape, self.vision_shape
        for name, array in self._arrays.items():
            source = array.cpu() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
            if source.dtype == torch.bfloat16:
                data = source.contiguous().view(torch.int16).numpy().view(np.uint16)
            else:
                data = source.numpy()
            target._arrays[name] = target._open_array(name, data.shape, data.dtype, mode="w+")
            target._arrays[name][...] = data
        filled = self._filled.cpu().numpy() if isinstance(self._filled, torch.Tensor) else np.asarray(self._filled)
        target._filled = target._open_array("filled", (self.num_items,), np.bool_, mode="w+")
        target._filled[...] = filled
        target.flush()
        return target

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else f"memory ({self.device})"
        return (f"FeatureCache(num_items={self.num_items}, filled={self.num_filled}, dtype={self._dtype_name}, "
                f"text={self.text_shape}, vision={self.vision_shape}, storage={where})")
