"""Configurations of the PMMRec item encoder, user encoder and full model.

This file travels with every Hub checkpoint (``trust_remote_code`` loading): it imports only
``transformers``, the standard library and its sibling configuration files.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .configuration_efficientnet_lite import EfficientNetLiteConfig

logger = logging.getLogger(__name__)

MODALITIES = ("multimodal", "text", "vision")

#: Backbone config types that ship with this code (so that a checkpoint using them loads where the package is not
#: installed, through `trust_remote_code`, without the AutoConfig registration the package does on import).
LOCAL_BACKBONE_CONFIGS = {EfficientNetLiteConfig.model_type: EfficientNetLiteConfig}
LAYER_NORM_POSITIONS = ("post", "pre")


def _as_backbone_config(value: Any, field: str) -> PretrainedConfig | None:
    """Turn a sub-config given as a config object or a dict with ``model_type`` into a config object."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"`{field}` given as a dict needs a 'model_type' key (e.g. 'bert', 'clip_vision_model').")
        if model_type in LOCAL_BACKBONE_CONFIGS:
            return LOCAL_BACKBONE_CONFIGS[model_type](**value)
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"`{field}` must be a PretrainedConfig, a dict with 'model_type', or None; got {type(value).__name__}.")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_probability(name: str, value: Any, allow_one: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (not allow_one and value >= 1.0):
        raise ValueError(f"`{name}` must be a probability in [0, {'1]' if allow_one else '1)'}, got {value!r}.")


def _check_non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")


def _check_activation(name: str, value: Any) -> None:
    from transformers.activations import ACT2FN

    if not isinstance(value, str) or value not in ACT2FN:
        raise ValueError(f"`{name}` must be one of {sorted(ACT2FN)}, got {value!r}.")


# keys a saved config.json (or transformers' loading) carries besides the config's own fields
_SAVED_KEYS = frozenset({"architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype",
                         "attn_implementation", "experts_implementation", "name_or_path", "num_labels", "use_cache",
                         "per_layer_config", "rope_scaling", "rope_theta", "base_model_tp_plan", "base_model_pp_plan",
                         "custom_pipelines"})  # custom_pipelines: the transformers pipelines a checkpoint serves


@functools.lru_cache(maxsize=None)
def _base_config_keys() -> frozenset:
    """The fields every ``PretrainedConfig`` has (its attributes and ``__init__`` arguments)."""
    base = PretrainedConfig()
    names = set(vars(base)) | set(base.to_dict())
    names |= {n for n in inspect.signature(PretrainedConfig.__init__).parameters if n not in ("self", "kwargs")}
    try:  # generation parameters an older config.json may hold: transformers drops them quietly
        from transformers import GenerationConfig

        names |= set(GenerationConfig._get_default_generation_params())
    except Exception:  # pragma: no cover - another transformers version
        pass
    return frozenset(names)


def _own_fields(config_class: type) -> list[str]:
    names: list[str] = []
    for klass in config_class.__mro__:
        if klass is PretrainedConfig or not issubclass(klass, PretrainedConfig):
            break
        if "__init__" in vars(klass):
            names += [n for n in inspect.signature(klass.__init__).parameters if n not in ("self", "kwargs")]
    return list(dict.fromkeys(names))


def _warn_unknown_fields(config_class: type, kwargs: dict[str, Any]) -> list[str]:
    """Warn about keyword arguments that are no field of ``config_class`` (a typo such as ``num_hiden_layers``
    would otherwise be kept as a silent attribute, as transformers does), naming each and its closest field."""
    own = _own_fields(config_class)
    known = set(own) | _base_config_keys() | _SAVED_KEYS
    unknown = [k for k in kwargs if k not in known and not k.startswith("_")]
    for key in unknown:
        close = difflib.get_close_matches(key, own, n=1)
        logger.warning(
            "%s: unknown field %r%s; it is kept as an attribute but no part of %s uses it.",
            config_class.__name__, key, f" (did you mean {close[0]!r}?)" if close else "", config_class.model_type,
        )
    return unknown


SIMILARITIES = ("dot", "cosine")


def _check_scoring(similarity: Any, temperature: Any) -> None:
    """The next-item scoring fields shared by PMMRecConfig and SASRecConfig."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"`next_item_similarity` must be one of {SIMILARITIES}, got {similarity!r}.")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ValueError(f"`next_item_temperature` must be a positive number, got {temperature!r}.")


def _backbone_hidden_size(config: PretrainedConfig) -> int:
    """Width of the token states a backbone outputs (transformers: hidden_size; conv nets: last channel count)."""
    for name in ("hidden_size", "embed_dim", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    for name in ("hidden_sizes", "num_features_list"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and value:
            return int(value[-1])
    value = getattr(config, "num_features", None)  # timm wrapper
    if isinstance(value, int):
        return value
    raise ValueError(
        f"Cannot tell the output width of backbone type '{config.model_type}': set `hidden_size` on its config."
    )


class PMMRecItemEncoderConfig(PretrainedConfig):
    r"""Configuration of [`PMMRecItemEncoder`]: a text tower, a vision tower and merge-attention fusion.

    Args:
        text_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the text backbone, of any transformers encoder type (XLM-R, BERT, MiniLM, ...).
            Required unless `modality="vision"`.
        vision_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the vision backbone: a vision transformer (CLIP vision, ViT, SigLIP vision) whose
            token states are used, or a convolutional backbone whose last feature map is flattened to tokens.
            Required unless `modality="text"`.
        modality (`str`, *optional*, defaults to `"multimodal"`):
            `"multimodal"` (both towers + fusion), `"text"` or `"vision"` (one tower, no fusion).
        hidden_size (`int`, *optional*, defaults to 768):
            Size d of the item embedding (each tower's tokens are projected to it).
        fusion_num_layers (`int`, *optional*, defaults to 1): merge-attention layers.
        fusion_num_attention_heads (`int`, *optional*, defaults to 12): heads of the fusion layers.
        fusion_intermediate_size (`int`, *optional*, defaults to 3072): FFN size of the fusion layers.
        fusion_hidden_act (`str`, *optional*, defaults to `"gelu"`): FFN activation of the fusion layers.
        fusion_dropout (`float`, *optional*, defaults to 0.1): dropout in the fusion layers.
        fusion_layer_norm_eps (`float`, *optional*, defaults to 1e-12): layer-norm epsilon of the fusion layers.
        text_trainable_layers (`int`, *optional*, defaults to 2):
            How many top blocks of the text tower train; the embeddings and all lower blocks are frozen and
            run without autograd state. `-1` trains the whole tower.
        vision_trainable_layers (`int`, *optional*, defaults to 2): the same for the vision tower.
        max_text_length (`int`, *optional*, defaults to 50): text tokens per item.
        image_size (`int`, *optional*, defaults to 224): images are resized (squashed) to this size.
        image_mean, image_std (`list[float]`, *optional*, defaults to 0.5 each): image normalisation.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the initialisation of our layers.
    """

    model_type = "pmmrec_item_encoder"

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        vision_config: PretrainedConfig | dict | None = None,
        modality: str = "multimodal",
        hidden_size: int = 768,
        fusion_num_layers: int = 1,
        fusion_num_attention_heads: int = 12,
        fusion_intermediate_size: int = 3072,
        fusion_hidden_act: str = "gelu",
        fusion_dropout: float = 0.1,
        fusion_layer_norm_eps: float = 1e-12,
        text_trainable_layers: int = 2,
        vision_trainable_layers: int = 2,
        max_text_length: int = 50,
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.text_config = _as_backbone_config(text_config, "text_config")
        self.vision_config = _as_backbone_config(vision_config, "vision_config")
        self.modality = modality
        self.hidden_size = hidden_size
        self.fusion_num_layers = fusion_num_layers
        self.fusion_num_attention_heads = fusion_num_attention_heads
        self.fusion_intermediate_size = fusion_intermediate_size
        self.fusion_hidden_act = fusion_hidden_act
        self.fusion_dropout = fusion_dropout
        self.fusion_layer_norm_eps = fusion_layer_norm_eps
        self.text_trainable_layers = text_trainable_layers
        self.vision_trainable_layers = vision_trainable_layers
        self.max_text_length = max_text_length
        self.image_size = image_size
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.initializer_range = initializer_range
        _warn_unknown_fields(type(self), kwargs)
        super().__init__(**kwargs)
        self.validate()

    @property
    def uses_text(self) -> bool:
        return self.modality in ("multimodal", "text")

    @property
    def uses_vision(self) -> bool:
        return self.modality in ("multimodal", "vision")

    def validate(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {MODALITIES}, got {self.modality!r}.")
        if self.uses_text and self.text_config is None:
            raise ValueError(f"`text_config` is required for modality {self.modality!r}.")
        if self.uses_vision and self.vision_config is None:
            raise ValueError(f"`vision_config` is required for modality {self.modality!r}.")
        for name in ("hidden_size", "fusion_num_layers", "fusion_num_attention_heads", "fusion_intermediate_size",
                     "max_text_length", "image_size"):
            _check_positive(name, getattr(self, name))
        if self.modality == "multimodal" and self.hidden_size % self.fusion_num_attention_heads != 0:
            raise ValueError(
                f"`fusion_num_attention_heads` ({self.fusion_num_attention_heads}) must divide `hidden_size` "
                f"({self.hidden_size})."
            )
        _check_probability("fusion_dropout", self.fusion_dropout, allow_one=False)
        _check_activation("fusion_hidden_act", self.fusion_hidden_act)
        for name in ("text_trainable_layers", "vision_trainable_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise ValueError(f"`{name}` must be an integer >= 0, or -1 for the whole tower; got {value!r}.")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"`{name}` must have 3 values (RGB), got {getattr(self, name)!r}.")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"`image_std` values must be positive, got {self.image_std!r}.")
        if self.uses_text:
            _backbone_hidden_size(self.text_config)
        if self.uses_vision:
            _backbone_hidden_size(self.vision_config)

    @property
    def text_hidden_size(self) -> int:
        return _backbone_hidden_size(self.text_config)

    @property
    def vision_hidden_size(self) -> int:
        return _backbone_hidden_size(self.vision_config)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for name in ("text_config", "vision_config"):
            sub = getattr(self, name)
            output[name] = sub.to_dict() if sub is not None else None
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        for name in ("text_config", "vision_config"):
            sub = getattr(self, name)
            output[name] = sub.to_dict() if sub is not None else None
        return output


class PMMRecUserEncoderConfig(PretrainedConfig):
    r"""Configuration of [`PMMRecUserEncoder`], the SASRec-style causal transformer over item embeddings.

    Args:
        hidden_size (`int`, *optional*, defaults to 768): width d; must equal the item embedding size.
        num_hidden_layers (`int`, *optional*, defaults to 2): transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 2): attention heads.
        intermediate_size (`int`, *optional*, defaults to 3072): FFN size (4d).
        hidden_act (`str`, *optional*, defaults to `"relu"`): FFN activation.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1): dropout on the residual branches and input.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1): dropout on attention weights.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): layer-norm epsilon.
        layer_norm_position (`str`, *optional*, defaults to `"post"`): `"post"` (SASRec / PMMRec) or `"pre"`.
        max_position_embeddings (`int`, *optional*, defaults to 20): maximum sequence length L.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the weight initialisation.
    """

    model_type = "pmmrec_user_encoder"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 3072,
        hidden_act: str = "relu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-6,
        layer_norm_position: str = "post",
        max_position_embeddings: int = 20,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_position = layer_norm_position
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        _warn_unknown_fields(type(self), kwargs)
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            _check_positive(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size})."
            )
        _check_probability("hidden_dropout_prob", self.hidden_dropout_prob, allow_one=False)
        _check_probability("attention_probs_dropout_prob", self.attention_probs_dropout_prob, allow_one=False)
        _check_activation("hidden_act", self.hidden_act)
        if self.layer_norm_position not in LAYER_NORM_POSITIONS:
            raise ValueError(
                f"`layer_norm_position` must be one of {LAYER_NORM_POSITIONS}, got {self.layer_norm_position!r}."
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}.")


class PMMRecConfig(PretrainedConfig):
    r"""Configuration of [`PMMRecModel`]: an item encoder, a user encoder and the pre-training objectives.

    Args:
        item_encoder_config (`PMMRecItemEncoderConfig` or `dict`, *optional*)
        user_encoder_config (`PMMRecUserEncoderConfig` or `dict`, *optional*):
            Its `hidden_size` must equal the item encoder's.
        next_item_weight (`float`, *optional*, defaults to 0.6): weight of the next-item loss.
        nicl_weight (`float`, *optional*, defaults to 0.4): weight of NICL (cross-modal contrastive loss).
        nid_weight (`float`, *optional*, defaults to 0.1): weight of NID (noised item detection).
        rcl_weight (`float`, *optional*, defaults to 0.1): weight of RCL (robustness-aware contrastive loss).
        nicl_temperature (`float`, *optional*, defaults to 0.1): NICL temperature.
        rcl_temperature (`float`, *optional*, defaults to 0.1): RCL temperature.
        nicl_projection_size (`int`, *optional*, defaults to 256): output size of the NICL projection heads.
        logq_correction (`bool`, *optional*, defaults to `True`): subtract log q(item) from next-item logits.
        next_item_similarity (`str`, *optional*, defaults to `"dot"`): how a user state scores an item.
            `"dot"`: raw dot product (the research code). `"cosine"`: item embeddings (`encode_items`, the
            catalogue, the user encoder's inputs) and user embeddings are L2-normalised, so the score is a
            cosine; use it with a temperature around 0.05-0.1.
        next_item_temperature (`float`, *optional*, defaults to 1.0): next-item logits are divided by it
            (before the log-q correction). Ranking does not depend on it.
        gather_negatives (`bool`, *optional*, defaults to `True`):
            gather in-batch negatives across processes when torch.distributed is initialised.
        replace_prob (`float`, *optional*, defaults to 0.1): NID/RCL corruption, per-item replacement.
        shuffle_prob (`float`, *optional*, defaults to 0.1): NID/RCL corruption, per-sequence span shuffle.

    The defaults 0.6 / 0.4 reproduce the research code's next-item / NICL weighting. NICL aligns text and
    image features, so it only applies to a multimodal item encoder: with a text-only or vision-only item
    encoder it is not computed (`nicl_loss` is `None`) whatever `nicl_weight` says.
    """

    model_type = "pmmrec"

    def __init__(
        self,
        item_encoder_config: PMMRecItemEncoderConfig | dict | None = None,
        user_encoder_config: PMMRecUserEncoderConfig | dict | None = None,
        next_item_weight: float = 0.6,
        nicl_weight: float = 0.4,
        nid_weight: float = 0.1,
        rcl_weight: float = 0.1,
        nicl_temperature: float = 0.1,
        rcl_temperature: float = 0.1,
        nicl_projection_size: int = 256,
        logq_correction: bool = True,
        next_item_similarity: str = "dot",
        next_item_temperature: float = 1.0,
        gather_negatives: bool = True,
        replace_prob: float = 0.1,
        shuffle_prob: float = 0.1,
        **kwargs,
    ):
        if isinstance(item_encoder_config, dict):
            item_encoder_config = PMMRecItemEncoderConfig(**item_encoder_config)
        if isinstance(user_encoder_config, dict):
            user_encoder_config = PMMRecUserEncoderConfig(**user_encoder_config)
        if item_encoder_config is None:
            raise ValueError(
                "`item_encoder_config` is required: build it from backbone configs, e.g. "
                "PMMRecItemEncoderConfig(text_config=XLMRobertaConfig(), vision_config=CLIPVisionConfig())."
            )
        if user_encoder_config is None:
            user_encoder_config = PMMRecUserEncoderConfig(hidden_size=item_encoder_config.hidden_size)
        self.item_encoder_config = item_encoder_config
        self.user_encoder_config = user_encoder_config
        self.next_item_weight = next_item_weight
        self.nicl_weight = nicl_weight
        self.nid_weight = nid_weight
        self.rcl_weight = rcl_weight
        self.nicl_temperature = nicl_temperature
        self.rcl_temperature = rcl_temperature
        self.nicl_projection_size = nicl_projection_size
        self.logq_correction = logq_correction
        self.next_item_similarity = next_item_similarity
        self.next_item_temperature = next_item_temperature
        self.gather_negatives = gather_negatives
        self.replace_prob = replace_prob
        self.shuffle_prob = shuffle_prob
        _warn_unknown_fields(type(self), kwargs)
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.item_encoder_config, PMMRecItemEncoderConfig):
            raise ValueError("`item_encoder_config` must be a PMMRecItemEncoderConfig or a dict.")
        if not isinstance(self.user_encoder_config, PMMRecUserEncoderConfig):
            raise ValueError("`user_encoder_config` must be a PMMRecUserEncoderConfig or a dict.")
        if self.item_encoder_config.hidden_size != self.user_encoder_config.hidden_size:
            raise ValueError(
                "`user_encoder_config.hidden_size` "
                f"({self.user_encoder_config.hidden_size}) must equal `item_encoder_config.hidden_size` "
                f"({self.item_encoder_config.hidden_size}): the user encoder consumes item embeddings."
            )
        for name in ("next_item_weight", "nicl_weight", "nid_weight", "rcl_weight"):
            _check_non_negative(name, getattr(self, name))
        for name in ("nicl_temperature", "rcl_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"`{name}` must be positive, got {value!r}.")
        _check_positive("nicl_projection_size", self.nicl_projection_size)
        _check_scoring(self.next_item_similarity, self.next_item_temperature)
        _check_probability("replace_prob", self.replace_prob)
        _check_probability("shuffle_prob", self.shuffle_prob)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["item_encoder_config"] = self.item_encoder_config.to_dict()
        output["user_encoder_config"] = self.user_encoder_config.to_dict()
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        output["item_encoder_config"] = self.item_encoder_config.to_dict()
        output["user_encoder_config"] = self.user_encoder_config.to_dict()
        return output


__all__ = ["PMMRecItemEncoderConfig", "PMMRecUserEncoderConfig", "PMMRecConfig"]
