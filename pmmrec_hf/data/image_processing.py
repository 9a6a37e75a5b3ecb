"""Image decoding and the default PMMRec image transform.

Default transform (the research code's): convert to RGB, squash to ``image_size x image_size`` (bilinear
resize, no crop, aspect ratio not kept), scale to [0, 1], normalise per channel with ``mean`` / ``std``
(0.5 / 0.5 by default, giving values in [-1, 1]).

Placeholder policy: an item without an image, or whose image cannot be decoded, gets the all-zeros pixel
tensor, i.e. an image equal to the normalisation mean (a constant mid-grey for the default mean = 0.5).
With a custom transformers image processor the placeholder is likewise all zeros, of the shape that
processor outputs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_IMAGE_MEAN",
    "DEFAULT_IMAGE_STD",
    "PMMRecImageTransform",
    "is_missing_image",
    "load_image",
]

from ..processing_pmmrec import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD  # noqa: E402  (one definition)
from ..processing_pmmrec import _is_missing  # noqa: E402


def is_missing_image(value: Any) -> bool:
    """True when an image value of the item table means "no image" (None, NaN, an empty {bytes, path})."""
    return _is_missing(value)


def load_image(value: Any):
    """Decode one image value of the item table into an RGB ``PIL.Image``.

    Accepts a PIL image, encoded bytes, a file path, a datasets ``Image(decode=False)`` struct
    ``{"bytes", "path"}`` (bytes preferred), or an (H, W[, C]) uint8 numpy array. Returns None for a
    missing image (see :func:`is_missing_image`); raises on an image that cannot be decoded.
    """
    from PIL import Image

    if is_missing_image(value):
        return None
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    image.load()  # decode now, so that a broken file fails here
    return image.convert("RGB") if image.mode != "RGB" else image


class PMMRecImageTransform:
    """The research code's transform: RGB, squash to ``image_size`` (bilinear, no crop), [0, 1], normalise.

    Call it on a list of PIL images; returns a float tensor (n, 3, image_size, image_size). It runs the published
    preprocessor's code (:class:`pmmrec_hf.processing_pmmrec.PMMRecImageProcessor`, what is saved as
    ``preprocessor_config.json`` with every checkpoint): training and users share one image path.
    """

    def __init__(
        self,
        image_size: int = 224,
        image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
        image_std: Sequence[float] = DEFAULT_IMAGE_STD,
    ) -> None:
        from ..processing_pmmrec import PMMRecImageProcessor

        self.image_processor = PMMRecImageProcessor(image_size=image_size, image_mean=image_mean, image_std=image_std)
        self.image_size = self.image_processor.image_size
        self.image_mean = tuple(self.image_processor.image_mean)
        self.image_std = tuple(self.image_processor.image_std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, image_mean={self.image_mean}, image_std={self.image_std})"

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.image_processor.output_shape

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return self.image_processor.pixels(list(images))
