"""Inference API: embed a catalogue once, recommend next items for histories, add new items at serve time.

PMMRec represents items by their text and image only, so a trained model serves items it has never seen:
:meth:`Recommender.add_items` embeds new items from raw text and image and they are recommendable at once,
without retraining (cold start).

Usage::

    from pmmrec_hf import PMMRecModel
    from pmmrec_hf.recommend import Recommender

    model = PMMRecModel.from_pretrained("path/to/checkpoint")
    rec = Recommender(model, tokenizer=tokenizer)          # default processor: the collator's item encoding
    rec.encode_catalogue(item_ids, texts=texts, images=images, batch_size=256)
    rec.save_catalogue("catalogue.safetensors")            # (I, d) matrix + ids in the metadata
    rec.recommend(["item_17", "item_4"], k=10)             # [(item_id, score), ...], best first
    rec.add_items(["new_1"], texts=["a new title"], images=[pil_image])
    index = rec.to_faiss_index("hnsw")                     # optional approximate search (faiss-cpu)
    rec.recommend(["item_17"], k=10, index=index)

Scoring is the evaluation protocol's (reference section 5): the user state is the user encoder's output at
the last slot of the history (its last ``max_position_embeddings`` items, left-padded), each item's score
is the dot product of that state with the item's embedding, and by default the items of the history are
excluded. Exact search runs :func:`pmmrec_hf.metrics.topk_items` (a running top-k over chunks of the
catalogue, so memory stays bounded for any catalogue size).

Works with any model that has ``encode_items(**item_inputs)``, ``encode_users(item_embeddings,
item_index)`` and a ``user_encoder``: :class:`~pmmrec_hf.PMMRecModel` and the ID baseline
:class:`~pmmrec_hf.sasrec.SASRecModel` (whose catalogue is encoded from ``{"item_ids": ...}`` inputs; it
cannot add unseen items, having no content encoder).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .processing_pmmrec import PMMRecProcessor

__all__ = [
    "CATALOGUE_FORMAT",
    "FAISS_KINDS",
    "FaissCatalogueIndex",
    "ITEM_INPUT_KEYS",
    "Recommender",
    "UnknownItemError",
    "catalogue_checksum",
    "default_processor",
    "load_catalogue_file",
    "save_catalogue_file",
]

#: Value of the ``format`` metadata key of a catalogue file (version 2 adds ``dtype`` and ``sha256``).
CATALOGUE_FORMAT = "pmmrec_catalogue/2"
_CATALOGUE_FORMATS_WITHOUT_CHECKSUM = ("pmmrec_catalogue/1",)
_TENSOR_NAME = "item_embeddings"

#: Keys of a processor's output that are passed to ``model.encode_items`` (anything else is dropped).
ITEM_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "text_features", "vision_features", "image_mask",
                   "item_ids")


class UnknownItemError(KeyError, ValueError):
    """Item ids that are not in the catalogue (a KeyError and a ValueError). ``item_ids``: the unknown ids."""

    def __init__(self, item_ids: Sequence[str]):
        self.item_ids = list(item_ids)
        shown = ", ".join(repr(i) for i in self.item_ids[:20])
        more = f" and {len(self.item_ids) - 20} more" if len(self.item_ids) > 20 else ""
        super().__init__(
            f"{len(self.item_ids)} item id(s) not in the catalogue: {shown}{more}. Add them with "
            "`Recommender.add_items` (from their text and image) first."
        )

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


# --------------------------------------------------------------------------------------------------
# catalogue files
# --------------------------------------------------------------------------------------------------


def _check_item_ids(item_ids: Any, what: str = "item_ids") -> list[str]:
    if isinstance(item_ids, (str, bytes)) or not isinstance(item_ids, Iterable):
        raise ValueError(f"`{what}` must be a list of string ids, got {type(item_ids).__name__}.")
    item_ids = list(item_ids)
    bad = [i for i in item_ids if not isinstance(i, str)]
    if bad:
        raise ValueError(f"`{what}` must hold string ids (the platform's ids); got {bad[:5]!r}.")
    seen: set[str] = set()
    duplicates = []
    for item in item_ids:
        if item in seen:
            duplicates.append(item)
        seen.add(item)
    if duplicates:
        raise ValueError(f"`{what}` contains duplicate ids: {duplicates[:10]!r}.")
    return item_ids


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def catalogue_checksum(item_ids: Sequence[str], item_embeddings: torch.Tensor) -> str:
    """sha256 (hex) of a catalogue: its ids (JSON, row order), dtype, shape and the tensor's bytes, so a
    changed value, a changed id or two swapped rows all change it."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(json.dumps(list(item_ids)).encode("utf-8") + b"\0")
    digest.update(f"{_dtype_name(item_embeddings.dtype)}{tuple(item_embeddings.shape)}".encode() + b"\0")
    data = item_embeddings.detach().cpu().contiguous()
    if data.numel():
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_catalogue_file(path: str, item_ids: Sequence[str], item_embeddings: torch.Tensor) -> None:
    """Write a catalogue as one safetensors file: tensor ``item_embeddings`` (I, d) and the metadata
    ``format`` = :data:`CATALOGUE_FORMAT`, ``item_ids`` = JSON list of the I string ids (row order),
    ``num_items``, ``dtype`` (the tensor's, kept) and ``sha256`` (:func:`catalogue_checksum`). The file is
    written atomically (a temporary sibling renamed into place when complete). Rows must be finite.
    safetensors caps its header (metadata included) at 100 MB, i.e. a few million ids of typical length."""
    from safetensors.torch import save_file

    from .atomic_io import atomic_file

    item_ids = _check_item_ids(item_ids)
    if not isinstance(item_embeddings, torch.Tensor) or item_embeddings.dim() != 2:
        raise ValueError("`item_embeddings` must be a 2-D tensor (I, d).")
    if item_embeddings.shape[0] != len(item_ids):
        raise ValueError(f"{item_embeddings.shape[0]} embedding rows for {len(item_ids)} item ids.")
    tensor = item_embeddings.detach().cpu().contiguous()
    _check_finite_rows(tensor, item_ids, f"the catalogue to write to {path}")
    metadata = {"format": CATALOGUE_FORMAT, "item_ids": json.dumps(item_ids), "num_items": str(len(item_ids)),
                "dtype": _dtype_name(tensor.dtype), "sha256": catalogue_checksum(item_ids, tensor)}
    with atomic_file(path) as tmp:
        save_file({_TENSOR_NAME: tensor}, str(tmp), metadata=metadata)


def _check_finite_rows(embeddings: torch.Tensor, item_ids: Sequence[str], where: str) -> None:
    if not embeddings.is_floating_point():
        raise ValueError(f"{where}: embeddings of dtype {_dtype_name(embeddings.dtype)}; a catalogue holds floats.")
    bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten().tolist() if embeddings.numel() else []
    if bad:
        shown = ", ".join(f"{row} ({item_ids[row]!r})" for row in bad[:10]) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{where}: {len(bad)} row(s) hold NaN or inf: row(s) {shown}. Every recommendation would "
                         "be NaN; re-encode these items (a diverged model gives such rows).")


def load_catalogue_file(path: str) -> tuple[list[str], torch.Tensor]:
    """Read a file written by :func:`save_catalogue_file`: (item ids, (I, d) tensor on the CPU in the stored
    dtype), bit-exact. Verified: the metadata, the stored ``dtype`` against the tensor's, the ``sha256``
    checksum (a changed value or id, or swapped rows, is refused) and that every row is finite (a refused
    row is named by index and id). A version-1 file (no checksum) loads with a warning."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        known = (CATALOGUE_FORMAT, *_CATALOGUE_FORMATS_WITHOUT_CHECKSUM)
        if metadata.get("format") not in known or "item_ids" not in metadata:
            raise ValueError(
                f"{path} is not a PMMRec catalogue file (metadata format {metadata.get('format')!r}, "
                f"expected {CATALOGUE_FORMAT!r} with an 'item_ids' entry)."
            )
        if _TENSOR_NAME not in handle.keys():
            raise ValueError(f"{path} has no '{_TENSOR_NAME}' tensor.")
        embeddings = handle.get_tensor(_TENSOR_NAME)
    item_ids = _check_item_ids(json.loads(metadata["item_ids"]))
    if embeddings.dim() != 2 or embeddings.shape[0] != len(item_ids):
        raise ValueError(f"{path}: tensor of shape {tuple(embeddings.shape)} for {len(item_ids)} item ids.")
    if metadata["format"] in _CATALOGUE_FORMATS_WITHOUT_CHECKSUM:
        warnings.warn(f"{path}: a {metadata['format']} catalogue file has no checksum; its integrity is not "
                      "checked (save it again to add one).", stacklevel=2)
    else:
        for key in ("dtype", "sha256"):
            if key not in metadata:
                raise ValueError(f"{path}: a {CATALOGUE_FORMAT} catalogue file without its '{key}' metadata entry.")
        if metadata["dtype"] != _dtype_name(embeddings.dtype):
            raise ValueError(f"{path}: the tensor is {_dtype_name(embeddings.dtype)} but the file says "
                             f"{metadata['dtype']}: the file was altered.")
        if catalogue_checksum(item_ids, embeddings) != metadata["sha256"]:
            raise ValueError(f"{path}: the checksum does not match the ids and embeddings (sha256 in the file "
                             f"{metadata['sha256'][:16]}...): the file was altered or corrupted (changed values or "
                             "ids, or reordered rows). Save the catalogue again.")
    _check_finite_rows(embeddings, item_ids, str(path))
    return item_ids, embeddings


# --------------------------------------------------------------------------------------------------
# processors and FAISS index
# --------------------------------------------------------------------------------------------------


def default_processor(model: Any, tokenizer: Any = None, image_processor: Any = None, **overrides: Any) -> Callable:
    """The collator's item-input encoding (:class:`pmmrec_hf.data.collator.ItemInputEncoder`, the class behind
    ``encode_item_inputs``) set up from the model's item-encoder config: modality, ``max_text_length``,
    ``image_size``, ``image_mean`` / ``image_std``. ``image_processor=None`` uses the research code's
    transform (squash + normalise); ``overrides`` win. Call it as ``processor(texts, images)``."""
    from .data.collator import ItemInputEncoder, item_input_settings

    item_config = getattr(getattr(model, "config", None), "item_encoder_config", None)
    if item_config is None:
        raise ValueError(
            f"{type(model).__name__} has no item-encoder config (an ID model?): it encodes no texts or images, "
            "so pass `processor=` or encode the catalogue from `item_inputs` (e.g. {'item_ids': ...})."
        )
    kwargs: dict[str, Any] = item_input_settings(item_config)
    kwargs.update(overrides)
    return ItemInputEncoder(tokenizer, image_processor, **kwargs)


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - exercised only without faiss
        raise ImportError(
            "FAISS export needs the `faiss` extra: `pip install faiss-cpu` (or faiss-gpu)."
        ) from error
    return faiss


@dataclass
class FaissCatalogueIndex:
    """A FAISS inner-product index over a catalogue and the item id of each of its rows.

    ``index``: ``faiss.IndexFlatIP`` (exact) or ``faiss.IndexHNSWFlat`` (METRIC_INNER_PRODUCT, approximate);
    ``item_ids``: the id of every index row; ``kind``: ``"flat_ip"`` or ``"hnsw"``; ``catalogue_token``:
    identifies the catalogue state it was exported from (a later ``add_items`` / ``encode_catalogue`` /
    ``load_catalogue`` makes it stale: re-export). Save ``index`` with ``faiss.write_index`` and keep
    ``item_ids`` next to it.
    """

    index: Any
    item_ids: list[str]
    kind: str
    catalogue_token: str | None = None

    def __len__(self) -> int:
        return len(self.item_ids)


FAISS_KINDS = ("flat_ip", "hnsw")


# --------------------------------------------------------------------------------------------------
# recommender
# --------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


class Recommender:
    """Next-item recommendation over a catalogue of item embeddings.

    Args:
        model: a :class:`~pmmrec_hf.PMMRecModel` (or any model with ``encode_items``, ``encode_users`` and a
            ``user_encoder``, e.g. :class:`~pmmrec_hf.sasrec.SASRecModel`). It stays where it is (device,
            dtype); every call runs it in eval mode under ``torch.inference_mode()`` and restores its mode.
        processor: callable ``processor(texts, images) -> dict`` of model inputs (``input_ids``,
            ``attention_mask``, ``pixel_values``, ``image_mask``) for raw items, e.g. a
            :class:`~pmmrec_hf.PMMRecProcessor`. Default: :func:`default_processor` built from ``tokenizer`` /
            ``image_processor`` (the collator's item encoding with the model's settings) when one is given; else the
            ``PMMRecProcessor`` saved with the model's checkpoint (``model.get_processor()``, what
            ``PMMRecModel.encode`` uses); otherwise only pre-encoded ``item_inputs`` can be embedded.
        tokenizer, image_processor: for the default processor (a tokenizer is needed unless vision-only).
        processor_kwargs: overrides for the default processor (e.g. ``lowercase=False``).
        batch_size: items embedded per forward pass, and histories encoded per user-encoder pass.
        chunk_size: catalogue rows scored at once by the exact top-k (memory O(users x chunk_size)).

    The catalogue (ids + (I, d) float32 matrix on the CPU; a copy on the model's device is cached for
    scoring) is filled by :meth:`encode_catalogue` or :meth:`load_catalogue` and grown by :meth:`add_items`.
    """

    def __init__(
        self,
        model: Any,
        processor: Callable | None = None,
        *,
        tokenizer: Any = None,
        image_processor: Any = None,
        processor_kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        chunk_size: int = 65536,
    ):
        for name in ("encode_items", "encode_users", "user_encoder"):
            if not hasattr(model, name):
                raise TypeError(f"`model` must have `{name}` (a PMMRecModel or SASRecModel), got {type(model).__name__}.")
        self.model = model
        if processor is None and getattr(getattr(model, "config", None), "item_encoder_config", None) is not None:
            modality = model.config.item_encoder_config.modality
            if tokenizer is not None or modality == "vision" or image_processor is not None or processor_kwargs:
                processor = default_processor(model, tokenizer, image_processor, **dict(processor_kwargs or {}))
            elif hasattr(model, "get_processor"):
                # the PMMRecProcessor saved with the checkpoint (PMMRecModel.get_processor / encode use it too)
                try:
                    processor = model.get_processor()
                except ValueError:
                    processor = None
        self.processor = processor
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        self._item_ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._embeddings: torch.Tensor | None = None
        self._token: str | None = None
        self._device_copy: tuple[str | None, torch.Tensor] | None = None

    # ---- model facts
    @property
    def hidden_size(self) -> int:
        return int(self.model.user_encoder.config.hidden_size)

    @property
    def max_length(self) -> int:
        """How many of the last history items the user encoder reads (its ``max_position_embeddings``)."""
        return int(self.model.user_encoder.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.model.parameters()).dtype
        except (StopIteration, AttributeError):
            return torch.float32

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()

    # ---- catalogue state
    @property
    def item_ids(self) -> list[str]:
        """The catalogue's ids, in row order (a copy)."""
        return list(self._item_ids)

    @property
    def item_embeddings(self) -> torch.Tensor:
        """(I, d) float32 catalogue matrix on the CPU; row i is ``item_ids[i]``."""
        if self._embeddings is None:
            raise ValueError("The catalogue is empty: call `encode_catalogue` or `load_catalogue` first.")
        return self._embeddings

    @property
    def num_items(self) -> int:
        return len(self._item_ids)

    def __len__(self) -> int:
        return len(self._item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def item_embedding(self, item_id: str) -> torch.Tensor:
        """(d,) the catalogue embedding of one item."""
        return self.item_embeddings[self.rows([item_id])[0]]

    def rows(self, item_ids: Sequence[str]) -> list[int]:
        """Catalogue rows of these ids; :class:`UnknownItemError` naming every unknown id."""
        unknown = [i for i in dict.fromkeys(item_ids) if i not in self._rows]
        if unknown:
            raise UnknownItemError(unknown)
        return [self._rows[i] for i in item_ids]

    def _set_catalogue(self, item_ids: list[str], embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[0] != len(item_ids):
            raise ValueError(f"{tuple(embeddings.shape)} embeddings for {len(item_ids)} item ids.")
        if embeddings.shape[1] != self.hidden_size:
            raise ValueError(
                f"Catalogue embeddings have size {embeddings.shape[1]}, the model's user encoder {self.hidden_size}."
            )
        self._item_ids = item_ids
        self._rows = {item: row for row, item in enumerate(item_ids)}
        self._embeddings = embeddings
        self._changed()

    def _changed(self) -> None:
        self._token = uuid.uuid4().hex
        self._device_copy = None

    def _scoring_matrix(self) -> torch.Tensor:
        """The catalogue on the model's device (cached until the catalogue changes)."""
        if self._device_copy is None or self._device_copy[0] != self._token:
            self._device_copy = (self._token, self.item_embeddings.to(self.device))
        return self._device_copy[1]

    # ---- embedding items
    def _to_model(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for key in ITEM_INPUT_KEYS:
            if key in batch and batch[key] is not None:
                value = torch.as_tensor(batch[key])
                dtype = self.dtype if value.is_floating_point() else None
                out[key] = value.to(device=self.device, dtype=dtype)
        if not out:
            raise ValueError(f"An item-input batch has none of the model input keys {ITEM_INPUT_KEYS}: {list(batch)}.")
        return out

    def _embed_batches(self, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
        pieces = []
        with self._inference():
            for batch in batches:
                emb = self.model.encode_items(**self._to_model(batch))
                pieces.append(emb.float().cpu())
        if not pieces:
            return torch.zeros(0, self.hidden_size)
        return torch.cat(pieces).clone()  # a normal (non-inference) tensor: rows can be replaced later

    def _raw_batches(self, texts: Sequence[Any] | None, images: Sequence[Any] | None, count: int, batch_size: int,
                     keep=None):
        if self.processor is None:
            raise ValueError(
                "Embedding raw texts/images needs a processor: pass `processor=` or `tokenizer=` to Recommender "
                "(or give pre-encoded `item_inputs`)."
            )
        if texts is None and images is None:
            raise ValueError("Give `texts`, `images` or both.")
        for name, values in (("texts", texts), ("images", images)):
            if values is not None and len(values) != count:
                raise ValueError(f"{len(values)} {name} for {count} item ids.")
        for number, start in enumerate(range(0, count, batch_size)):
            stop = start + batch_size
            if keep is not None and not keep(number):
                continue
            yield self.processor(
                list(texts[start:stop]) if texts is not None else None,
                list(images[start:stop]) if images is not None else None,
            )

    def _encodes_raw_items(self) -> bool:
        """Raw items go through `PMMRecItemEncoder.encode` (the API users call themselves) when the processor is a
        `PMMRecProcessor`; a custom processor callable goes through `_raw_batches`."""
        return isinstance(self.processor, PMMRecProcessor) and hasattr(getattr(self.model, "item_encoder", None),
                                                                       "encode")

    def _encode_raw_items(self, texts, images, count: int, batch_size: int, keep=None) -> torch.Tensor:
        if texts is None and images is None:
            raise ValueError("Give `texts`, `images` or both.")
        for name, values in (("texts", texts), ("images", images)):
            if values is not None and len(values) != count:
                raise ValueError(f"{len(values)} {name} for {count} item ids.")
        pieces = []
        for number, start in enumerate(range(0, count, batch_size)):
            if keep is not None and not keep(number):
                continue
            stop = start + batch_size
            pieces.append(self.model.item_encoder.encode(
                list(texts[start:stop]) if texts is not None else None,
                list(images[start:stop]) if images is not None else None,
                processor=self.processor, batch_size=batch_size, convert_to_tensor=True,
            ))
        return torch.cat(pieces).clone() if pieces else torch.zeros(0, self.hidden_size)

    @staticmethod
    def _sliced(inputs: Mapping[str, Any], count: int, batch_size: int, keep=None):
        for number, start in enumerate(range(0, count, batch_size)):
            if keep is None or keep(number):
                yield {key: value[start : start + batch_size] for key, value in inputs.items()}

    def embed_items(
        self,
        count: int,
        item_inputs: Any = None,
        texts: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        batch_size: int | None = None,
        accelerator: Any = None,
    ) -> torch.Tensor:
        """(count, d) float32 CPU embeddings of items given raw (``texts`` / ``images``, or ``item_inputs`` as a
        ``(texts, images)`` tuple) or pre-encoded (``item_inputs``: one mapping of full tensors, sliced in
        batches, or an iterable of batch mappings, in order). Does not touch the catalogue.

        With an `accelerator` of N processes (``accelerate launch``; every process must call this with the same
        items), batch k is embedded by process k % N only and the results are gathered: every process returns
        all `count` rows, equal to what one process computes."""
        batch_size = _check_positive_int("batch_size", batch_size or self.batch_size)
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        mine = (lambda number: number % world == rank) if world > 1 else None  # batch k -> process k % N
        if isinstance(item_inputs, tuple) and len(item_inputs) == 2 and not any(
            isinstance(part, Mapping) for part in item_inputs
        ):
            if texts is not None or images is not None:
                raise ValueError("Give raw items either as `item_inputs=(texts, images)` or as `texts=` / `images=`.")
            texts, images = item_inputs
            item_inputs = None
        if item_inputs is None and self._encodes_raw_items():
            batches = None  # PMMRecItemEncoder.encode with the checkpoint's processor, batch by batch
            embeddings = self._encode_raw_items(texts, images, count, batch_size, keep=mine)
            if world > 1:
                from .distributed import gather_batches

                embeddings = gather_batches(embeddings.to(accelerator.device), count, batch_size, accelerator).cpu()
        elif item_inputs is None:
            batches = self._raw_batches(texts, images, count, batch_size, keep=mine)
        elif texts is not None or images is not None:
            raise ValueError("Give either pre-encoded `item_inputs` or raw `texts` / `images`, not both.")
        elif isinstance(item_inputs, Mapping):
            batches = self._sliced(item_inputs, count, batch_size, keep=mine)
        elif world > 1:  # batches of unknown sizes: each process embeds its own, the (number, rows) pairs are gathered
            from accelerate.utils import gather_object

            own = [(number, self._embed_batches([batch])) for number, batch in enumerate(item_inputs) if mine(number)]
            pieces = sorted(gather_object(own), key=lambda pair: pair[0])
            batches = None
            embeddings = torch.cat([rows for _, rows in pieces]) if pieces else torch.zeros(0, self.hidden_size)
        else:
            batches = item_inputs
        if batches is not None:
            embeddings = self._embed_batches(batches)
            if world > 1:  # this process's batches -> every row, in order
                from .distributed import gather_batches

                embeddings = gather_batches(embeddings.to(accelerator.device), count, batch_size, accelerator).cpu()
        if embeddings.shape[0] != count:
            raise ValueError(f"The item inputs gave {embeddings.shape[0]} embeddings for {count} item ids.")
        return embeddings

    def encode_catalogue(
        self,
        item_ids: Sequence[str],
        item_inputs: Any = None,
        *,
        texts: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        batch_size: int | None = None,
        accelerator: Any = None,
    ) -> torch.Tensor:
        """Embed every item once (batches of ``batch_size`` under ``torch.inference_mode()``) and make it the
        catalogue, replacing any previous one. Items: see :meth:`embed_items`; with an `accelerator` of N
        processes each embeds its share and every process ends with the whole catalogue. Returns the (I, d)
        matrix."""
        item_ids = _check_item_ids(item_ids)
        embeddings = self.embed_items(len(item_ids), item_inputs, texts, images, batch_size, accelerator=accelerator)
        self._set_catalogue(item_ids, embeddings)
        return embeddings

    def add_items(
        self,
        item_ids: Sequence[str],
        texts: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        *,
        item_inputs: Any = None,
        batch_size: int | None = None,
    ) -> None:
        """Add items at serve time from their raw text and image (cold start, no retraining): they are
        recommendable, and usable in histories, at once. An id already in the catalogue has its row
        **replaced** by the new embedding (its position in ``item_ids`` is kept); new ids are appended.
        FAISS indexes exported before are not updated (re-export)."""
        item_ids = _check_item_ids(item_ids)
        embeddings = self.embed_items(len(item_ids), item_inputs, texts, images, batch_size)
        if self._embeddings is None:
            self._set_catalogue(item_ids, embeddings)
            return
        if embeddings.shape[1] != self._embeddings.shape[1]:
            raise ValueError(f"New embeddings have size {embeddings.shape[1]}, the catalogue {self._embeddings.shape[1]}.")
        existing = [(row, self._rows[item]) for row, item in enumerate(item_ids) if item in self._rows]
        new = [(row, item) for row, item in enumerate(item_ids) if item not in self._rows]
        matrix = self._embeddings
        if existing:
            matrix = matrix.clone()
            src, dst = zip(*existing)
            matrix[list(dst)] = embeddings[list(src)]
        if new:
            matrix = torch.cat([matrix, embeddings[[row for row, _ in new]]])
            for _, item in new:
                self._rows[item] = len(self._item_ids)
                self._item_ids.append(item)
        self._embeddings = matrix
        self._changed()

    # ---- files
    def save_catalogue(self, path: str) -> None:
        """Write the catalogue as one safetensors file (see :func:`save_catalogue_file`)."""
        save_catalogue_file(path, self._item_ids, self.item_embeddings)

    def load_catalogue(self, path: str) -> None:
        """Replace the catalogue by one read from :meth:`save_catalogue`'s file (verified, see
        :func:`load_catalogue_file`; bit-exact for float32). The catalogue is float32: a float16 / bfloat16
        file is converted (exactly) and a float64 one rounded to float32, each with a warning."""
        item_ids, embeddings = load_catalogue_file(path)
        if embeddings.dtype != torch.float32:
            exact = embeddings.dtype in (torch.float16, torch.bfloat16)
            warnings.warn(f"{path}: a {_dtype_name(embeddings.dtype)} catalogue; converted to float32"
                          f"{' (exactly)' if exact else ' (rounded)'}.", stacklevel=2)
            embeddings = embeddings.float()
        self._set_catalogue(item_ids, embeddings)

    # ---- users
    def _history_rows(self, histories: Sequence[Sequence[str]]) -> list[list[int]]:
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise ValueError("`histories` must be a list of histories (lists of item ids).")
        unknown: dict[str, None] = {}
        for number, history in enumerate(histories):
            if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
                raise ValueError(f"History {number} must be a list of item ids, got {type(history).__name__}.")
            if len(history) == 0:
                raise ValueError(f"History {number} is empty: the user encoder needs at least one item.")
            for item in history:
                if item not in self._rows:
                    unknown[item] = None
        if unknown:
            raise UnknownItemError(list(unknown))
        return [[self._rows[item] for item in history] for history in histories]

    def _encode_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, d) user states (model dtype, model device) for histories given as catalogue rows."""
        length = self.max_length
        matrix = self._scoring_matrix()
        states = []
        with self._inference():
            for start in range(0, len(rows), self.batch_size):
                part = [history[-length:] for history in rows[start : start + self.batch_size]]
                distinct = sorted({row for history in part for row in history})
                position = {row: i for i, row in enumerate(distinct)}
                index = torch.full((len(part), length), -1, dtype=torch.long)
                for b, history in enumerate(part):
                    index[b, length - len(history) :] = torch.tensor([position[r] for r in history])
                sub = matrix[torch.tensor(distinct, device=matrix.device)].to(self.dtype)  # (N, d)
                out = self.model.encode_users(sub, index.to(self.device))
                states.append(out.user_embeddings)
        return torch.cat(states).clone()

    def encode_histories(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, d) user embeddings of histories (lists of catalogue ids, oldest first) on the model's device:
        the user encoder's state at the last slot of the last ``max_length`` items, left-padded."""
        return self._encode_rows(self._history_rows(histories))

    # ---- recommending
    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        exclude_seen: bool = True,
        index: FaissCatalogueIndex | Any = None,
    ) -> list[tuple[str, float]]:
        """The ``k`` best next items for one history (catalogue ids, oldest first) as ``(item_id, score)``
        pairs, best first; score = dot product of user state and item embedding. ``exclude_seen`` drops
        every item of the (whole) history. ``index``: search a FAISS index from :meth:`to_faiss_index`
        instead of the exact search. Fewer than ``k`` pairs only when the catalogue (minus the history) is
        smaller. Raises :class:`UnknownItemError` for ids not in the catalogue."""
        if isinstance(history, (str, bytes)):
            raise ValueError("`history` must be a list of item ids, not a single string.")
        return self.recommend_batch([history], k=k, exclude_seen=exclude_seen, index=index)[0]

    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude_seen: bool = True,
        index: FaissCatalogueIndex | Any = None,
    ) -> list[list[tuple[str, float]]]:
        """:meth:`recommend` for several histories at once (user encoder and scoring batched)."""
        k = _check_positive_int("k", k)
        rows = self._history_rows(histories)
        if not rows:
            return []
        users = self._encode_rows(rows)
        if index is not None:
            return self._search_faiss(index, users, rows, k, exclude_seen)
        from .metrics import topk_items

        matrix = self._scoring_matrix()
        k_search = min(k, matrix.shape[0])
        scores, found = topk_items(
            users, matrix, k_search, history=rows if exclude_seen else None, chunk_size=self.chunk_size
        )
        scores, found = scores.float().cpu().tolist(), found.cpu().tolist()
        results = []
        for b, history in enumerate(rows):
            seen = set(history) if exclude_seen else set()
            results.append(
                [(self._item_ids[j], float(s)) for s, j in zip(scores[b], found[b]) if j not in seen][:k]
            )
        return results

    # ---- FAISS
    def to_faiss_index(
        self,
        kind: str = "flat_ip",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
    ) -> FaissCatalogueIndex:
        """Export the catalogue to a FAISS inner-product index (needs ``faiss-cpu``, the ``faiss`` extra).

        ``kind="flat_ip"``: ``faiss.IndexFlatIP``, exact (same top-k as :meth:`recommend` up to float
        rounding); ``kind="hnsw"``: ``faiss.IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (approximate;
        ``hnsw_m`` links per node, ``ef_construction`` / ``ef_search`` beam widths). The index is a snapshot:
        re-export after :meth:`add_items`."""
        faiss = _import_faiss()
        if kind not in FAISS_KINDS:
            raise ValueError(f"`kind` must be one of {FAISS_KINDS}, got {kind!r}.")
        matrix = self.item_embeddings.float().contiguous().numpy()
        dim = matrix.shape[1]
        if kind == "flat_ip":
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, _check_positive_int("hnsw_m", hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = _check_positive_int("ef_construction", ef_construction)
            index.hnsw.efSearch = _check_positive_int("ef_search", ef_search)
        index.add(matrix)
        return FaissCatalogueIndex(index=index, item_ids=list(self._item_ids), kind=kind, catalogue_token=self._token)

    def _search_faiss(
        self, index: Any, users: torch.Tensor, rows: list[list[int]], k: int, exclude_seen: bool
    ) -> list[list[tuple[str, float]]]:
        if isinstance(index, FaissCatalogueIndex):
            if index.catalogue_token != self._token:
                warnings.warn(
                    "The FAISS index was exported from another catalogue state (items were added or the catalogue "
                    "was re-encoded since): its results miss those changes. Re-export with `to_faiss_index`.",
                    stacklevel=3,
                )
            faiss_index, index_ids = index.index, index.item_ids
        else:  # a bare faiss index: assumed to hold the current catalogue rows in order
            faiss_index, index_ids = index, self._item_ids
            if getattr(faiss_index, "ntotal", None) != len(index_ids):
                raise ValueError(
                    f"A bare FAISS index must hold the {len(index_ids)} catalogue rows in order; it holds "
                    f"{getattr(faiss_index, 'ntotal', '?')}. Pass the FaissCatalogueIndex from `to_faiss_index`."
                )
        total = faiss_index.ntotal
        seen_ids = [{self._item_ids[r] for r in history} if exclude_seen else set() for history in rows]
        # ask for k + |history| so that k items are left after dropping the seen ones
        k_search = min(k + max(len(s) for s in seen_ids), total)
        queries = users.float().cpu().contiguous().numpy()
        scores, found = faiss_index.search(queries, k_search)
        results = []
        for b, seen in enumerate(seen_ids):
            picked = []
            for score, j in zip(scores[b].tolist(), found[b].tolist()):
                if j < 0 or math.isinf(score):  # faiss pads with -1 when fewer results exist
                    continue
                item = index_ids[j]
                if item in seen:
                    continue
                picked.append((item, float(score)))
                if len(picked) == k:
                    break
            results.append(picked)
        return results
