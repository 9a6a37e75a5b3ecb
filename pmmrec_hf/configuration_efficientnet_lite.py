"""Configuration of the EfficientNet-Lite backbone (see modeling_efficientnet_lite.py).

This file travels with saved checkpoints (`trust_remote_code` loading): it imports only transformers and the
standard library.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig


class EfficientNetLiteConfig(PretrainedConfig):
    r"""Configuration of [`EfficientNetLiteModel`]. Defaults give EfficientNet-Lite0.

    Args:
        num_channels (`int`, *optional*, defaults to 3): input image channels.
        image_size (`int`, *optional*, defaults to 224): the resolution the model was trained at (informative:
            padding is computed from the input size, so other sizes run too).
        width_coefficient (`float`, *optional*, defaults to 1.0): channel multiplier of the blocks
            (the stem and the head are not scaled, as in every Lite variant).
        depth_coefficient (`float`, *optional*, defaults to 1.0): repeat multiplier of the stages
            (the first and the last stage are not scaled, as in every Lite variant).
        depth_divisor (`int`, *optional*, defaults to 8): scaled channel counts are rounded to multiples of it.
        stem_channels (`int`, *optional*, defaults to 32): output channels of the stem convolution.
        hidden_size (`int`, *optional*, defaults to 1280): output channels of the head convolution (the width of
            `last_hidden_state` and `pooler_output`).
        kernel_sizes, strides, expand_ratios, out_channels, num_block_repeats (`list[int]`, *optional*):
            per stage, the depthwise kernel size, the stride of the stage's first block, the expansion ratio of
            the inverted bottleneck, the (unscaled) output channels, and the (unscaled) number of blocks.
        hidden_act (`str`, *optional*, defaults to `"relu6"`): activation after every batch norm but the projection.
        batch_norm_eps (`float`, *optional*, defaults to 1e-3): batch-norm epsilon.
        batch_norm_momentum (`float`, *optional*, defaults to 0.01): batch-norm momentum, PyTorch convention
            (TensorFlow's decay 0.99).
        drop_connect_rate (`float`, *optional*, defaults to 0.2): stochastic depth in training; block i of n
            skips its residual branch with probability `drop_connect_rate * i / n`.
        dropout_rate (`float`, *optional*, defaults to 0.2): dropout of the original classifier (no classifier
            here; kept for reference).
        initializer_range (`float`, *optional*, defaults to 0.02): unused by convolutions (fan-out normal
            initialisation), kept for transformers' conventions.
    """

    model_type = "pmmrec_efficientnet_lite"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 224,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        depth_divisor: int = 8,
        stem_channels: int = 32,
        hidden_size: int = 1280,
        kernel_sizes: list[int] | None = None,
        strides: list[int] | None = None,
        expand_ratios: list[int] | None = None,
        out_channels: list[int] | None = None,
        num_block_repeats: list[int] | None = None,
        hidden_act: str = "relu6",
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        drop_connect_rate: float = 0.2,
        dropout_rate: float = 0.2,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.image_size = image_size
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient
        self.depth_divisor = depth_divisor
        self.stem_channels = stem_channels
        self.hidden_size = hidden_size
        self.kernel_sizes = list(kernel_sizes) if kernel_sizes is not None else [3, 3, 5, 3, 5, 5, 3]
        self.strides = list(strides) if strides is not None else [1, 2, 2, 2, 1, 2, 1]
        self.expand_ratios = list(expand_ratios) if expand_ratios is not None else [1, 6, 6, 6, 6, 6, 6]
        self.out_channels = list(out_channels) if out_channels is not None else [16, 24, 40, 80, 112, 192, 320]
        self.num_block_repeats = list(num_block_repeats) if num_block_repeats is not None else [1, 2, 2, 3, 3, 4, 1]
        self.hidden_act = hidden_act
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.drop_connect_rate = drop_connect_rate
        self.dropout_rate = dropout_rate
        self.initializer_range = initializer_range
        lengths = {len(v) for v in (self.kernel_sizes, self.strides, self.expand_ratios, self.out_channels,
                                    self.num_block_repeats)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError("kernel_sizes, strides, expand_ratios, out_channels and num_block_repeats must be "
                             "non-empty lists of one length (one entry per stage).")

    def round_channels(self, channels: int) -> int:
        """Scale a block's channel count by `width_coefficient`, rounded to a multiple of `depth_divisor`."""
        if not self.width_coefficient:
            return channels
        divisor = self.depth_divisor
        scaled = channels * self.width_coefficient
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        if rounded < 0.9 * scaled:  # never round down by more than 10%
            rounded += divisor
        return int(rounded)

    def stage_repeats(self, stage: int) -> int:
        """Blocks in a stage: scaled by `depth_coefficient`, except the first and the last stage."""
        repeats = self.num_block_repeats[stage]
        if stage in (0, len(self.num_block_repeats) - 1) or not self.depth_coefficient:
            return repeats
        return int(math.ceil(self.depth_coefficient * repeats))



__all__ = ["EfficientNetLiteConfig"]
