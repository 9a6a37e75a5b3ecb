"""Batch building: user rows of the split files -> the model batch of ``docs/formats.md``.

A batch holds B user sequences and the N distinct items occurring in them, each tokenised and its image
processed once (:func:`encode_item_inputs`, the same code the serving API and catalogue encoding use).

Image placeholder policy (see :mod:`pmmrec_hf.data.image_processing`): an item without an image, or
whose image fails to decode, gets the all-zeros pixel tensor (the normalisation mean: a constant
mid-grey image with the default mean = std = 0.5), and a multi-modal batch marks it in ``image_mask``
(False), so that the item encoder embeds it from its text alone and NICL never treats the placeholder as
an image. Both cases are counted in ``stats``
(``images_missing`` / ``images_undecodable``, one count per item occurrence in a processed batch, summed
over DataLoader worker processes); an undecodable image is logged once per item id and process, and
never stops the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .corruption import corrupt_sequences
from .image_processing import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, PMMRecImageTransform, is_missing_image, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "ItemInputEncoder",
    "ItemTable",
    "PMMRecCollator",
    "PMMRecEvalCollator",
    "encode_item_inputs",
]

MODALITIES = ("multimodal", "text", "vision")
STAT_KEYS = ("images_missing", "images_undecodable")
_STAT_SLOTS = 64  # slot 0: main process; slots 1..63: DataLoader workers (worker id modulo 63)


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"`modality` must be one of {MODALITIES}, got {modality!r}.")
    return modality


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------------
# the item table


class ItemTable:
    """The items by integer id (row number of ``items.parquet``): ids, texts, images, train counts.

    Images are kept *encoded* (bytes / paths / the datasets ``{bytes, path}`` struct, or whatever was
    given) and decoded only when a batch needs them, in the process that builds the batch.

    Args:
        item_ids: the platform's item ids (strings), in integer-id order.
        texts: one text per item (None is read as "").
        images: one image value per item (see :func:`~pmmrec_hf.data.image_processing.load_image`; None
            for "no image"), or a ``datasets.Dataset`` with an ``image`` column (read lazily by rows).
        train_counts: occurrences of each item in the train split, for ``log_popularity``.
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        texts: Sequence[str | None] | None = None,
        images: Any = None,
        train_counts: Sequence[int] | None = None,
    ) -> None:
        self.item_ids = [str(i) for i in item_ids]
        n = len(self.item_ids)
        self.id_to_index = {item_id: index for index, item_id in enumerate(self.item_ids)}
        if len(self.id_to_index) != n:
            raise ValueError("`item_ids` are not unique.")
        self.texts = None if texts is None else ["" if t is None else str(t) for t in texts]
        if self.texts is not None and len(self.texts) != n:
            raise ValueError(f"{len(self.texts)} texts for {n} items.")
        self._image_dataset = None
        self._images = None
        if images is not None:
            if _is_hf_dataset(images):
                from datasets import Image

                dataset = images.select_columns(["image"]).with_format(None)
                if isinstance(dataset.features["image"], Image):
                    dataset = dataset.cast_column("image", Image(decode=False))
                self._image_dataset = dataset
            else:
                self._images = list(images)
            if len(images) != n:
                raise ValueError(f"{len(images)} images for {n} items.")
        self.train_counts = None
        self.log_popularity = None
        if train_counts is not None:
            counts = torch.as_tensor(np.asarray(train_counts, dtype=np.int64))
            if counts.shape != (n,):
                raise ValueError(f"`train_counts` must have one value per item ({n}), got shape {tuple(counts.shape)}.")
            if bool((counts < 0).any()):
                raise ValueError("`train_counts` must be non-negative.")
            self.train_counts = counts
            q = (counts.double() + 1.0) / (counts.double() + 1.0).sum()
            self.log_popularity = q.log().float()

    @classmethod
    def from_dataset(cls, items: Any) -> ItemTable:
        """From the items ``datasets.Dataset`` of a prepared folder (``load_items``) or any table with
        ``item_id`` and ``text`` and optionally ``image`` / ``train_count`` columns (a Dataset, a pandas
        DataFrame or a mapping of column lists). Images are not decoded."""
        if isinstance(items, ItemTable):
            return items
        if _is_hf_dataset(items):
            if getattr(items, "_indices", None) is not None:  # after select / shuffle / filter
                items = items.flatten_indices()
            items = items.with_format(None)
            columns = set(items.column_names)
            table = items.data
            return cls(
                table.column("item_id").to_pylist(),
                texts=table.column("text").to_pylist() if "text" in columns else None,
                images=items if "image" in columns else None,
                train_counts=table.column("train_count").to_pylist() if "train_count" in columns else None,
            )
        if hasattr(items, "to_dict") and hasattr(items, "columns"):  # pandas
            items = {c: items[c].tolist() for c in items.columns}
        if isinstance(items, Mapping):
            return cls(items["item_id"], texts=items.get("text"), images=items.get("image"),
                       train_counts=items.get("train_count"))
        raise TypeError(f"cannot build an ItemTable from {type(items).__name__}")

    @classmethod
    def from_prepared(cls, folder_or_hub_id: Any, **kwargs: Any) -> ItemTable:
        """From a prepared dataset folder (or Hub id), through ``pmmrec_hf.data.format.load_items``."""
        from .format import load_items

        items, _ = load_items(folder_or_hub_id, decode_images=False, **kwargs)
        return cls.from_dataset(items)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def has_texts(self) -> bool:
        return self.texts is not None

    @property
    def has_images(self) -> bool:
        return self._images is not None or self._image_dataset is not None

    def index(self, item: Any) -> int:
        """Integer id of an item given by its string id, or an integer id (checked)."""
        if isinstance(item, str):
            try:
                return self.id_to_index[item]
            except KeyError:
                raise KeyError(f"item {item!r} is not in the item table") from None
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < len(self.item_ids):
                raise KeyError(f"integer item id {int(item)} out of range [0, {len(self.item_ids)})")
            return int(item)
        raise TypeError(f"an item must be a string id or an integer id, got {type(item).__name__}")

    def get_texts(self, indices: Sequence[int]) -> list[str]:
        if self.texts is None:
            raise ValueError("this item table has no texts")
        return [self.texts[i] for i in indices]

    def get_images(self, indices: Sequence[int]) -> list[Any]:
        """The raw (still encoded) image values of these items."""
        if self._image_dataset is not None:
            indices = [int(i) for i in indices]
            return list(self._image_dataset[indices]["image"]) if indices else []
        if self._images is not None:
            return [self._images[i] for i in indices]
        raise ValueError("this item table has no images")


def _is_hf_dataset(value: Any) -> bool:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Dataset)


# --------------------------------------------------------------------------------------------------
# item inputs


class ItemInputEncoder:
    """Tokenises item texts and processes item images into ``input_ids`` / ``attention_mask`` /
    ``pixel_values``; counts missing and undecodable images (``stats``, shared with DataLoader workers).

    Args:
        tokenizer: any transformers tokenizer (required unless ``modality="vision"``).
        image_processor: any transformers image processor, or None for :class:`PMMRecImageTransform`
            (RGB, squash to ``image_size``, [0, 1], normalise with ``image_mean`` / ``image_std``).
        modality: ``"multimodal"``, ``"text"`` (no images) or ``"vision"`` (no texts).
        max_text_length: truncation length of the tokenised texts (padding is to the longest text).
        lowercase: lower-case texts before tokenising (the research code does).
        shared_stats: keep the image counters in shared memory, so that counts made in DataLoader
            workers add up in the main process (the collators turn this on).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        image_processor: Any = None,
        *,
        modality: str = "multimodal",
        max_text_length: int = 50,
        image_size: int = 224,
        image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
        image_std: Sequence[float] = DEFAULT_IMAGE_STD,
        lowercase: bool = True,
        shared_stats: bool = False,
    ) -> None:
        self.modality = _check_modality(modality)
        if modality != "vision" and tokenizer is None:
            raise ValueError(f"a `tokenizer` is required for modality {modality!r}.")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_length = _check_positive_int("max_text_length", max_text_length)
        self.lowercase = bool(lowercase)
        self.transform = PMMRecImageTransform(image_size, image_mean, image_std) if image_processor is None else None
        self._placeholder_shape: tuple[int, ...] | None = None
        # per-process counters in shared memory: every process writes only its own row (no races)
        self._counters = torch.zeros(_STAT_SLOTS, len(STAT_KEYS), dtype=torch.int64)
        if shared_stats:
            self._counters.share_memory_()
        self._logged_undecodable: set[str] = set()

    @property
    def uses_text(self) -> bool:
        return self.modality in ("multimodal", "text")

    @property
    def uses_images(self) -> bool:
        return self.modality in ("multimodal", "vision")

    # ---- statistics
    @property
    def stats(self) -> dict[str, int]:
        totals = self._counters.sum(dim=0).tolist()
        return dict(zip(STAT_KEYS, (int(t) for t in totals)))

    def reset_stats(self) -> None:
        self._counters.zero_()

    def _count(self, key: str, n: int) -> None:
        if n:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            slot = 0 if info is None else 1 + info.id % (_STAT_SLOTS - 1)
            self._counters[slot, STAT_KEYS.index(key)] += n

    # ---- texts
    def encode_texts(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor]:
        texts = ["" if t is None else str(t) for t in texts]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        encoded = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}

    # ---- images
    def _process(self, images: list[Any]) -> torch.Tensor:
        if self.transform is not None:
            return self.transform(images)
        out = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out, dtype=torch.float32)

    def _output_shape(self) -> tuple[int, ...]:
        if self.transform is not None:
            return self.transform.output_shape
        if self._placeholder_shape is None:
            from PIL import Image

            grey = Image.new("RGB", (32, 32), (128, 128, 128))
            self._placeholder_shape = tuple(self._process([grey]).shape[1:])
        return self._placeholder_shape

    def load_images(self, images: Sequence[Any], item_ids: Sequence[Any] | None = None) -> list[Any]:
        """Decode image values to PIL images; None (placeholder) for missing or undecodable ones,
        counted and (undecodable) logged once per item."""
        loaded = []
        missing = undecodable = 0
        for position, value in enumerate(images):
            if is_missing_image(value):
                missing += 1
                loaded.append(None)
                continue
            try:
                loaded.append(load_image(value))
            except Exception as error:  # noqa: BLE001 - any decoding failure gets the placeholder
                undecodable += 1
                loaded.append(None)
                key = str(item_ids[position]) if item_ids is not None else f"#{position}"
                if key not in self._logged_undecodable:
                    self._logged_undecodable.add(key)
                    logger.warning(
                        "item %s: image could not be decoded (%s: %s); using the placeholder image",
                        key, type(error).__name__, error,
                    )
        self._count("images_missing", missing)
        self._count("images_undecodable", undecodable)
        return loaded

    def encode_images(self, images: Sequence[Any], item_ids: Sequence[Any] | None = None) -> torch.Tensor:
        """(n, C, H, W) pixel values; placeholders (all zeros) for missing / undecodable images."""
        return self._encode_images(images, item_ids)[0]

    def _encode_images(self, images: Sequence[Any], item_ids: Sequence[Any] | None = None):
        """(pixel values, (n,) bool mask of the real images)."""
        loaded = self.load_images(images, item_ids)
        mask = torch.tensor([image is not None for image in loaded], dtype=torch.bool)
        real = [i for i, image in enumerate(loaded) if image is not None]
        if real:
            processed = self._process([loaded[i] for i in real])
            if self.image_processor is not None and self._placeholder_shape is None:
                self._placeholder_shape = tuple(processed.shape[1:])
            shape = tuple(processed.shape[1:])
        else:
            processed, shape = None, self._output_shape()
        if processed is not None and len(real) == len(loaded):
            return processed, mask
        pixel_values = torch.zeros((len(loaded), *shape), dtype=torch.float32)
        if processed is not None:
            pixel_values[torch.tensor(real, dtype=torch.long)] = processed
        return pixel_values, mask

    def __call__(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Any] | None = None,
        item_ids: Sequence[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` + ``attention_mask`` (when texts are given and the modality uses them) and
        ``pixel_values`` (when images are given and the modality uses them); multi-modal, also ``image_mask``
        (n,) bool, False where the image is missing or undecodable (a placeholder): the item encoder then
        embeds that item from its text alone, and NICL leaves its image out."""
        out: dict[str, torch.Tensor] = {}
        if self.uses_text and texts is not None:
            out.update(self.encode_texts(texts))
        if self.uses_images and images is not None:
            out["pixel_values"], mask = self._encode_images(images, item_ids)
            if self.uses_text:
                out["image_mask"] = mask
        return out


def encode_item_inputs(
    texts: Sequence[str | None] | None,
    images: Sequence[Any] | None,
    tokenizer: Any = None,
    image_processor: Any = None,
    *,
    max_text_length: int = 50,
    image_size: int = 224,
    image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
    image_std: Sequence[float] = DEFAULT_IMAGE_STD,
    lowercase: bool = True,
    item_ids: Sequence[Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for a list of raw items: ``input_ids`` / ``attention_mask`` (N, T) from ``texts``
    and ``pixel_values`` (N, 3, H, W) from ``images`` (PIL images, bytes, paths, ``{bytes, path}``;
    None -> placeholder). Pass ``texts=None`` or ``images=None`` to skip a modality. ``item_ids`` only
    name items in the log when an image cannot be decoded. For repeated calls (and image counters), keep
    an :class:`ItemInputEncoder`."""
    modality = "multimodal"
    if texts is None and images is None:
        raise ValueError("give `texts`, `images` or both.")
    if texts is None:
        modality = "vision"
    elif images is None:
        modality = "text"
    encoder = ItemInputEncoder(
        tokenizer, image_processor, modality=modality, max_text_length=max_text_length, image_size=image_size,
        image_mean=image_mean, image_std=image_std, lowercase=lowercase,
    )
    return encoder(texts, images, item_ids)


# --------------------------------------------------------------------------------------------------
# collators


def item_input_settings(item_config: Any) -> dict[str, Any]:
    """The item-input settings an item encoder config fixes: modality, text length, image size / mean / std."""
    return dict(
        modality=item_config.modality,
        max_text_length=item_config.max_text_length,
        image_size=item_config.image_size,
        image_mean=tuple(item_config.image_mean),
        image_std=tuple(item_config.image_std),
    )


def _row_items(row: Any) -> Sequence[Any]:
    if isinstance(row, Mapping):
        if "item_ids" not in row:
            raise KeyError("a user row needs an 'item_ids' field")
        return row["item_ids"]
    if isinstance(row, (list, tuple, np.ndarray, torch.Tensor)):
        return row.tolist() if hasattr(row, "tolist") else row
    raise TypeError(f"a user row must be a mapping with 'item_ids' or a sequence of items, got {type(row).__name__}")


def _left_pad(sequences: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):  # one slice assignment per row
        if seq:
            out[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
    return out


class PMMRecCollator:
    """Training collator: user rows -> the model batch of ``docs/formats.md``.

    Each row (``{"user_id", "item_ids": [...], ...}`` from a split file, or a plain list of items) is
    mapped to integer ids (string ids through the item table; integers are taken as integer ids), cut to
    its last ``max_length + 1`` items and left-padded with -1 to ``max_length + 1`` columns. The batch's
    distinct items are encoded once each.

    Returns ``item_ids`` (N,), ``input_ids`` / ``attention_mask`` (N, T) (not for ``modality="vision"``),
    ``pixel_values`` (N, 3, H, W) (not for ``modality="text"``), ``item_index`` (B, max_length + 1),
    ``item_log_popularity`` (N,) (when the table has train counts and ``return_log_popularity``), and,
    when ``replace_prob`` or ``shuffle_prob`` is positive, ``corrupted_index`` / ``noise_labels``
    (B, max_length) from :func:`corrupt_sequences` on ``item_index[:, :-1]``.

    Args:
        items: an :class:`ItemTable`, or the items ``datasets.Dataset`` / DataFrame / column mapping.
        tokenizer, image_processor, modality, max_text_length, image_size, image_mean, image_std,
            lowercase: see :class:`ItemInputEncoder`. ``modality="ids"`` encodes no item contents (for the
            ID-based SASRec baseline): the batch holds ``item_ids`` and ``item_index`` only.
        max_length: L, the number of input positions.
        replace_prob, shuffle_prob: corruption for NID / RCL (0 and 0: no corruption keys).
        seed: seeds the corruption generator. In the main process the stream continues across batches; in
            a DataLoader worker it is seeded from ``seed`` and the worker's seed (which DataLoader draws anew
            every epoch from the main RNG), so workers and epochs differ. None: torch's global RNG.

    Images are decoded when the collator is called, so with ``DataLoader(num_workers > 0)`` they are
    decoded in the workers. ``stats`` counts missing / undecodable images over all processes.
    """

    train = True

    def __init__(
        self,
        items: Any,
        tokenizer: Any = None,
        image_processor: Any = None,
        *,
        modality: str = "multimodal",
        max_length: int = 20,
        max_text_length: int = 50,
        image_size: int = 224,
        image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
        image_std: Sequence[float] = DEFAULT_IMAGE_STD,
        lowercase: bool = True,
        replace_prob: float = 0.0,
        shuffle_prob: float = 0.0,
        seed: int | None = None,
        return_log_popularity: bool = True,
    ) -> None:
        self.items = ItemTable.from_dataset(items)
        self.encoder = None
        if modality != "ids":
            self.encoder = ItemInputEncoder(
                tokenizer, image_processor, modality=modality, max_text_length=max_text_length,
                image_size=image_size, image_mean=image_mean, image_std=image_std, lowercase=lowercase,
                shared_stats=True,
            )
            if self.encoder.uses_text and not self.items.has_texts:
                raise ValueError(f"modality {modality!r} needs item texts, the item table has none.")
            if self.encoder.uses_images and not self.items.has_images:
                raise ValueError(f"modality {modality!r} needs item images, the item table has none.")
        self.max_length = _check_positive_int("max_length", max_length)
        for name, value in (("replace_prob", replace_prob), ("shuffle_prob", shuffle_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}.")
        self.replace_prob = float(replace_prob)
        self.shuffle_prob = float(shuffle_prob)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}.")
        self.seed = seed
        self.return_log_popularity = bool(return_log_popularity)
        self._generator: torch.Generator | None = None
        self._generator_owner: tuple | None = None

    @classmethod
    def from_config(cls, config: Any, items: Any, tokenizer: Any = None, image_processor: Any = None, **overrides: Any):
        """Settings from a ``PMMRecConfig`` (or a ``PMMRecItemEncoderConfig``): modality, text length,
        image size / mean / std, L (the user encoder's ``max_position_embeddings``) and, for training, the
        corruption probabilities when NID or RCL has a positive weight. ``overrides`` win."""
        item_config = getattr(config, "item_encoder_config", config)
        user_config = getattr(config, "user_encoder_config", None)
        kwargs: dict[str, Any] = item_input_settings(item_config)
        if user_config is not None:
            kwargs["max_length"] = user_config.max_position_embeddings
        if cls.train and hasattr(config, "replace_prob"):
            corrupt = getattr(config, "nid_weight", 0) > 0 or getattr(config, "rcl_weight", 0) > 0
            kwargs["replace_prob"] = config.replace_prob if corrupt else 0.0
            kwargs["shuffle_prob"] = config.shuffle_prob if corrupt else 0.0
        kwargs.update(overrides)
        return cls(items, tokenizer, image_processor, **kwargs)

    # ---- public state
    @property
    def modality(self) -> str:
        return "ids" if self.encoder is None else self.encoder.modality

    @property
    def corruption(self) -> bool:
        return self.replace_prob > 0.0 or self.shuffle_prob > 0.0

    @property
    def stats(self) -> dict[str, int]:
        """``images_missing`` / ``images_undecodable``: placeholder images used so far (all processes)."""
        return {} if self.encoder is None else self.encoder.stats

    def reset_stats(self) -> None:
        if self.encoder is not None:
            self.encoder.reset_stats()

    # ---- batch building
    def _integer_ids(self, row: Any) -> list[int]:
        return [self.items.index(item) for item in _row_items(row)]

    def _corruption_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        owner = (None, None) if info is None else (info.id, info.seed)
        if self._generator is None or self._generator_owner != owner:
            seed = self.seed if info is None else hash((self.seed, info.seed)) & 0x7FFF_FFFF_FFFF_FFFF
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_owner = owner
        return self._generator

    def model_inputs(self, sequences: Sequence[Sequence[int]], width: int) -> dict[str, torch.Tensor]:
        """The model batch for sequences of integer ids (each at most ``width`` long), left-padded to
        ``width`` columns: ``item_ids``, ``item_index`` and the encoded distinct items."""
        ids = _left_pad(sequences, width)
        real = ids >= 0
        unique, inverse = torch.unique(ids[real], sorted=True, return_inverse=True)
        item_index = torch.full_like(ids, -1)
        item_index[real] = inverse
        batch: dict[str, torch.Tensor] = {"item_ids": unique}
        if self.encoder is None:  # modality "ids": an ID model needs no item contents
            batch["item_index"] = item_index
            return batch
        indices = unique.tolist()
        texts = self.items.get_texts(indices) if self.encoder.uses_text else None
        images = self.items.get_images(indices) if self.encoder.uses_images else None
        names = [self.items.item_ids[i] for i in indices]
        batch.update(self.encoder(texts, images, item_ids=names))
        batch["item_index"] = item_index
        return batch

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        width = self.max_length + 1
        sequences = [self._integer_ids(row)[-width:] for row in rows]
        batch = self.model_inputs(sequences, width)
        if self.return_log_popularity and self.items.log_popularity is not None:
            batch["item_log_popularity"] = self.items.log_popularity[batch["item_ids"]]
        if self.corruption:
            corrupted, labels = corrupt_sequences(
                batch["item_index"][:, :-1], int(batch["item_ids"].numel()), self.replace_prob, self.shuffle_prob,
                generator=self._corruption_generator(),
            )
            batch["corrupted_index"] = corrupted
            batch["noise_labels"] = labels
        return batch


class PMMRecEvalCollator(PMMRecCollator):
    """Validation / test collator: the last item of each row is the target.

    Returns the model batch of the inputs (all but the last item, its last ``max_length``; ``item_index``
    (B, max_length), left-padded with -1; no popularity, no corruption) plus ``targets`` (B,) the integer
    id of each row's last item and ``history`` (B, H) the integer ids of every item before it (the whole
    row but the last item, not only the last ``max_length``), left-padded with -1 to the longest in the
    batch, for masking seen items in full ranking.
    """

    train = False

    def __init__(self, items: Any, tokenizer: Any = None, image_processor: Any = None, **kwargs: Any) -> None:
        for name in ("replace_prob", "shuffle_prob"):
            if kwargs.get(name):
                raise ValueError(f"`{name}` must be 0 for evaluation.")
        kwargs.setdefault("return_log_popularity", False)
        super().__init__(items, tokenizer, image_processor, **kwargs)

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        full = [self._integer_ids(row) for row in rows]
        for i, seq in enumerate(full):
            if len(seq) < 2:
                user = rows[i].get("user_id") if isinstance(rows[i], Mapping) else i
                raise ValueError(f"evaluation row {user!r} has {len(seq)} item(s); it needs at least 2 (inputs + target).")
        inputs = [seq[:-1][-self.max_length:] for seq in full]
        batch = self.model_inputs(inputs, self.max_length)
        if self.return_log_popularity and self.items.log_popularity is not None:
            batch["item_log_popularity"] = self.items.log_popularity[batch["item_ids"]]
        batch["targets"] = torch.tensor([seq[-1] for seq in full], dtype=torch.long)
        batch["history"] = _left_pad([seq[:-1] for seq in full], max((len(seq) - 1 for seq in full), default=0))
        return batch
