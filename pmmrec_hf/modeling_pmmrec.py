"""PMMRec models: item encoder, user encoder and the full pre-training model.

This file travels with every Hub checkpoint (``trust_remote_code`` loading): it imports only torch, numpy,
transformers and its sibling files (relative imports of flat modules, which is what transformers' dynamic modules
resolve; `save_pretrained` copies every one of them next to the weights).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .configuration_pmmrec import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecUserEncoderConfig
from .modeling_efficientnet_lite import EfficientNetLiteModel
from .pipelines import custom_pipelines_for
from .processing_pmmrec import PMMRecProcessor
from .losses import (
    _user_item_ids,
    distributed_mean,
    gather_across_processes,
    next_item_loss,
    nicl_loss,
    nid_loss,
    rcl_loss,
    rows_of_ids,
)

try:  # transformers >= 4.52
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = nn.Module

try:
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class PMMRecItemEncoderOutput(ModelOutput):
    """
    item_embeddings: (N, d) one embedding per item (fused, or single-modality for text/vision encoders).
    text_embeddings: (N, d) masked mean of the projected text tokens (None without a text tower).
    vision_embeddings: (N, d) mean of the projected image tokens (None without a vision tower; meaningless for
        the items that `image_mask` marks as having no image).
    last_hidden_state: (N, T + V, d) fused token states (multimodal only).
    image_mask: (N,) bool, the `image_mask` given (None: every item has a real image).
    """

    item_embeddings: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None
    vision_embeddings: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None


@dataclass
class PMMRecUserEncoderOutput(ModelOutput):
    """
    last_hidden_state: (B, S, d) user state after each sequence position.
    user_embeddings: (B, d) the state at the last position (the last real item, sequences are left-padded).
    """

    last_hidden_state: torch.Tensor | None = None
    user_embeddings: torch.Tensor | None = None


@dataclass
class PMMRecModelOutput(ModelOutput):
    """
    loss: weighted sum of the computed objectives.
    next_item_loss, nicl_loss, nid_loss, rcl_loss: each objective (None when not computed).
    item_embeddings: (N, d) embeddings of the batch's distinct items.
    user_states: (B, S', d) user-encoder states over the input positions.
    user_embeddings: (B, d) state at the last input position.
    nid_logits: (B, S') noised-item-detection scores on the corrupted sequence.
    """

    loss: torch.Tensor | None = None
    next_item_loss: torch.Tensor | None = None
    nicl_loss: torch.Tensor | None = None
    nid_loss: torch.Tensor | None = None
    rcl_loss: torch.Tensor | None = None
    item_embeddings: torch.Tensor | None = None
    user_states: torch.Tensor | None = None
    user_embeddings: torch.Tensor | None = None
    nid_logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# backbone towers: frozen lower part without autograd, trainable top blocks
# --------------------------------------------------------------------------------------------------

_BLOCK_PATHS = (
    "encoder.layer",
    "encoder.layers",
    "layers",
    "layer",
    "vision_model.encoder.layers",
    "text_model.encoder.layers",
    "encoder.stages",
    "stages",
    "timm_model.blocks",
    "blocks",
)


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _resolve(module: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module] | None:
    parent = module
    *parents, name = path.split(".")
    for attr in parents:
        parent = getattr(parent, attr, None)
        if not isinstance(parent, nn.Module):
            return None
    blocks = getattr(parent, name, None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        return parent, name, blocks
    return None


def find_blocks(backbone: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """The (parent, attribute, ModuleList) holding a backbone's stack of blocks."""
    for path in _BLOCK_PATHS:
        found = _resolve(backbone, path)
        if found is not None:
            return found
    raise ValueError(
        f"Cannot find the stack of blocks of backbone {type(backbone).__name__}: looked for "
        f"{', '.join(_BLOCK_PATHS)}. Use a backbone with one of these layouts."
    )


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    return value[0] if hasattr(value, "__getitem__") else value


class BackboneTower(nn.Module):
    """A pretrained backbone split into a frozen bottom (stem + lower blocks) and trainable top blocks.

    `frozen_features(inputs)` runs the frozen bottom in inference mode and returns the hidden state that
    enters the first trainable block; `forward_from_features(hidden, attention_mask)` runs the trainable top
    on it through the backbone's own forward (its stem bypassed, its block list sliced), so the same code
    path serves recomputation and a per-item feature cache. Token states are the last block's output
    (before any final layer norm); a convolutional backbone's last feature map is flattened to tokens.
    """

    def __init__(self, backbone: nn.Module, trainable_layers: int, input_name: str):
        super().__init__()
        self.backbone = backbone
        self.input_name = input_name
        self.trainable_layers = trainable_layers
        _, _, blocks = find_blocks(backbone)
        self.num_blocks = len(blocks)
        if trainable_layers < 0:
            self.first_trainable = 0
        else:
            self.first_trainable = max(self.num_blocks - trainable_layers, 0)
        self._stem_names: list[str] | None = None
        self.unused_parameter_names: list[str] | None = None  # found by apply_freezing(example_inputs)

    @property
    def fully_trainable(self) -> bool:
        return self.trainable_layers < 0

    def train(self, mode: bool = True) -> "BackboneTower":
        """Train mode reaches only the trainable top blocks: the frozen rest of the backbone (stem, lower blocks,
        the layers after the last block, such as a convolutional head's batch norm) stays in inference mode, so
        that a frozen part neither drops out nor normalises with batch statistics nor updates its running
        statistics, and so computes exactly what `frozen_features` (and a feature cache) computed."""
        super().train(mode)
        if mode and not self.fully_trainable:
            _, _, blocks = find_blocks(self.backbone)
            trainable = {id(m) for block in list(blocks)[self.first_trainable :] for m in block.modules()}
            for module in self.backbone.modules():
                if id(module) not in trainable:
                    module.training = False
        return self

    def apply_freezing(self, example_inputs: dict | None = None) -> None:
        """Freeze everything but the top blocks (or nothing, for trainable_layers = -1), and then every
        parameter that the tower's output does not depend on (poolers, final norms and heads after the
        last block), so that each trainable parameter receives a gradient in every step (what
        DistributedDataParallel requires). The unused parameters are found once, by one forward and
        backward pass on `example_inputs` (a tiny dummy input; skipped while the weights are not
        materialised), and kept in `unused_parameter_names`."""
        if self.fully_trainable:
            self.backbone.requires_grad_(True)
        else:
            self.backbone.requires_grad_(False)
            _, _, blocks = find_blocks(self.backbone)
            for block in list(blocks)[self.first_trainable :]:
                block.requires_grad_(True)
        if self.unused_parameter_names is None and example_inputs is not None:
            self.unused_parameter_names = self._find_unused_parameters(example_inputs)
        unused = set(self.unused_parameter_names or ())
        for name, param in self.backbone.named_parameters():
            if name in unused:
                param.requires_grad_(False)

    def _find_unused_parameters(self, example_inputs: dict) -> list[str] | None:
        trainable = {name: p for name, p in self.backbone.named_parameters() if p.requires_grad}
        if not trainable:
            return []
        if any(p.is_meta for p in self.backbone.parameters()):
            return None  # not materialised yet (from_pretrained): found after loading
        saved = {name: p.grad for name, p in trainable.items()}
        for p in trainable.values():
            p.grad = None
        modes = [(m, m.training) for m in self.backbone.modules()]
        self.backbone.eval()  # no dropout, no batch-norm statistics update
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                attention_mask = example_inputs.get("attention_mask")
                output = self.forward(example_inputs, attention_mask)
                if output.requires_grad:
                    output.float().sum().backward()
            unused = sorted(name for name, p in trainable.items() if p.grad is None)
        finally:
            for module, training in modes:
                module.training = training
            for name, p in trainable.items():
                p.grad = saved[name]
        return unused

    def _call(self, inputs: dict) -> object:
        return self.backbone(**inputs, return_dict=True)

    def _discover_stem(self, inputs: dict) -> list[str]:
        """Names of the outermost modules that run before the first block (the backbone's stem)."""
        _, _, blocks = find_blocks(self.backbone)
        block_ids = {id(m) for b in blocks for m in b.modules()}
        finished: list[str] = []
        handles = []
        for name, module in self.backbone.named_modules():
            if name and id(module) not in block_ids:
                handles.append(module.register_forward_hook(lambda m, a, o, name=name: finished.append(name)))

        def stop(module, args, kwargs):
            raise _StopForward(args[0] if args else next(iter(kwargs.values())))

        handles.append(blocks[0].register_forward_pre_hook(stop, with_kwargs=True))
        try:
            with torch.no_grad():
                self._call(inputs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        outer = [n for n in finished if not any(n.startswith(o + ".") for o in finished if o != n)]
        if not outer:
            raise ValueError(f"Found no stem module before the first block of {type(self.backbone).__name__}.")
        return outer

    @torch.no_grad()
    def frozen_features(self, inputs: dict) -> torch.Tensor:
        """Hidden state entering the first trainable block, computed in inference mode (no dropout)."""
        _, _, blocks = find_blocks(self.backbone)
        if self._stem_names is None:
            self._stem_names = self._discover_stem(inputs)
        captured: dict[str, torch.Tensor] = {}
        if self.first_trainable < self.num_blocks:

            def stop(module, args, kwargs):
                raise _StopForward(args[0] if args else kwargs["hidden_states"])

            handle = blocks[self.first_trainable].register_forward_pre_hook(stop, with_kwargs=True)
        else:

            def grab(module, args, output):
                captured["hidden"] = _first_tensor(output)

            handle = blocks[self.num_blocks - 1].register_forward_hook(grab)
        modes = [(m, m.training) for m in self.backbone.modules()]
        self.backbone.eval()
        try:
            self._call(inputs)
        except _StopForward as stop_signal:
            captured["hidden"] = stop_signal.hidden
        finally:
            handle.remove()
            for module, training in modes:  # each module's own mode (see `train`: frozen parts stay in eval)
                module.training = training
        return captured["hidden"]

    def forward_from_features(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the trainable top blocks on frozen features; returns token states (N, tokens, width)."""
        if self._stem_names is None:
            raise RuntimeError("frozen_features must run once before forward_from_features (stem discovery).")
        parent, attr, blocks = find_blocks(self.backbone)
        top = type(blocks)(list(blocks)[self.first_trainable :])
        modules = dict(self.backbone.named_modules())
        stems = [modules[name] for name in self._stem_names]
        captured: dict[str, torch.Tensor] = {}

        def first_stem(*args, **kwargs):
            return hidden

        def identity(*args, **kwargs):
            return args[0] if args else next(iter(kwargs.values()))

        handle = None
        if len(top) > 0:
            handle = top[len(top) - 1].register_forward_hook(
                lambda m, a, o: captured.__setitem__("hidden", _first_tensor(o))
            )
        setattr(parent, attr, top)
        for index, stem in enumerate(stems):
            stem.forward = first_stem if index == 0 else identity
        try:
            inputs = {self.input_name: hidden}
            if attention_mask is not None:
                inputs["attention_mask"] = attention_mask
            output = self._call(inputs)
        finally:
            for stem in stems:
                del stem.forward
            setattr(parent, attr, blocks)
            if handle is not None:
                handle.remove()
        last = output.last_hidden_state if hasattr(output, "last_hidden_state") else _first_tensor(output)
        if last.dim() == 4:  # conv feature map (N, C, h, w) -> tokens (N, h*w, C)
            return last.flatten(2).transpose(1, 2)
        return captured.get("hidden", hidden)

    def forward(self, inputs: dict, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.fully_trainable:
            captured: dict[str, torch.Tensor] = {}
            _, _, blocks = find_blocks(self.backbone)
            handle = blocks[self.num_blocks - 1].register_forward_hook(
                lambda m, a, o: captured.__setitem__("hidden", _first_tensor(o))
            )
            try:
                output = self._call(inputs)
            finally:
                handle.remove()
            last = output.last_hidden_state
            return last.flatten(2).transpose(1, 2) if last.dim() == 4 else captured["hidden"]
        return self.forward_from_features(self.frozen_features(inputs), attention_mask)


# --------------------------------------------------------------------------------------------------
# transformer layer shared by the fusion and the user encoder
# --------------------------------------------------------------------------------------------------


class PMMRecAttention(nn.Module):
    """Multi-head self-attention. `config._attn_implementation` (read at each call) picks the kernel: "sdpa"
    (torch's scaled_dot_product_attention, the default) or "eager" (explicit softmax(QK^T / sqrt(d)) V)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, config=None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # hidden: (B, T, d); allowed: (B, 1, T, T) bool, True where a query may attend to a key
        if not isinstance(allowed, torch.Tensor):  # packed tokens (P, d) and their pmmrec_hf.packing.VarlenAttention
            return self._forward_packed(hidden, allowed)
        batch, length, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, dh)

        q, k, v = heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden))
        dropout = self.dropout if self.training else 0.0
        if getattr(self.config, "_attn_implementation", None) == "eager":
            scores = (q @ k.transpose(-1, -2)) / (self.head_dim ** 0.5)  # (B, h, T, T)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = F.dropout(scores.softmax(-1), p=dropout, training=self.training)
            context = weights @ v  # (B, h, T, dh)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)  # (B, h, T, dh)
        return self.output(context.transpose(1, 2).reshape(batch, length, -1))  # (B, T, d)

    def _forward_packed(self, hidden: torch.Tensor, varlen) -> torch.Tensor:
        # hidden: (P, d) the tokens of several sequences laid end to end; varlen: which sequence each belongs to
        count = hidden.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(count, self.num_heads, self.head_dim)  # (P, h, dh)

        context = varlen(heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden)),
                         dropout=self.dropout if self.training else 0.0)  # (P, h, dh)
        return self.output(context.reshape(count, -1))  # (P, d)


class PMMRecTransformerLayer(_LayerBase):
    """A BERT/SASRec transformer layer: attention + FFN, residuals, post- or pre-layer-norm."""

    def __init__(self, hidden_size, num_heads, intermediate_size, act, dropout, attention_dropout, eps, position="post",
                 config=None):
        super().__init__()
        self.attention = PMMRecAttention(hidden_size, num_heads, attention_dropout, config=config)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[act]
        self.ffn_output = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = position == "pre"

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.dropout(self.attention(self.attention_norm(hidden), allowed))
            return hidden + self.dropout(self.ffn_output(self.act(self.intermediate(self.ffn_norm(hidden)))))
        hidden = self.attention_norm(hidden + self.dropout(self.attention(hidden, allowed)))
        return self.ffn_norm(hidden + self.dropout(self.ffn_output(self.act(self.intermediate(hidden)))))


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


class PMMRecPreTrainedModel(PreTrainedModel):
    config_class = PMMRecConfig
    base_model_prefix = "pmmrec"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PMMRecTransformerLayer"]
    _supports_sdpa = True  # "eager" and "sdpa" are implemented; flash / flex attention are refused by transformers

    def _collect_no_split_modules(self, *modules) -> None:
        """This model's `_no_split_modules`: its own layer class plus those of every backbone inside it, so that
        `device_map="auto"` never splits a BERT / CLIP / ... layer across devices."""
        names = set(type(self)._no_split_modules or ())
        for module in modules:
            if module is not None:
                names.update(getattr(module, "_no_split_modules", None) or ())
        self._no_split_modules = sorted(names)

    @staticmethod
    def _requested_attn_implementation(config) -> str | None:
        """The attention implementation the caller asked for (None: transformers' default choice)."""
        value = getattr(config, "_attn_implementation_internal", None)
        return value if isinstance(value, str) else None

    @staticmethod
    def _pass_attn_implementation(requested: str | None, *backbones) -> None:
        """Apply an explicitly requested attention implementation to pretrained backbones (transformers raises a
        ValueError naming the backbone when it does not support it)."""
        if requested is None:
            return
        for backbone in backbones:
            if backbone is not None and isinstance(backbone, PreTrainedModel):
                if backbone.config._attn_implementation != requested:
                    checked = backbone._check_and_adjust_attn_implementation(requested, is_init_check=False)
                    for module in backbone.modules():
                        if isinstance(module, PreTrainedModel):
                            module.config._attn_implementation_internal = checked

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with two additions:

        - the transformers pipelines this component serves are written to the saved config's `custom_pipelines`
          (the pipeline code, pipelines.py, is copied with the modelling code), so that
          `pipeline(task, model=folder_or_repo, trust_remote_code=True)` works;
        - the save is atomic (``pmmrec_hf.atomic_io.InPlaceWrite``): the files are written to a temporary sibling
          folder and moved in only when complete; other files in the folder are kept, weight files of an earlier
          save that this one does not write are removed. An interrupted save leaves the previous version, restored
          by the next load or save of the folder.
        """
        tasks = custom_pipelines_for(self.config.model_type)
        had = "custom_pipelines" in self.config.__dict__
        previous = self.config.__dict__.get("custom_pipelines")
        if tasks:
            self.config.custom_pipelines = tasks
        try:
            return self._save_atomically(save_directory, *args, **kwargs)
        finally:
            if had:
                self.config.custom_pipelines = previous
            else:
                self.config.__dict__.pop("custom_pipelines", None)

    def _save_atomically(self, save_directory, *args, **kwargs):
        try:
            from pmmrec_hf.atomic_io import in_place_write, is_weights_file
        except ImportError:  # a remote-code copy of this file: the plain save
            in_place_write = None
        if in_place_write is None or args or kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True) \
                or os.path.isfile(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)
        with in_place_write(save_directory, replaces=is_weights_file) as tmp:
            return super().save_pretrained(str(tmp), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # a local folder whose last save was interrupted: put its previous version back first
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and \
                os.path.isdir(pretrained_model_name_or_path):
            try:
                from pmmrec_hf.atomic_io import recover_in_place
            except ImportError:
                recover_in_place = None
            if recover_in_place is not None:
                recover_in_place(pretrained_model_name_or_path)
        # A repo holding another PMMRec component would load with only a warning (and random weights): refuse it.
        # The check lives in the package; a remote-code copy of this file runs without it (imports inside `try`
        # are not remote-code requirements), which is safe: there AutoModel picks the class from the repo's config.
        # A `config=` given must be this class's own kind too; the repo's config.json, when it has one, is checked
        # either way (with `config=` a folder of weights alone is accepted).
        given = kwargs.get("config")
        expected = cls.config_class.model_type
        if isinstance(given, PretrainedConfig) and getattr(given, "model_type", None) != expected:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: the config= given is a {type(given).__name__} (model_type "
                f"{getattr(given, 'model_type', None)!r}); {cls.__name__} needs model_type {expected!r}."
            )
        if pretrained_model_name_or_path is not None:
            try:
                from pmmrec_hf.hub import check_component
            except ImportError:
                check_component = None
            if check_component is not None:
                try:
                    check_component(pretrained_model_name_or_path, expected, **kwargs)
                except OSError:
                    if given is None:
                        raise
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # a diverged run's weights must not load silently (every recommendation from them would be NaN)
        # (parameters only: some backbones keep -inf in buffers, e.g. attention masks)
        bad = [n for n, t in model.named_parameters() if not t.is_meta and not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(
                f"{pretrained_model_name_or_path}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:5])}); "
                "the checkpoint comes from a diverged run."
            )
        # loading re-creates parameters: restore the frozen / trainable split the config defines
        if hasattr(model, "apply_freezing"):
            model.apply_freezing()
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise this package's own layers; pretrained backbones are never touched."""
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)


class _GatheredItems:
    """The candidate pool of a step: this process's items, or every process's when negatives are gathered
    (the collectives run on first use only, once). embeddings (C, d), ids (C,), log_q (C,) or None, valid (C,)
    or None (False at padding rows of a gather), offset: the row of this process's first item."""

    def __init__(self, embeddings, ids, log_q, gather: bool):
        self._local, self._gather = (embeddings, ids, log_q), gather

    @functools.cached_property
    def _pool(self) -> tuple:
        embeddings, ids, log_q = self._local
        if not self._gather:
            return embeddings, ids, log_q, None, 0
        gathered, valid, offset = gather_across_processes(embeddings)
        log_q = gather_across_processes(log_q)[0] if log_q is not None else None
        return gathered, gather_across_processes(ids)[0], log_q, valid, offset

    embeddings = property(lambda self: self._pool[0])
    ids = property(lambda self: self._pool[1])
    log_q = property(lambda self: self._pool[2])
    valid = property(lambda self: self._pool[3])
    offset = property(lambda self: self._pool[4])


def _check_inference_index(item_index: torch.Tensor, max_length: int) -> None:
    if item_index.shape[-1] > max_length:
        raise ValueError(
            f"With `return_loss=False`, `item_index` holds the sequences to encode, at most the user encoder's "
            f"`max_position_embeddings` ({max_length}) columns; got {item_index.shape[-1]}. A training batch has one "
            "more column (inputs [:, :-1] and next-item targets [:, 1:]): pass `item_index[:, :-1]`, or "
            "`return_loss=True` (its `user_states` are the states over the input columns)."
        )


def _mean(total: torch.Tensor, count: int, across_processes: bool) -> torch.Tensor:
    """Mean over this process's examples, or its share of the mean over every process's examples."""
    if across_processes:
        return distributed_mean(total, torch.as_tensor(count, device=total.device))
    if isinstance(count, torch.Tensor):  # a count on the device (no host sync)
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)


def _normalise_if_cosine(embeddings: torch.Tensor, config) -> torch.Tensor:
    """L2-normalise along the last dimension when `config.next_item_similarity` is "cosine" (else unchanged)."""
    if getattr(config, "next_item_similarity", "dot") == "cosine":
        return F.normalize(embeddings, dim=-1)
    return embeddings


def _encode_users(user_encoder: nn.Module, item_embeddings: torch.Tensor, item_index: torch.Tensor, config):
    """Run `user_encoder` on sequences given as indices (B, S) into `item_embeddings` (N, d), -1 at padding;
    the user embeddings are L2-normalised with cosine scoring. Shared by PMMRecModel and SASRecModel."""
    valid = item_index >= 0  # (B, S)
    seq = item_embeddings[item_index.clamp(min=0)] * valid[..., None].to(item_embeddings.dtype)  # (B, S, d)
    out = user_encoder(inputs_embeds=seq, attention_mask=valid)
    out.user_embeddings = _normalise_if_cosine(out.user_embeddings, config)
    return out


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # tokens: (N, T, d); mask: (N, T) -> (N, d)
    weights = mask.to(tokens.dtype)[..., None]  # (N, T, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


_UNUSED_BACKBONE_PARTS = ("pooler.", "head.", "classifier.", "lm_head.", "visual_projection.", "text_projection.")


#: Backbone model types whose code ships with this file (no AutoModel registration needed: remote code loads them).
_LOCAL_BACKBONES = {EfficientNetLiteConfig.model_type: EfficientNetLiteModel}


def _backbone_class(config):
    if config.model_type in _LOCAL_BACKBONES:
        return _LOCAL_BACKBONES[config.model_type]
    return AutoModel._model_mapping[type(config)]


def _build_backbone(config, requested_attn: str | None = None):
    """A randomly initialised backbone of `config` (its weights come from the checkpoint afterwards)."""
    if requested_attn is not None:
        config._attn_implementation_internal = requested_attn
    return _backbone_class(config)._from_config(config)


def _check_return_dict(return_dict, config) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


def _to_numpy_or_tensor(embeddings: torch.Tensor, convert_to_tensor: bool):
    embeddings = embeddings.float().cpu()
    return embeddings if convert_to_tensor else embeddings.numpy()


def _batches(count: int, batch_size: int, show_progress_bar: bool, description: str):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    starts = range(0, count, batch_size)
    if show_progress_bar:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=description, total=len(starts))
    return starts


class _InferenceMode:
    """eval mode + torch.inference_mode for the duration, the model's mode restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        self.context = torch.inference_mode()
        self.context.__enter__()

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        self.model.train(self.training)


def _check_raw_items(texts, images, item_config):
    """(texts list or None, images list or None, count), checked against the encoder's modality."""
    if isinstance(texts, str):
        raise ValueError("`texts` must be a list of strings (one per item), got a single string: wrap it in a list.")
    texts = list(texts) if texts is not None else None
    images = list(images) if images is not None else None
    if item_config.uses_text and texts is None:
        raise ValueError(f"This item encoder (modality {item_config.modality!r}) needs `texts`.")
    if item_config.modality == "vision" and images is None:
        raise ValueError("This item encoder (modality 'vision') needs `images`.")
    if item_config.modality == "text" and images is not None:
        raise ValueError("This item encoder (modality 'text') reads no images: pass `texts` only.")
    if item_config.modality == "vision" and texts is not None:
        raise ValueError("This item encoder (modality 'vision') reads no texts: pass `images` only.")
    if texts is not None and images is not None and len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts but {len(images)} images: give one of each per item (None for an item "
                         "without an image).")
    return texts, images, len(texts) if texts is not None else len(images)


class PMMRecItemEncoder(PMMRecPreTrainedModel):
    """Item encoder: text tower + vision tower, token projections to d, merge-attention fusion.

    Inputs are the batch's distinct items: `input_ids`/`attention_mask` (N, T) and/or `pixel_values`
    (N, 3, H, W); or precomputed frozen-tower features `text_features` / `vision_features` (the hidden state
    entering the first trainable block, e.g. from a feature cache) in their place.
    """

    config_class = PMMRecItemEncoderConfig
    base_model_prefix = "item_encoder"
    main_input_name = "input_ids"  # "pixel_values" for a vision-only encoder (set per instance)

    def __init__(self, config: PMMRecItemEncoderConfig, text_model: nn.Module | None = None, vision_model: nn.Module | None = None):
        requested_attn = self._requested_attn_implementation(config)
        super().__init__(config)
        self.main_input_name = "pixel_values" if config.modality == "vision" else "input_ids"
        self._processor = None
        d = config.hidden_size
        self.text_tower = self.vision_tower = None
        self.text_projection = self.vision_projection = None
        if config.uses_text:
            self.text_projection = nn.Linear(config.text_hidden_size, d)
        if config.uses_vision:
            self.vision_projection = nn.Linear(config.vision_hidden_size, d)
        self.fusion = None
        if config.modality == "multimodal":
            self.fusion = nn.ModuleList(
                PMMRecTransformerLayer(
                    d, config.fusion_num_attention_heads, config.fusion_intermediate_size, config.fusion_hidden_act,
                    config.fusion_dropout, config.fusion_dropout, config.fusion_layer_norm_eps, config=config,
                )
                for _ in range(config.fusion_num_layers)
            )
        # Backbones are attached after our own layers are initialised, so `_init_weights` never sees them
        # and pretrained weights handed in stay bit-identical.
        build = text_model is None and vision_model is None
        if build:
            self._attach_backbones(
                _build_backbone(config.text_config, requested_attn) if config.uses_text else None,
                _build_backbone(config.vision_config, requested_attn) if config.uses_vision else None,
            )
        self.post_init()
        if not build:
            self._attach_backbones(text_model, vision_model)
            self._pass_attn_implementation(requested_attn, text_model, vision_model)
        self._collect_no_split_modules(self.text_model, self.vision_model)

    def _attach_backbones(self, text_model, vision_model) -> None:
        config = self.config
        if config.uses_text:
            if text_model is None:
                raise ValueError("A text backbone is required for modality " + repr(config.modality))
            self.text_tower = BackboneTower(text_model, config.text_trainable_layers, "inputs_embeds")
        if config.uses_vision:
            if vision_model is None:
                raise ValueError("A vision backbone is required for modality " + repr(config.modality))
            self.vision_tower = BackboneTower(vision_model, config.vision_trainable_layers, "pixel_values")
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Set which tower parameters train: each tower's top `*_trainable_layers` blocks (all of it for -1),
        minus the backbone parts the item encoder never uses (see `BackboneTower.apply_freezing`). The
        projections and the fusion always train. Called on construction and after `from_pretrained`."""
        for tower in (self.text_tower, self.vision_tower):
            if tower is not None:
                tower.apply_freezing(self._example_inputs(tower))

    def _example_inputs(self, tower: BackboneTower) -> dict:
        """A one-item dummy input of the tower (2 tokens, or one blank image of the configured size)."""
        device = next(tower.backbone.parameters()).device
        if tower is self.text_tower:
            ids = torch.ones(1, 2, dtype=torch.long, device=device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        size = getattr(getattr(tower.backbone, "config", None), "image_size", None) or self.config.image_size
        if isinstance(size, (tuple, list)):
            size = size[0]
        dtype = next(tower.backbone.parameters()).dtype
        return {"pixel_values": torch.zeros(1, 3, size, size, device=device, dtype=dtype)}

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """Two items in the inputs this encoder reads (token ids / attention mask, and / or blank images)."""
        inputs: dict[str, torch.Tensor] = {}
        device = self.device
        if self.config.uses_text:
            ids = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]], dtype=torch.long, device=device)
            inputs.update(input_ids=ids, attention_mask=(ids > 0).long())
        if self.config.uses_vision:
            tower = self._example_inputs(self.vision_tower)["pixel_values"]
            inputs["pixel_values"] = tower.expand(2, -1, -1, -1).clone()
        return inputs

    def set_processor(self, processor) -> None:
        """The processor `encode` uses (default: the one saved with the checkpoint this model was loaded from)."""
        self._processor = processor

    def get_processor(self, **kwargs) -> PMMRecProcessor:
        """The `PMMRecProcessor` of this item encoder: the one set with `set_processor`, else the one saved with the
        checkpoint it was loaded from (`name_or_path`; Hub options in `kwargs`), else, for a vision-only encoder, one
        built from the config. A text encoder without a saved processor needs its tokenizer: raises ValueError."""
        if self._processor is None:
            source = getattr(self, "name_or_path", None) or getattr(self.config, "_name_or_path", None)
            found = None
            if source:
                try:
                    found = PMMRecProcessor.from_pretrained(source, **kwargs)
                except OSError:
                    found = None
            if found is None and not self.config.uses_text:
                found = PMMRecProcessor.from_item_config(self.config)
            if found is None:
                raise ValueError(
                    f"No PMMRec processor for this item encoder ({source or 'not loaded from a folder'} has no "
                    "processor_config.json): pass `processor=PMMRecProcessor.from_item_config(model.config, tokenizer)` "
                    "(the text backbone's tokenizer), or call `set_processor` first."
                )
            self._processor = found
        return self._processor

    def encode(
        self,
        texts=None,
        images=None,
        *,
        processor: PMMRecProcessor | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
    ):
        """Item embeddings of raw items, sentence-transformers style.

        Args:
            texts (`list[str]`, *optional*): one text per item (required unless the encoder is vision-only).
            images (`list`, *optional*): one image per item (PIL image of any mode, bytes, path, uint8 array; None
                for an item without an image); required for a vision-only encoder, optional for a multi-modal one
                (then every item is embedded from its text alone, as an item without an image is in training).
            processor (`PMMRecProcessor`, *optional*): default `get_processor()`.
            batch_size (`int`, *optional*, defaults to 32): items per forward pass.
            normalize (`bool`, *optional*, defaults to `False`): L2-normalise each embedding.
            show_progress_bar (`bool`, *optional*, defaults to `False`): a tqdm bar over the batches.
            convert_to_tensor (`bool`, *optional*, defaults to `False`): return a torch tensor instead of numpy.

        Returns:
            `np.ndarray` (or `torch.Tensor`) of shape (num_items, hidden_size), float32, on the CPU. Runs in eval mode
            under `torch.inference_mode()`; the model's mode is restored.
        """
        texts, images, count = _check_raw_items(texts, images, self.config)
        processor = processor if processor is not None else self.get_processor()
        pieces = []
        with _InferenceMode(self):
            for start in _batches(count, batch_size, show_progress_bar, "Encoding items"):
                pieces.append(self._encode_raw(processor, texts, images, start, start + batch_size))
        embeddings = torch.cat(pieces) if pieces else torch.zeros(0, self.config.hidden_size)
        if normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return _to_numpy_or_tensor(embeddings, convert_to_tensor)

    def _encode_raw(self, processor, texts, images, start: int, stop: int) -> torch.Tensor:
        """Raw item embeddings (N, d) of items [start, stop) of `texts` / `images` (lists or None)."""
        batch_texts = texts[start:stop] if texts is not None else None
        count = len(batch_texts) if batch_texts is not None else len(images[start:stop])
        batch_images = images[start:stop] if images is not None else None
        if batch_images is None and self.config.modality == "multimodal":
            batch_images = [None] * count  # no image: embedded from the text alone
        inputs = processor(text=batch_texts if self.config.uses_text else None,
                           images=batch_images if self.config.uses_vision else None)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return self(**inputs).item_embeddings.float().cpu()

    @property
    def text_model(self) -> nn.Module | None:
        return self.text_tower.backbone if self.text_tower is not None else None

    @property
    def vision_model(self) -> nn.Module | None:
        return self.vision_tower.backbone if self.vision_tower is not None else None

    @classmethod
    def from_backbones_pretrained(
        cls,
        text_model: str | None = None,
        vision_model: str | None = None,
        modality: str | None = None,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "PMMRecItemEncoder":
        """Build an item encoder around pretrained backbones (Hub ids or local folders).

        The vision checkpoint may be a vision model or a dual encoder (e.g. `openai/clip-vit-base-patch32`),
        whose vision part is taken. Every backbone weight must load: missing weights raise a ValueError.
        """
        backbone_kwargs = backbone_kwargs or {}
        if modality is None:
            modality = "multimodal" if text_model and vision_model else ("text" if text_model else "vision")
        loaded = {}
        for field, source in (("text_config", text_model), ("vision_config", vision_model)):
            if source is None:
                continue
            config = AutoConfig.from_pretrained(source, **backbone_kwargs)
            if field == "vision_config" and getattr(config, "vision_config", None) is not None:
                config = config.vision_config
            if field == "text_config" and getattr(config, "text_config", None) is not None and not hasattr(config, "vocab_size"):
                config = config.text_config
            model, info = _backbone_class(config).from_pretrained(source, output_loading_info=True, **backbone_kwargs)
            # heads we never use (poolers, classifiers) may be absent; anything on the token path may not
            missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_UNUSED_BACKBONE_PARTS))
            if missing:
                raise ValueError(
                    f"Backbone '{source}' left weights uninitialised ({missing[:5]}): the checkpoint does not match "
                    "its architecture (e.g. weights saved under other key names by another transformers version)."
                )
            loaded[field] = model
        config = PMMRecItemEncoderConfig(
            text_config=loaded["text_config"].config if "text_config" in loaded else None,
            vision_config=loaded["vision_config"].config if "vision_config" in loaded else None,
            modality=modality,
            **config_kwargs,
        )
        return cls(config, text_model=loaded.get("text_config"), vision_model=loaded.get("vision_config"))

    # frozen-part features (what a feature cache stores)
    def text_frozen_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_tower.frozen_features({"input_ids": input_ids, "attention_mask": attention_mask})

    def vision_frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.frozen_features({"pixel_values": pixel_values})

    def _text_tokens(self, input_ids, attention_mask, text_features):
        if text_features is not None:
            self._ensure_stem(self.text_tower, text_features, attention_mask)
            return self.text_tower.forward_from_features(text_features, attention_mask)
        if input_ids is None:
            raise ValueError("The text tower needs `input_ids` (or `text_features`).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.text_tower({"input_ids": input_ids, "attention_mask": attention_mask}, attention_mask)

    def _vision_tokens(self, pixel_values, vision_features):
        if vision_features is not None:
            self._ensure_stem(self.vision_tower, vision_features, None)
            return self.vision_tower.forward_from_features(vision_features)
        if pixel_values is None:
            raise ValueError("The vision tower needs `pixel_values` (or `vision_features`).")
        return self.vision_tower({"pixel_values": pixel_values})

    def _projected_vision_tokens(self, pixel_values, vision_features, image_mask) -> torch.Tensor:
        """(N, V, d) projected image tokens. Items that `image_mask` marks as having no image do not run through
        the vision tower: the fusion leaves their image tokens out (as keys and from the mean), so their
        embeddings do not depend on them, and their tokens are zeros (their `vision_embeddings` are meaningless).
        On a text-only platform in a multi-modal model that skips the whole tower."""
        if image_mask is None:
            return self.vision_projection(self._vision_tokens(pixel_values, vision_features))
        source = vision_features if vision_features is not None else pixel_values
        has_image = image_mask.to(device=source.device, dtype=torch.bool)
        if bool(has_image.all()):
            return self.vision_projection(self._vision_tokens(pixel_values, vision_features))
        keep = has_image.nonzero().squeeze(1)
        run = keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=source.device)  # token shape only
        tokens = self.vision_projection(self._vision_tokens(
            None if pixel_values is None else pixel_values[run],
            None if vision_features is None else vision_features[run]))  # (len(run), V, d)
        out = tokens.new_zeros((source.shape[0], *tokens.shape[1:]))
        if keep.numel():
            return out.index_copy(0, keep, tokens)
        # no item has an image: zeros, still connected to the tower (zero gradients, so that every trainable
        # parameter gets a gradient in every step, as DistributedDataParallel requires)
        return out + 0.0 * tokens.sum()

    def _ensure_stem(self, tower: BackboneTower, features, attention_mask) -> None:
        """Features can be given before the tower ever ran on raw inputs (e.g. from a feature cache on a freshly
        loaded model): run its frozen part once on a dummy input so that it knows its stem modules."""
        if tower._stem_names is not None:
            return
        tower.frozen_features(self._example_inputs(tower))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        token_packing=None,
        **kwargs,
    ) -> PMMRecItemEncoderOutput | tuple:
        r"""Embed a batch of N items from their text and / or image.

        Args:
            input_ids (`torch.LongTensor` of shape `(N, T)`, *optional*):
                Token ids of each item's text (the `PMMRecProcessor`'s output). Required by a text or multi-modal
                encoder unless `text_features` are given.
            attention_mask (`torch.LongTensor` of shape `(N, T)`, *optional*):
                1 for real tokens, 0 for padding (default: all ones).
            pixel_values (`torch.FloatTensor` of shape `(N, 3, H, W)`, *optional*):
                Each item's image, processed by the `PMMRecImageProcessor`. Required by a vision or multi-modal
                encoder unless `vision_features` are given.
            text_features (`torch.FloatTensor`, *optional*):
                Precomputed frozen-tower text features (`text_frozen_features`, e.g. from a `FeatureCache`), in place
                of `input_ids`.
            vision_features (`torch.FloatTensor`, *optional*):
                Precomputed frozen-tower image features (`vision_frozen_features`), in place of `pixel_values`.
            image_mask (`torch.BoolTensor` of shape `(N,)`, *optional*):
                False for an item without a real image (its `pixel_values` are a placeholder). A multi-modal encoder
                then leaves that item's image tokens out of the fusion (as attention keys and from the mean): its
                embedding comes from its text alone. The processor and the collator give it.
            return_dict (`bool`, *optional*):
                Return a [`PMMRecItemEncoderOutput`] (default) or a plain tuple.
            token_packing (`pmmrec_hf.packing.TokenPacking`, *optional*):
                Run the text tower's trainable blocks and the fusion on the real tokens only (packed, with
                variable-length attention); the plan must describe these inputs (their text lengths and
                `image_mask`). Same embeddings up to float rounding; `last_hidden_state` is then None. Default
                off (multi-modal encoders only).

        Returns:
            [`PMMRecItemEncoderOutput`] or `tuple`: `item_embeddings` (N, d), `text_embeddings` (N, d) or None,
            `vision_embeddings` (N, d) or None, `last_hidden_state` (N, T + V, d) (multi-modal only), `image_mask`;
            as a tuple, the fields that are not None, in that order.
        """
        config = self.config
        text_emb = vision_emb = fused = None
        if token_packing is not None:
            try:  # package-only (not a remote-code requirement: imports inside `try` are not checked)
                from pmmrec_hf.packing import packed_item_forward
            except ImportError as error:
                raise ImportError("token_packing needs the pmmrec_hf package (pip install pmmrec_hf).") from error
            item_emb, text_emb, vision_emb = packed_item_forward(
                self, token_packing, input_ids=input_ids, attention_mask=attention_mask, text_features=text_features,
                pixel_values=pixel_values, vision_features=vision_features, image_mask=image_mask,
            )
            output = PMMRecItemEncoderOutput(item_embeddings=item_emb, text_embeddings=text_emb,
                                             vision_embeddings=vision_emb, image_mask=image_mask)
            return output if _check_return_dict(return_dict, config) else output.to_tuple()
        if config.uses_text:
            if attention_mask is None and input_ids is not None:
                attention_mask = torch.ones_like(input_ids)
            text_tokens = self.text_projection(self._text_tokens(input_ids, attention_mask, text_features))  # (N,T,d)
            text_mask = attention_mask.bool() if attention_mask is not None else torch.ones(
                text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device
            )  # (N, T)
            text_emb = _masked_mean(text_tokens, text_mask)  # (N, d)
        if config.uses_vision:
            vision_tokens = self._projected_vision_tokens(
                pixel_values, vision_features, image_mask if config.modality == "multimodal" else None)  # (N,V,d)
            vision_emb = vision_tokens.mean(1)  # (N, d)
        if config.modality == "multimodal":
            tokens = torch.cat([text_tokens, vision_tokens], dim=1)  # (N, T+V, d)
            image_tokens = torch.ones(vision_tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (N, V)
            if image_mask is not None:
                image_tokens = image_tokens & image_mask.to(device=tokens.device, dtype=torch.bool)[:, None]
            mask = torch.cat([text_mask, image_tokens], dim=1)  # (N, T+V)
            allowed = mask[:, None, None, :]  # (N, 1, 1, T+V)
            for layer in self.fusion:
                tokens = layer(tokens, allowed)
            fused = tokens
            item_emb = _masked_mean(tokens, mask)  # (N, d)
        else:
            item_emb = text_emb if config.modality == "text" else vision_emb
        output = PMMRecItemEncoderOutput(
            item_embeddings=item_emb, text_embeddings=text_emb, vision_embeddings=vision_emb, last_hidden_state=fused,
            image_mask=image_mask,
        )
        return output if _check_return_dict(return_dict, config) else output.to_tuple()


def _as_history_list(histories, hidden_size: int) -> list[torch.Tensor]:
    if isinstance(histories, (torch.Tensor, np.ndarray)):
        histories = torch.as_tensor(histories)
        if histories.dim() != 3:
            raise ValueError(f"`histories` as one tensor must be (num_users, length, d), got shape {tuple(histories.shape)}.")
        histories = list(histories)
    result = []
    for user, history in enumerate(histories):
        history = torch.as_tensor(history, dtype=torch.float32)
        if history.dim() != 2 or history.shape[-1] != hidden_size:
            raise ValueError(f"history {user}: expected item embeddings of shape (length, {hidden_size}), got "
                             f"{tuple(history.shape)}.")
        if history.shape[0] == 0:
            raise ValueError(f"history {user} is empty: a user needs at least one item.")
        result.append(history)
    return result


def _left_pad(histories: list[torch.Tensor], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, d) left-padded embeddings of the last `max_length` items of each history, and the (B, S) bool mask."""
    histories = [h[-max_length:] for h in histories]
    length = max(h.shape[0] for h in histories)
    embeds = torch.zeros(len(histories), length, histories[0].shape[-1])
    mask = torch.zeros(len(histories), length, dtype=torch.bool)
    for row, history in enumerate(histories):
        embeds[row, length - history.shape[0]:] = history
        mask[row, length - history.shape[0]:] = True
    return embeds, mask


class PMMRecUserEncoder(PMMRecPreTrainedModel):
    """SASRec-style causal transformer over item embeddings (left-padded sequences, learned positions)."""

    config_class = PMMRecUserEncoderConfig
    base_model_prefix = "user_encoder"
    main_input_name = "inputs_embeds"

    def __init__(self, config: PMMRecUserEncoderConfig):
        super().__init__(config)
        d = config.hidden_size
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.input_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            PMMRecTransformerLayer(
                d, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.layer_norm_eps,
                config.layer_norm_position, config=config,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.layer_norm_position == "pre" else None
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """Two users' histories of item embeddings (the first left-padded)."""
        d = self.config.hidden_size
        embeds = torch.zeros(2, 3, d, device=self.device, dtype=self.dtype)
        return {"inputs_embeds": embeds, "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]], device=self.device)}

    def encode(
        self,
        histories,
        *,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
    ):
        """User embeddings (the state after each history's last item) from histories of item embeddings.

        Args:
            histories: one sequence of item embeddings per user, oldest first: a list of (L_i, d) arrays / tensors
                (lengths may differ), or a (B, L, d) tensor / array. Only the last `max_position_embeddings` items
                of a history are read (the training window); an empty history is an error.
            batch_size, normalize, show_progress_bar, convert_to_tensor: as in `PMMRecItemEncoder.encode`.

        Returns:
            `np.ndarray` (or `torch.Tensor`) of shape (num_users, hidden_size), float32, on the CPU.
        """
        histories = _as_history_list(histories, self.config.hidden_size)
        pieces = []
        with _InferenceMode(self):
            for start in _batches(len(histories), batch_size, show_progress_bar, "Encoding users"):
                embeds, mask = _left_pad(histories[start:start + batch_size], self.config.max_position_embeddings)
                out = self(inputs_embeds=embeds.to(device=self.device, dtype=self.dtype), attention_mask=mask.to(self.device))
                pieces.append(out.user_embeddings.float().cpu())
        embeddings = torch.cat(pieces) if pieces else torch.zeros(0, self.config.hidden_size)
        if normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return _to_numpy_or_tensor(embeddings, convert_to_tensor)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PMMRecUserEncoderOutput | tuple:
        r"""Encode users from the embeddings of the items they interacted with.

        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(B, S, d)`):
                Item embeddings of each user's history, oldest first, left-padded (the last column is the most
                recent item); S is at most `config.max_position_embeddings`.
            attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*):
                1 (True) at real items, 0 at padding (default: all real).
            return_dict (`bool`, *optional*):
                Return a [`PMMRecUserEncoderOutput`] (default) or a plain tuple.

        Returns:
            [`PMMRecUserEncoderOutput`] or `tuple`: `last_hidden_state` (B, S, d), the user state after each position,
            and `user_embeddings` (B, d), the state at the last position.
        """
        batch, length, _ = inputs_embeds.shape
        max_length = self.config.max_position_embeddings
        if length > max_length:
            raise ValueError(
                f"Sequence length {length} exceeds the user encoder's `max_position_embeddings` ({max_length})."
            )
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
        key_valid = attention_mask.bool()  # (B, S)
        # right-aligned positions: the last slot always has position max_length - 1
        positions = torch.arange(max_length - length, max_length, device=inputs_embeds.device)  # (S,)
        hidden = inputs_embeds + self.position_embeddings(positions)[None]  # (B, S, d)
        if self.final_norm is None:
            hidden = self.input_norm(hidden)
        hidden = self.dropout(hidden)
        idx = torch.arange(length, device=inputs_embeds.device)
        causal = idx[None, :] <= idx[:, None]  # (S, S) key <= query
        diagonal = idx[None, :] == idx[:, None]  # (S, S): padding queries see themselves (no empty rows)
        allowed = (causal[None] & (key_valid[:, None, :] | diagonal[None]))[:, None]  # (B, 1, S, S)
        for layer in self.layers:
            hidden = layer(hidden, allowed)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        output = PMMRecUserEncoderOutput(last_hidden_state=hidden, user_embeddings=hidden[:, -1])
        return output if _check_return_dict(return_dict, self.config) else output.to_tuple()


def _split_raw_items(items: list, user: int):
    """(texts or None, images or None) of a history of raw items (a text, or a dict with "text" / "image")."""
    texts, images = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            images.append(None)
        elif isinstance(item, dict):
            unknown = set(item) - {"text", "image"}
            if unknown:
                raise ValueError(f"history {user}: an item dict takes 'text' and 'image', got {sorted(unknown)}.")
            texts.append(item.get("text"))
            images.append(item.get("image"))
        else:
            raise ValueError(f"history {user}: an item is a text or a dict with 'text' / 'image', got "
                             f"{type(item).__name__}.")
    has_text = any(t is not None for t in texts)
    has_image = any(i is not None for i in images)
    return (texts if has_text else None), (images if has_image else None)


class PMMRecModel(PMMRecPreTrainedModel):
    """PMMRec: item encoder + user encoder + the pre-training objectives (next-item, NICL, NID, RCL).

    `forward` takes a batch of B sequences over N distinct items (see docs/formats.md): the items' inputs,
    `item_ids` (N,), `item_index` (B, S) left-padded with -1; columns [:, :-1] are inputs and [:, 1:] the
    next-item targets. Optional `item_log_popularity` (N,) for the log-q correction and, for NID/RCL, the
    corrupted input sequences with `noise_labels` (B, S-1): either `corrupted_index` (indices into this
    process's N items) or `corrupted_item_ids` (item ids, -1 at padding; with negatives gathered across
    processes they may name items of any process's batch, which is how the training loop corrupts a
    sequence with items of the whole global batch).
    """

    config_class = PMMRecConfig
    base_model_prefix = "pmmrec"
    main_input_name = "item_index"

    def __init__(
        self,
        config: PMMRecConfig,
        item_encoder: PMMRecItemEncoder | None = None,
        user_encoder: PMMRecUserEncoder | None = None,
    ):
        requested_attn = self._requested_attn_implementation(config)
        if requested_attn is not None:  # the encoders (and their backbones) use what was asked for the model
            config.item_encoder_config._attn_implementation_internal = requested_attn
            config.user_encoder_config._attn_implementation_internal = requested_attn
        super().__init__(config)
        d = config.item_encoder_config.hidden_size
        p = config.nicl_projection_size
        self.nicl_text_head = self.nicl_vision_head = None
        if config.item_encoder_config.modality == "multimodal":
            self.nicl_text_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, p))
            self.nicl_vision_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, p))
        self.nid_head = nn.Linear(d, 1)
        if item_encoder is None:
            self.item_encoder = PMMRecItemEncoder(config.item_encoder_config)
        if user_encoder is None:
            self.user_encoder = PMMRecUserEncoder(config.user_encoder_config)
        self.post_init()
        # encoders handed in (pretrained) are attached after initialisation, untouched
        if item_encoder is not None:
            self.item_encoder = item_encoder
        if user_encoder is not None:
            self.user_encoder = user_encoder
        self._collect_no_split_modules(self.item_encoder, self.user_encoder)
        self.apply_freezing()

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """A training batch of two users over the two dummy items of the item encoder."""
        inputs = dict(self.item_encoder.dummy_inputs)
        inputs["item_ids"] = torch.tensor([0, 1], device=self.device)
        inputs["item_index"] = torch.tensor([[-1, 0, 1], [1, 0, 1]], device=self.device)
        return inputs

    def get_processor(self, **kwargs) -> PMMRecProcessor:
        """The item encoder's `PMMRecProcessor` (see `PMMRecItemEncoder.get_processor`; this model's checkpoint first)."""
        item = self.item_encoder
        if item._processor is None:
            source = getattr(self, "name_or_path", None)
            if source:
                try:
                    item._processor = PMMRecProcessor.from_pretrained(source, **kwargs)
                except OSError:
                    pass
        return item.get_processor(**kwargs)

    def set_processor(self, processor) -> None:
        self.item_encoder.set_processor(processor)

    def encode(self, texts=None, images=None, *, processor=None, batch_size: int = 32, normalize: bool | None = None,
               show_progress_bar: bool = False, convert_to_tensor: bool = False):
        """Item embeddings of raw items as this model scores them (`PMMRecItemEncoder.encode`, L2-normalised when
        `next_item_similarity="cosine"`; `normalize=True` forces it). Same arguments and return value."""
        if normalize is None:
            normalize = self.config.next_item_similarity == "cosine"
        return self.item_encoder.encode(
            texts, images, processor=processor if processor is not None else self.get_processor(),
            batch_size=batch_size, normalize=normalize, show_progress_bar=show_progress_bar,
            convert_to_tensor=convert_to_tensor,
        )

    def apply_freezing(self) -> None:
        """Make exactly the parameters that the configured objectives use trainable: the NICL heads only when
        `nicl_weight > 0` (and the item encoder is multi-modal), the NID head only when `nid_weight > 0`, and
        the item encoder's towers as `PMMRecItemEncoder.apply_freezing` sets them. Every trainable parameter
        then receives a gradient in every step, which DistributedDataParallel requires. Called on
        construction and after `from_pretrained`; call it again after changing an objective weight."""
        config = self.config
        if self.nicl_text_head is not None:
            use_nicl = config.nicl_weight > 0
            self.nicl_text_head.requires_grad_(use_nicl)
            self.nicl_vision_head.requires_grad_(use_nicl)
        self.nid_head.requires_grad_(config.nid_weight > 0)
        self.item_encoder.apply_freezing()

    @classmethod
    def from_encoders(
        cls,
        item_encoder: PMMRecItemEncoder | str,
        user_encoder: PMMRecUserEncoder | str | None = None,
        **config_kwargs,
    ) -> "PMMRecModel":
        """Assemble a full model from an item encoder and a user encoder (objects, folders or Hub ids).

        Without a user encoder a fresh one of matching width is created. The pre-training heads (NICL,
        NID) are newly initialised.
        """
        if isinstance(item_encoder, str):
            item_encoder = PMMRecItemEncoder.from_pretrained(item_encoder)
        if isinstance(user_encoder, str):
            user_encoder = PMMRecUserEncoder.from_pretrained(user_encoder)
        user_config = user_encoder.config if user_encoder is not None else None
        config = PMMRecConfig(item_encoder_config=item_encoder.config, user_encoder_config=user_config, **config_kwargs)
        return cls(config, item_encoder=item_encoder, user_encoder=user_encoder)

    def encode_items(self, **item_inputs) -> torch.Tensor:
        """(N, d) item embeddings from item inputs (input_ids, attention_mask, pixel_values, or features);
        L2-normalised with `next_item_similarity="cosine"`."""
        return _normalise_if_cosine(self.item_encoder(**item_inputs).item_embeddings, self.config)

    def encode_users(
        self,
        item_embeddings: torch.Tensor | None = None,
        item_index: torch.Tensor | None = None,
        *,
        histories=None,
        processor=None,
        batch_size: int = 32,
        normalize: bool | None = None,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
    ):
        """User states, in one of two forms.

        - `encode_users(item_embeddings, item_index)`: sequences given as indices (B, S) into `item_embeddings`
          (N, d), -1 at padding; returns a [`PMMRecUserEncoderOutput`] (what training and evaluation use).
        - `encode_users(histories=...)`: one history per user, oldest first, each either a (L_i, d) array / tensor
          of item embeddings (as `encode` returns them) or a list of raw items (a text, or a dict with "text"
          and / or "image"); returns the (num_users, d) user embeddings as numpy (or a tensor with
          `convert_to_tensor`), L2-normalised with `next_item_similarity="cosine"` (or `normalize=True`).
        """
        if histories is None:
            if item_embeddings is None or item_index is None:
                raise ValueError("Give `item_embeddings` and `item_index`, or `histories=`.")
            return _encode_users(self.user_encoder, item_embeddings, item_index, self.config)
        if item_embeddings is not None or item_index is not None:
            raise ValueError("Give `histories=` alone, or `item_embeddings` with `item_index`, not both.")
        if normalize is None:
            normalize = self.config.next_item_similarity == "cosine"
        embedded = []
        for user, history in enumerate(histories):
            if isinstance(history, (torch.Tensor, np.ndarray)):
                embedded.append(torch.as_tensor(history, dtype=torch.float32))
                continue
            history = list(history)
            if not history:
                raise ValueError(f"history {user} is empty: a user needs at least one item.")
            texts, images = _split_raw_items(history, user)
            embedded.append(self.encode(texts, images, processor=processor, batch_size=batch_size,
                                        normalize=None, convert_to_tensor=True))
        embedded = [_normalise_if_cosine(h, self.config) for h in embedded]
        users = self.user_encoder.encode(embedded, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                         convert_to_tensor=True)
        if normalize:
            users = F.normalize(users, dim=-1)
        return _to_numpy_or_tensor(users, convert_to_tensor)

    def forward(
        self,
        item_ids: torch.Tensor,
        item_index: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        item_log_popularity: torch.Tensor | None = None,
        corrupted_index: torch.Tensor | None = None,
        noise_labels: torch.Tensor | None = None,
        corrupted_item_ids: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
        token_packing=None,
        sync_free: bool = False,
        **kwargs,
    ) -> PMMRecModelOutput | tuple:
        r"""One pre-training (or inference) step on a batch of B user sequences over N distinct items.

        Args:
            item_ids (`torch.LongTensor` of shape `(N,)`):
                Id of each distinct item of the batch (rows of items.parquet); the same item never appears twice.
            item_index (`torch.LongTensor` of shape `(B, S)`):
                Each sequence as indices into the N items, oldest first, left-padded with -1. With `return_loss`
                columns `[:, :-1]` are the inputs and `[:, 1:]` the next-item targets; without, the whole row is the
                history to encode (at most `max_position_embeddings` columns).
            input_ids, attention_mask, pixel_values, text_features, vision_features, image_mask:
                The N items' inputs, as [`PMMRecItemEncoder.forward`] takes them.
            item_log_popularity (`torch.FloatTensor` of shape `(N,)`, *optional*):
                log q(item) for the log-q correction of the next-item loss.
            corrupted_index (`torch.LongTensor` of shape `(B, S - 1)`, *optional*):
                Corrupted input sequences (indices into the N items) for NID / RCL.
            corrupted_item_ids (`torch.LongTensor` of shape `(B, S - 1)`, *optional*):
                The same as item ids (-1 at padding), which may name items of other processes' batches.
            noise_labels (`torch.LongTensor` of shape `(B, S - 1)`, *optional*):
                1 where the corrupted sequence holds a replaced item, 0 where not, -100 at padding (NID targets).
            return_loss (`bool`, *optional*, defaults to `True`):
                Compute the objectives (False: only embed the items and encode the sequences).
            return_dict (`bool`, *optional*):
                Return a [`PMMRecModelOutput`] (default) or a plain tuple.
            token_packing (`pmmrec_hf.packing.TokenPacking`, *optional*):
                Packed text tokens in the item encoder (see [`PMMRecItemEncoder.forward`]). Default off.
            sync_free (`bool`, *optional*, defaults to `False`):
                Compute the next-item and NICL losses with static shapes and no device-to-host synchronisation
                (every position scored and masked instead of selected, ids grouped by sorting instead of
                `torch.unique`): the same losses up to float summation order. NID / RCL keep their selections.

        Returns:
            [`PMMRecModelOutput`] or `tuple`: `loss` (the weighted sum of the objectives computed), `next_item_loss`,
            `nicl_loss`, `nid_loss`, `rcl_loss`, `item_embeddings` (N, d), `user_states` (B, S', d),
            `user_embeddings` (B, d), `nid_logits` (B, S - 1); as a tuple, the fields that are not None, in that
            order.
        """
        config = self.config
        as_tuple = not _check_return_dict(return_dict, config)
        if corrupted_index is not None and corrupted_item_ids is not None:
            raise ValueError("Give the corrupted sequences as `corrupted_index` or as `corrupted_item_ids`, not both.")
        if not return_loss:
            _check_inference_index(item_index, config.user_encoder_config.max_position_embeddings)
        items = self.item_encoder(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            text_features=text_features, vision_features=vision_features, image_mask=image_mask,
            token_packing=token_packing,
        )
        item_emb = _normalise_if_cosine(items.item_embeddings, config)  # (N, d)
        if not return_loss:
            users = self.encode_users(item_emb, item_index)
            output = PMMRecModelOutput(
                item_embeddings=item_emb, user_states=users.last_hidden_state, user_embeddings=users.user_embeddings
            )
            return output.to_tuple() if as_tuple else output

        inputs, targets = item_index[:, :-1], item_index[:, 1:]  # (B, L), (B, L)
        users = self.encode_users(item_emb, inputs)
        states = users.last_hidden_state  # (B, L, d)
        gather = config.gather_negatives
        pool = _GatheredItems(item_emb, item_ids, item_log_popularity, gather)
        losses: dict[str, torch.Tensor] = {}
        weights = {
            "next_item_loss": config.next_item_weight,
            "nicl_loss": config.nicl_weight,
            "nid_loss": config.nid_weight,
            "rcl_loss": config.rcl_weight,
        }

        if config.next_item_weight > 0:
            positions = (inputs >= 0) & (targets >= 0)  # (B, L)
            if sync_free:  # every slot scored (static shapes), padding masked out of the sum below
                batch, length = inputs.shape
                query_users = torch.arange(batch, device=inputs.device).repeat_interleave(length)  # (B * L,)
                query, query_targets = states.reshape(batch * length, -1), targets.reshape(-1).clamp(min=0)
            else:  # the real positions only (P,)
                query_users, query_slots = positions.nonzero(as_tuple=True)  # (P,), (P,)
                query, query_targets = states[query_users, query_slots], targets[query_users, query_slots]
            loss = next_item_loss(
                query=_normalise_if_cosine(query, config),
                candidates=pool.embeddings,
                targets=query_targets + pool.offset,
                query_users=query_users,
                user_item_ids=_user_item_ids(item_index, item_ids),
                candidate_ids=pool.ids,
                candidate_log_q=pool.log_q if config.logq_correction else None,
                candidate_valid=pool.valid,
                reduction="none" if sync_free else "sum",
                temperature=config.next_item_temperature,
                sync_free=sync_free,
            )  # (B * L,) per slot, or the sum over the real positions
            if sync_free:
                total, count = torch.where(positions.reshape(-1), loss, torch.zeros_like(loss)).sum(), positions.sum()
            else:
                total, count = loss, query_users.numel()
            losses["next_item_loss"] = _mean(total, count, gather)

        if config.nicl_weight > 0 and self.nicl_text_head is not None:
            text = F.normalize(self.nicl_text_head(items.text_embeddings), dim=-1)  # (N, p)
            vision = F.normalize(self.nicl_vision_head(items.vision_embeddings), dim=-1)  # (N, p)
            has_image = (torch.ones_like(item_ids, dtype=torch.bool) if image_mask is None
                         else image_mask.to(device=item_ids.device, dtype=torch.bool))  # (N,)
            extra = {}
            if gather:
                all_text, valid, offset = gather_across_processes(text)
                if all_text.shape[0] != text.shape[0]:  # several processes: other processes' items join the pool
                    all_vision = gather_across_processes(vision)[0]
                    all_ids = gather_across_processes(item_ids)[0]
                    all_has_image = gather_across_processes(has_image.long())[0].bool()
                    local = torch.zeros_like(valid)
                    local[offset : offset + text.shape[0]] = True
                    # local rows are matched by index inside nicl_loss: move them to the front
                    order = torch.cat([local.nonzero().squeeze(1), (~local).nonzero().squeeze(1)])
                    extra = dict(
                        candidate_text=all_text[order], candidate_vision=all_vision[order],
                        candidate_ids=all_ids[order], candidate_is_local=local[order], candidate_valid=valid[order],
                        candidate_has_image=all_has_image[order],
                    )
            total, anchors = nicl_loss(text, vision, item_index, item_ids, config.nicl_temperature, reduction="sum",
                                       item_has_image=has_image, return_count=True, sync_free=sync_free, **extra)
            losses["nicl_loss"] = _mean(total, anchors if sync_free else int(anchors), gather)

        corrupted = corrupted_index if corrupted_index is not None else corrupted_item_ids
        if corrupted is not None and (config.nid_weight > 0 or config.rcl_weight > 0):
            if corrupted_index is not None:
                noisy = self.encode_users(item_emb, corrupted_index).last_hidden_state  # (B, L, d)
            else:  # ids -> rows of the (gathered) pool of items
                rows = rows_of_ids(corrupted_item_ids, pool.ids, pool.valid)  # (B, L)
                noisy = self.encode_users(pool.embeddings, rows).last_hidden_state  # (B, L, d)
            nid_logits = self.nid_head(noisy).squeeze(-1)  # (B, L)
            if config.nid_weight > 0:
                if noise_labels is None:
                    raise ValueError("`noise_labels` are required with `corrupted_index` when nid_weight > 0.")
                total = nid_loss(nid_logits, noise_labels, reduction="sum")
                losses["nid_loss"] = _mean(total, int((noise_labels != -100).sum()), gather)
            if config.rcl_weight > 0:
                clean_rep, noisy_rep = states[:, -1], noisy[:, -1]  # (B, d)
                # a user with no real input position has no representation of its own: not in RCL
                has_input = (inputs >= 0).any(1)  # (B,)
                extra = {"valid": has_input}
                if gather:
                    all_clean, valid, offset = gather_across_processes(clean_rep)
                    if all_clean.shape[0] != clean_rep.shape[0]:
                        all_has_input = gather_across_processes(has_input.long())[0].bool()
                        extra = dict(
                            all_clean=all_clean, all_corrupted=gather_across_processes(noisy_rep)[0],
                            offset=offset, valid=valid & all_has_input,
                        )
                total = rcl_loss(clean_rep, noisy_rep, config.rcl_temperature, reduction="sum", **extra)
                losses["rcl_loss"] = _mean(total, int(has_input.sum()), gather)
        else:
            nid_logits = None

        total_loss = None
        for name, value in losses.items():
            term = weights[name] * value
            total_loss = term if total_loss is None else total_loss + term
        output = PMMRecModelOutput(
            loss=total_loss,
            item_embeddings=item_emb,
            user_states=states,
            user_embeddings=users.user_embeddings,
            nid_logits=nid_logits,
            **losses,
        )
        return output.to_tuple() if as_tuple else output


__all__ = [
    "BackboneTower",
    "PMMRecPreTrainedModel",
    "PMMRecItemEncoder",
    "PMMRecUserEncoder",
    "PMMRecModel",
    "PMMRecItemEncoderOutput",
    "PMMRecUserEncoderOutput",
    "PMMRecModelOutput",
]
