"""The PMMRec processor: an item's text and image -> the item encoder's inputs, exactly as in training.

- :class:`PMMRecImageProcessor` (a transformers image processor): convert to RGB (greyscale, palette, RGBA and
  CMYK images work; alpha is dropped), squash to ``image_size x image_size`` (PIL bilinear resize, no crop, aspect
  ratio not kept), scale to [0, 1], normalise per channel with ``image_mean`` / ``image_std``. A missing image
  (None) gets the all-zeros placeholder. This is the package's only image path: the training collator's
  :class:`pmmrec_hf.data.image_processing.PMMRecImageTransform` delegates to it.
- :class:`PMMRecProcessor` (a transformers ``ProcessorMixin``): the tokenizer (texts lower-cased when
  ``do_lower_case``, truncated to ``max_text_length`` tokens, padded to the longest) and the image processor,
  with the settings of the item encoder it was saved with. ``AutoProcessor.from_pretrained(folder_or_repo)``
  loads it (add ``trust_remote_code=True`` where ``pmmrec_hf`` is not installed).

This file travels with every item-encoder and full-model checkpoint (``trust_remote_code`` loading): it imports
only torch, numpy, PIL, transformers and the standard library.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin

PROCESSOR_CONFIG_NAME = "processor_config.json"
IMAGE_PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
MODALITIES = ("multimodal", "text", "vision")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, Mapping):
        return value.get("bytes") is None and not value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value) == 0
    return False


def to_pil_image(value: Any):
    """One image value -> a decoded ``PIL.Image`` (any mode): a PIL image, encoded bytes, a file path, a datasets
    ``{"bytes", "path"}`` struct, or an (H, W) / (H, W, C) uint8 array. None for a missing image."""
    from PIL import Image

    if _is_missing(value):
        return None
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, C), got dtype {array.dtype}.")
        image = Image.fromarray(array)
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__} (expected a PIL image, bytes, a path "
                        "or a uint8 array)")
    image.load()
    return image


def _check_settings(image_size: Any, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
    if len(image_mean) != 3 or len(image_std) != 3:
        raise ValueError("`image_mean` and `image_std` need 3 values (RGB).")
    if any(s <= 0 for s in image_std):
        raise ValueError(f"`image_std` values must be positive, got {list(image_std)!r}.")


class PMMRecImageProcessor(BaseImageProcessor):
    r"""PMMRec's image transform as a transformers image processor.

    Args:
        image_size (`int`, *optional*, defaults to 224): images are squashed to `image_size x image_size`.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`): per-channel mean (after [0, 1]).
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`): per-channel std.

    Call it on one image or a list (PIL images of any mode, bytes, paths, uint8 arrays; None for "no image"):
    returns a `BatchFeature` with `pixel_values` (n, 3, image_size, image_size) float32 and `image_mask` (n,) bool,
    False where the image was missing (its pixels are the all-zeros placeholder).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        for legacy in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "resample", "rescale_factor",
                       "size"):
            kwargs.pop(legacy, None)
        super().__init__(**kwargs)
        image_mean = list(image_mean) if image_mean is not None else list(DEFAULT_IMAGE_MEAN)
        image_std = list(image_std) if image_std is not None else list(DEFAULT_IMAGE_STD)
        _check_settings(image_size, image_mean, image_std)
        self.image_size = int(image_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        # what the transform does, written out for readers of preprocessor_config.json (not settings)
        self.do_convert_rgb = True
        self.size = {"height": self.image_size, "width": self.image_size}
        self.resample = 2  # PIL.Image.BILINEAR

    @classmethod
    def from_item_config(cls, item_config: Any) -> "PMMRecImageProcessor":
        """The image processor an item encoder was trained with (its config's image_size / image_mean / image_std)."""
        return cls(image_size=item_config.image_size, image_mean=item_config.image_mean,
                   image_std=item_config.image_std)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """(n, 3, size, size) float32 pixel values of decoded PIL images (None: not allowed here)."""
        from PIL import Image

        size = (self.image_size, self.image_size)
        arrays = []
        for image in images:
            if image.mode != "RGB":
                image = image.convert("RGB")
            if image.size != size:
                image = image.resize(size, Image.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.uint8))
        if not arrays:
            return torch.zeros((0, *self.output_shape), dtype=torch.float32)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return pixels.sub_(mean).div_(std).contiguous()

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        if images is None or not isinstance(images, (list, tuple)):
            images = [images]
        decoded = [to_pil_image(image) for image in images]
        mask = torch.tensor([image is not None for image in decoded], dtype=torch.bool)
        pixel_values = torch.zeros((len(decoded), *self.output_shape), dtype=torch.float32)
        real = [i for i, image in enumerate(decoded) if image is not None]
        if real:
            pixel_values[torch.tensor(real, dtype=torch.long)] = self.pixels([decoded[i] for i in real])
        data = {"pixel_values": pixel_values, "image_mask": mask}
        if return_tensors == "np":
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in (None, "pt"):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(data=data)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": type(self).__name__,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 2,
            **({"auto_map": self.auto_map} if getattr(self, "auto_map", None) else {}),
        }


def _read_json(path_or_repo: str | os.PathLike, name: str, **kwargs: Any) -> dict | None:
    from transformers.utils import cached_file

    options = {k: kwargs[k] for k in ("token", "revision", "cache_dir", "force_download", "local_files_only",
                                      "subfolder", "proxies") if kwargs.get(k) is not None}
    resolved = cached_file(os.fspath(path_or_repo), name, _raise_exceptions_for_missing_entries=False, **options)
    if resolved is None:
        return None
    with open(resolved, encoding="utf-8") as handle:
        return json.load(handle)


def _load_tokenizer(name: str, **kwargs: Any):
    """The tokenizer saved in `name`: the transformers class its tokenizer_config.json names (no Auto class, which
    would read the model config's auto_map and ask whether to trust remote code), else AutoTokenizer."""
    import transformers

    config = _read_json(name, "tokenizer_config.json", **kwargs) or {}
    class_name = config.get("tokenizer_class")
    tokenizer_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if tokenizer_class is None and isinstance(class_name, str) and not class_name.endswith("Fast"):
        tokenizer_class = getattr(transformers, class_name + "Fast", None)
    options = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    if tokenizer_class is not None:
        return tokenizer_class.from_pretrained(name, **options)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **kwargs)


class PMMRecProcessor(ProcessorMixin):
    r"""Tokenizer + image processor of a PMMRec item encoder, with the settings it was trained with.

    Args:
        image_processor ([`PMMRecImageProcessor`], *optional*): required unless `modality="text"`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the text backbone's tokenizer; required unless
            `modality="vision"`.
        do_lower_case (`bool`, *optional*, defaults to `True`): lower-case texts before tokenising (as in training).
        max_text_length (`int`, *optional*, defaults to 50): texts are truncated to this many tokens.
        modality (`str`, *optional*, defaults to `"multimodal"`): which inputs the item encoder reads.

    `processor(text=[...], images=[...])` returns a `BatchFeature` with `input_ids` / `attention_mask` (texts
    given), `pixel_values` / `image_mask` (images given; None in the list = no image), ready for
    `item_encoder(**inputs)`.
    """

    def __init__(
        self,
        image_processor: PMMRecImageProcessor | None = None,
        tokenizer: Any = None,
        do_lower_case: bool = True,
        max_text_length: int = 50,
        modality: str = "multimodal",
        **kwargs: Any,
    ) -> None:
        # ProcessorMixin.__init__ requires every sub-processor; a single-modality item encoder has only one.
        self.chat_template = kwargs.pop("chat_template", None)
        if kwargs:
            raise TypeError(f"Unexpected keyword argument(s) {sorted(kwargs)} for PMMRecProcessor.")
        if modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {MODALITIES}, got {modality!r}.")
        if modality != "vision" and tokenizer is None:
            raise ValueError(f"A tokenizer is required for modality {modality!r}.")
        if modality != "text" and image_processor is None:
            raise ValueError(f"An image processor is required for modality {modality!r}.")
        if isinstance(max_text_length, bool) or not isinstance(max_text_length, int) or max_text_length <= 0:
            raise ValueError(f"`max_text_length` must be a positive integer, got {max_text_length!r}.")
        self.image_processor = image_processor if modality != "text" else None
        self.tokenizer = tokenizer if modality != "vision" else None
        self.do_lower_case = bool(do_lower_case)
        self.max_text_length = int(max_text_length)
        self.modality = modality

    @classmethod
    def from_item_config(cls, item_config: Any, tokenizer: Any = None, image_processor: Any = None,
                         do_lower_case: bool = True) -> "PMMRecProcessor":
        """The processor of an item encoder (its config: modality, max_text_length, image settings)."""
        if image_processor is None and item_config.modality != "text":
            image_processor = PMMRecImageProcessor.from_item_config(item_config)
        return cls(image_processor=image_processor, tokenizer=tokenizer, do_lower_case=do_lower_case,
                   max_text_length=item_config.max_text_length, modality=item_config.modality)

    @property
    def model_input_names(self) -> list[str]:
        names = []
        if self.tokenizer is not None:
            names += ["input_ids", "attention_mask"]
        if self.image_processor is not None:
            names += ["pixel_values", "image_mask"]
        return names

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(modality={self.modality!r}, do_lower_case={self.do_lower_case}, "
                f"max_text_length={self.max_text_length}, tokenizer={type(self.tokenizer).__name__}, "
                f"image_processor={self.image_processor!r})")

    def encode_texts(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor]:
        texts = ["" if t is None else str(t) for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_length,
                                 return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}

    def __call__(self, text: Any = None, images: Any = None, return_tensors: str | None = "pt",
                 **kwargs: Any) -> BatchFeature:
        if kwargs:
            raise TypeError(f"Unexpected keyword argument(s) {sorted(kwargs)}: PMMRecProcessor takes `text`, `images` "
                            "and `return_tensors`.")
        if text is None and images is None:
            raise ValueError("Give `text` and/or `images`.")
        data: dict[str, Any] = {}
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("This item encoder reads no text (modality 'vision'): pass `images` only.")
            data.update(self.encode_texts([text] if isinstance(text, str) else list(text)))
        if images is not None:
            if self.image_processor is None:
                raise ValueError("This item encoder reads no images (modality 'text'): pass `text` only.")
            data.update(self.image_processor(images, return_tensors="pt"))
        if "input_ids" in data and "pixel_values" in data and len(data["input_ids"]) != len(data["pixel_values"]):
            raise ValueError(f"{len(data['input_ids'])} texts but {len(data['pixel_values'])} images: give one of each "
                             "per item (None for an item without an image).")
        if return_tensors == "np":
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in (None, "pt"):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(data=data)

    # ---- saving and loading (our own: a single-modality processor has one sub-processor only)
    def to_dict(self) -> dict[str, Any]:
        output = {"processor_class": type(self).__name__, "do_lower_case": self.do_lower_case,
                  "max_text_length": self.max_text_length, "modality": self.modality}
        if getattr(self, "auto_map", None):
            output["auto_map"] = self.auto_map
        return output

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any):
        """Write processor_config.json, the tokenizer's files and preprocessor_config.json (and, for a class
        registered for AutoProcessor, this file, so that the folder loads with `trust_remote_code`)."""
        if push_to_hub:
            raise ValueError("Save to a folder and publish it with pmmrec_hf.hub.push_pmmrec_to_hub.")
        from transformers.dynamic_module_utils import custom_object_save

        os.makedirs(save_directory, exist_ok=True)
        if self._auto_class is not None:
            custom_object_save(self, save_directory)
            self.auto_map = {self._auto_class: f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
            if self.image_processor is not None and type(self.image_processor).__name__ == "PMMRecImageProcessor":
                self.image_processor.auto_map = {
                    "AutoImageProcessor": f"{type(self.image_processor).__module__.split('.')[-1]}.PMMRecImageProcessor",
                    "AutoProcessor": self.auto_map[self._auto_class],
                }
        written = []
        if self.tokenizer is not None:
            written += list(self.tokenizer.save_pretrained(save_directory))
            self._tag_tokenizer_config(save_directory)
        if self.image_processor is not None:
            written += list(self.image_processor.save_pretrained(save_directory))
        path = os.path.join(save_directory, PROCESSOR_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return [*written, path]

    def _tag_tokenizer_config(self, folder: str | os.PathLike) -> None:
        """Name this processor in tokenizer_config.json (what AutoProcessor reads when it finds no processor file)."""
        path = os.path.join(folder, "tokenizer_config.json")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["processor_class"] = type(self).__name__  # (the auto_map lives in processor_config.json)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "PMMRecProcessor":
        """Load a processor saved with `save_pretrained` (a folder or a Hub repo). Keyword arguments: the Hub
        options (`token`, `revision`, `cache_dir`, `local_files_only`, ...) and `trust_remote_code` for the
        tokenizer."""
        kwargs.pop("_from_auto", None)
        kwargs.pop("_from_pipeline", None)
        kwargs.pop("code_revision", None)
        name = os.fspath(pretrained_model_name_or_path)
        settings = _read_json(name, PROCESSOR_CONFIG_NAME, **kwargs)
        if settings is None:
            raise OSError(f"'{name}' has no {PROCESSOR_CONFIG_NAME}: it holds no PMMRec processor (save one with "
                          "PMMRecProcessor.save_pretrained, or build one with PMMRecProcessor.from_item_config).")
        modality = settings.get("modality", "multimodal")
        tokenizer = image_processor = None
        if modality != "vision":
            tokenizer = _load_tokenizer(name, **kwargs)
        if modality != "text":
            image_settings = _read_json(name, IMAGE_PROCESSOR_CONFIG_NAME, **kwargs)
            if image_settings is None:
                raise OSError(f"'{name}' has no {IMAGE_PROCESSOR_CONFIG_NAME} for its image processor.")
            image_settings = {k: v for k, v in image_settings.items()
                              if k in ("image_size", "image_mean", "image_std")}
            image_processor = PMMRecImageProcessor(**image_settings)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   do_lower_case=settings.get("do_lower_case", True),
                   max_text_length=settings.get("max_text_length", 50), modality=modality)


PMMRecImageProcessor.register_for_auto_class("AutoImageProcessor")
PMMRecProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["PMMRecImageProcessor", "PMMRecProcessor", "to_pil_image"]
