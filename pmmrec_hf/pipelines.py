"""transformers pipelines for PMMRec checkpoints (custom pipelines, registered the transformers way).

Every item-encoder and full-model checkpoint the package saves lists them in its config's ``custom_pipelines``
and carries this file, so they load from a folder or a Hub repo with transformers alone::

    from transformers import pipeline

    embed = pipeline("pmmrec-item-embedding", model="me/pmmrec-item-encoder", trust_remote_code=True)
    embed("red cotton t-shirt")                                  # -> list of d floats
    embed({"text": "red cotton t-shirt", "image": pil_image})    # text and image (or "image" alone, vision models)
    embed(["a", "b"], normalize=True)                            # one embedding per input

    recommend = pipeline("pmmrec-recommendation", model="me/pmmrec", trust_remote_code=True)
    catalogue = {"i1": "red cotton t-shirt", "i2": {"text": "blue jeans", "image": img}, ...}
    recommend(["i1", "i7"], catalogue=catalogue, top_k=5)       # -> [{"item_id", "score"}, ...] best first

Tasks:

- ``pmmrec-item-embedding`` (:class:`PMMRecItemEmbeddingPipeline`): an item (a text, an image, or a dict with
  ``"text"`` / ``"image"``) -> its embedding (a list of floats; ``return_tensors=True``: a tensor). With a full
  model the embedding is the one it scores with (L2-normalised with ``next_item_similarity="cosine"``).
- ``pmmrec-recommendation`` (:class:`PMMRecRecommendationPipeline`, full models): a history (item ids of the
  catalogue, oldest first, or raw items) -> the ``top_k`` next items of the catalogue, scored as in evaluation
  (dot product of the user state with each item embedding), the history's items excluded unless
  ``exclude_history=False``. The catalogue's embeddings are computed once per catalogue object and cached.

This file travels with the checkpoints (``trust_remote_code`` loading): it imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

ITEM_EMBEDDING_TASK = "pmmrec-item-embedding"
RECOMMENDATION_TASK = "pmmrec-recommendation"


def _task_entry(class_name: str) -> dict[str, Any]:
    return {"impl": f"pipelines.{class_name}", "pt": ["AutoModel"], "tf": [], "type": "multimodal"}


def custom_pipelines_for(model_type: str) -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of a saved config of this model type (empty: no pipeline)."""
    tasks = {}
    if model_type in ("pmmrec_item_encoder", "pmmrec"):
        tasks[ITEM_EMBEDDING_TASK] = _task_entry("PMMRecItemEmbeddingPipeline")
    if model_type == "pmmrec":
        tasks[RECOMMENDATION_TASK] = _task_entry("PMMRecRecommendationPipeline")
    return tasks


def _split_item(item: Any) -> tuple[Any, Any]:
    """(text, image) of one raw item: a text, an image, or a dict with "text" and / or "image"."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict):
        unknown = set(item) - {"text", "image"}
        if unknown:
            raise ValueError(f"An item dict takes 'text' and 'image', got {sorted(unknown)}.")
        return item.get("text"), item.get("image")
    return None, item  # an image (PIL image, bytes, path, array)


class _PMMRecPipelineBase(Pipeline):
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.processor is None:
            self.processor = self.model.get_processor()
        self._item_config = getattr(self.model.config, "item_encoder_config", self.model.config)

    def _item_inputs(self, items: list[Any]) -> dict[str, torch.Tensor]:
        texts, images = zip(*(_split_item(item) for item in items)) if items else ((), ())
        modality = self._item_config.modality
        if modality != "vision" and any(t is None for t in texts):
            raise ValueError(f"This model (modality {modality!r}) embeds items from their text: every item needs one.")
        if modality == "vision" and any(i is None for i in images):
            raise ValueError("This model (modality 'vision') embeds items from their image: every item needs one.")
        return self.processor(text=list(texts) if modality != "vision" else None,
                              images=list(images) if modality != "text" else None)

    def _embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if hasattr(self.model, "encode_items"):  # a full model: the embeddings it scores with
            return self.model.encode_items(**inputs)
        return self.model(**inputs).item_embeddings


class PMMRecItemEmbeddingPipeline(_PMMRecPipelineBase):
    """Item embeddings from text and / or image (see the module docstring)."""

    def _sanitize_parameters(self, normalize: bool | None = None, return_tensors: bool | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"Unexpected argument(s) {sorted(kwargs)}: this pipeline takes `normalize` and "
                            "`return_tensors`.")
        post = {}
        if normalize is not None:
            post["normalize"] = normalize
        if return_tensors is not None:
            post["return_tensors"] = return_tensors
        return {}, {}, post

    def preprocess(self, item: Any) -> dict[str, torch.Tensor]:
        return self._item_inputs([item])

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"item_embeddings": self._embed(model_inputs)}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], normalize: bool = False, return_tensors: bool = False):
        embedding = model_outputs["item_embeddings"][0].float().cpu()
        if normalize:
            embedding = torch.nn.functional.normalize(embedding, dim=-1)
        return embedding if return_tensors else embedding.tolist()


class PMMRecRecommendationPipeline(_PMMRecPipelineBase):
    """Next-item recommendation from a history against a catalogue (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.model, "user_encoder") or not hasattr(self.model, "encode_users"):
            raise ValueError(f"'{RECOMMENDATION_TASK}' needs a full PMMRec model (item and user encoder), got "
                             f"{type(self.model).__name__}.")
        self._catalogue_key = None
        self._catalogue: tuple[list[str], torch.Tensor] | None = None

    def _sanitize_parameters(self, catalogue: Any = None, top_k: int | None = None, exclude_history: bool | None = None,
                             batch_size: int | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"Unexpected argument(s) {sorted(kwargs)}: this pipeline takes `catalogue`, `top_k`, "
                            "`exclude_history` and `batch_size`.")
        pre, post = {}, {}
        if catalogue is not None:
            pre["catalogue"] = catalogue
        if batch_size is not None:
            pre["catalogue_batch_size"] = batch_size
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
                raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
            post["top_k"] = top_k
        if exclude_history is not None:
            post["exclude_history"] = exclude_history
        return pre, {}, post

    def __call__(self, histories: Any, **kwargs: Any):
        """`histories`: one history (a list of item ids / raw items) or a list of histories; `catalogue` (required):
        {item_id: item} or a list of (item_id, item) pairs, an item being a text, an image or a dict."""
        single = isinstance(histories, (list, tuple)) and histories and not isinstance(histories[0], (list, tuple))
        if single:
            return super().__call__([list(histories)], **kwargs)[0]
        return super().__call__([list(h) for h in histories], **kwargs)

    def _catalogue_embeddings(self, catalogue: Any, batch_size: int) -> tuple[list[str], torch.Tensor]:
        key = (id(catalogue), len(catalogue))
        if self._catalogue_key != key:
            pairs = list(catalogue.items()) if isinstance(catalogue, dict) else [tuple(p) for p in catalogue]
            ids = [str(item_id) for item_id, _ in pairs]
            if len(set(ids)) != len(ids):
                raise ValueError("The catalogue has duplicate item ids.")
            if not ids:
                raise ValueError("The catalogue is empty.")
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(pairs), batch_size):
                    items = [item for _, item in pairs[start:start + batch_size]]
                    chunks.append(self._embed(self._item_inputs(items)).float())
            self._catalogue, self._catalogue_key = (ids, torch.cat(chunks)), key
        return self._catalogue

    def preprocess(self, history: list, catalogue: Any = None, catalogue_batch_size: int = 64) -> dict[str, Any]:
        if catalogue is None:
            raise ValueError("Pass the items to recommend from: `catalogue={item_id: text | image | {'text', 'image'}}`.")
        if not history:
            raise ValueError("A history needs at least one item.")
        ids, embeddings = self._catalogue_embeddings(catalogue, catalogue_batch_size)
        row_of = {item_id: row for row, item_id in enumerate(ids)}
        rows, raw = [], []
        for item in history:
            if isinstance(item, str) and item in row_of:
                rows.append(row_of[item])
            elif isinstance(item, str) and self._item_config.modality == "vision":
                raise ValueError(f"History item {item!r} is not a catalogue id (and a vision model has no text to "
                                 "embed it from).")
            else:
                rows.append(-1 - len(raw))  # a raw item, embedded in _forward
                raw.append(item)
        inputs = self._item_inputs(raw) if raw else None
        return {"rows": rows, "raw_inputs": inputs, "catalogue": (ids, embeddings)}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        ids, catalogue = model_inputs["catalogue"]
        catalogue = catalogue.to(self.device)
        rows = model_inputs["rows"]
        table = catalogue
        if model_inputs["raw_inputs"] is not None:
            raw = self._embed(model_inputs["raw_inputs"]).float()
            table = torch.cat([catalogue, raw])
            rows = [r if r >= 0 else len(ids) + (-1 - r) for r in rows]
        window = self.model.config.user_encoder_config.max_position_embeddings
        index = torch.tensor([rows[-window:]], dtype=torch.long, device=self.device)
        user = self.model.encode_users(table.to(self.model.dtype), index).user_embeddings.float()  # (1, d)
        scores = (user @ catalogue.T)[0]  # (I,)
        seen = sorted({r for r in rows if r < len(ids)})
        return {"scores": scores.cpu(), "seen": seen, "ids": ids}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int = 10, exclude_history: bool = True):
        scores = model_outputs["scores"].clone()
        if exclude_history and model_outputs["seen"]:
            scores[torch.tensor(model_outputs["seen"])] = float("-inf")
        available = int(torch.isfinite(scores).sum())
        k = min(top_k, available)
        values, indices = scores.topk(k)
        ids = model_outputs["ids"]
        return [{"item_id": ids[i], "score": float(v)} for v, i in zip(values.tolist(), indices.tolist())]


__all__ = [
    "ITEM_EMBEDDING_TASK",
    "RECOMMENDATION_TASK",
    "PMMRecItemEmbeddingPipeline",
    "PMMRecRecommendationPipeline",
    "custom_pipelines_for",
]
