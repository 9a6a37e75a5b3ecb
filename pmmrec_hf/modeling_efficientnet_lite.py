"""EfficientNet-Lite as a transformers backbone (config + model), usable as PMMRec's vision tower.

EfficientNet-Lite (Tan & Le, 2019; the "lite" variants of the official TensorFlow TPU repository) is
EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 channels) and
the head (1280 channels) kept fixed when the model is scaled. Convolutions use TensorFlow "SAME" padding.

Layout (what PMMRec's generic `BackboneTower` relies on):

- `embeddings`: the stem, conv 3x3 stride 2 + batch norm + ReLU6, run first;
- `encoder.layers`: an `nn.ModuleList` of MBConv blocks, each taking and returning one tensor (N, C, H, W);
- `encoder.top_conv` / `encoder.top_bn` / `encoder.top_activation`: the 1x1 head conv to `hidden_size` channels.

`forward` returns `last_hidden_state` (N, hidden_size, h, w), the head's output (what the original package's
`extract_features` returns), and `pooler_output` (N, hidden_size), its global average.

This file travels with saved checkpoints (`trust_remote_code` loading): it imports only torch, transformers and
its sibling configuration_efficientnet_lite.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithNoAttention, BaseModelOutputWithPoolingAndNoAttention

from .configuration_efficientnet_lite import EfficientNetLiteConfig


class EfficientNetLiteConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding (asymmetric, extra pixel right/bottom),
    computed from the input size at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        height, width = hidden.shape[-2:]
        pads = []
        for size, kernel, stride in ((width, self.kernel_size[1], self.stride[1]),
                                     (height, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            hidden = F.pad(hidden, pads)
        return super().forward(hidden)


class EfficientNetLiteEmbeddings(nn.Module):
    """Stem: conv 3x3 stride 2 + batch norm + activation."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        self.convolution = EfficientNetLiteConv2d(config.num_channels, config.stem_channels, 3, stride=2)
        self.batchnorm = nn.BatchNorm2d(config.stem_channels, eps=config.batch_norm_eps,
                                        momentum=config.batch_norm_momentum)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.activation(self.batchnorm(self.convolution(pixel_values)))


def _drop_path(hidden: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of some samples, rescale the others."""
    if not training or rate <= 0.0:
        return hidden
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand((hidden.shape[0], 1, 1, 1), dtype=hidden.dtype, device=hidden.device))
    return hidden / keep * mask


class EfficientNetLiteBlock(nn.Module):
    """MBConv block without squeeze-excitation: [1x1 expand + BN + act] -> depthwise kxk + BN + act ->
    1x1 project + BN, with an identity shortcut when the stride is 1 and the channels match."""

    def __init__(self, config: EfficientNetLiteConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int, expand_ratio: int, drop_path_rate: float):
        super().__init__()
        bn = dict(eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        inner = in_channels * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self.expand_conv = EfficientNetLiteConv2d(in_channels, inner, 1)
            self.expand_bn = nn.BatchNorm2d(inner, **bn)
        self.depthwise_conv = EfficientNetLiteConv2d(inner, inner, kernel_size, stride=stride, groups=inner)
        self.depthwise_bn = nn.BatchNorm2d(inner, **bn)
        self.project_conv = EfficientNetLiteConv2d(inner, out_channels, 1)
        self.project_bn = nn.BatchNorm2d(out_channels, **bn)
        self.activation = ACT2FN[config.hidden_act]
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if self.expand:
            x = self.activation(self.expand_bn(self.expand_conv(x)))
        x = self.activation(self.depthwise_bn(self.depthwise_conv(x)))
        x = self.project_bn(self.project_conv(x))
        if self.residual:
            x = _drop_path(x, self.drop_path_rate, self.training) + hidden_states
        return x


class EfficientNetLiteEncoder(nn.Module):
    """The MBConv blocks (`layers`) followed by the head: 1x1 conv to `hidden_size` + BN + activation."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        specs = []  # (in, out, kernel, stride, expand) per block
        channels = config.stem_channels
        for stage in range(len(config.out_channels)):
            out = config.round_channels(config.out_channels[stage])
            for repeat in range(config.stage_repeats(stage)):
                stride = config.strides[stage] if repeat == 0 else 1
                specs.append((channels, out, config.kernel_sizes[stage], stride, config.expand_ratios[stage]))
                channels = out
        self.layers = nn.ModuleList(
            EfficientNetLiteBlock(config, *spec, drop_path_rate=config.drop_connect_rate * index / len(specs))
            for index, spec in enumerate(specs)
        )
        self.top_conv = EfficientNetLiteConv2d(channels, config.hidden_size, 1)
        self.top_bn = nn.BatchNorm2d(config.hidden_size, eps=config.batch_norm_eps,
                                     momentum=config.batch_norm_momentum)
        self.top_activation = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> BaseModelOutputWithNoAttention:
        all_hidden = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        hidden_states = self.top_activation(self.top_bn(self.top_conv(hidden_states)))
        return BaseModelOutputWithNoAttention(last_hidden_state=hidden_states, hidden_states=all_hidden)


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["EfficientNetLiteBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            # TensorFlow EfficientNet's conv initialiser: normal, std sqrt(2 / fan_out)
            fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.zero_()
            if module.running_mean is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """EfficientNet-Lite feature extractor: `last_hidden_state` is the head's feature map (N, hidden_size, h, w),
    `pooler_output` its global average (N, hidden_size); `hidden_states` (when asked) the stem's and every
    block's output."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.embeddings = EfficientNetLiteEmbeddings(config)
        self.encoder = EfficientNetLiteEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.encoder(self.embeddings(pixel_values), output_hidden_states=bool(output_hidden_states))
        last = encoded.last_hidden_state
        pooled = last.mean(dim=(2, 3))
        if not return_dict:
            return (last, pooled) + ((encoded.hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last, pooler_output=pooled, hidden_states=encoded.hidden_states
        )



__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteModel", "EfficientNetLitePreTrainedModel"]
