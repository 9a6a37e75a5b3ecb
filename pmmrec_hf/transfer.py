"""Transfer a pre-trained PMMRec to a new platform: which weights carry over in each setting, and LoRA.

Settings (reference section 4):
- ``full``: every weight of the pre-trained model (item encoder, user encoder, pre-training heads).
- ``item_encoder``: towers + projections + fusion carry over; the user encoder is re-initialised.
- ``user_encoder``: the user encoder carries over; the towers come from their *original* backbone weights
  (`text_model` / `vision_model`), projections and fusion are re-initialised.
- ``text`` / ``vision``: a single-modality model: that tower and its projection carry over (no fusion),
  and so does the user encoder, which consumes item embeddings of the same width.
- ``scratch``: no recommendation pre-training: towers from their original backbone weights, everything
  else freshly initialised (the control).
"""

from __future__ import annotations

import copy
import logging
import re

import torch
from torch import nn

from .configuration_pmmrec import PMMRecConfig, PMMRecItemEncoderConfig
from .modeling_pmmrec import PMMRecItemEncoder, PMMRecModel, PMMRecUserEncoder, find_blocks

logger = logging.getLogger(__name__)

TRANSFER_SETTINGS = ("full", "item_encoder", "user_encoder", "text", "vision", "scratch")


def _fresh_item_encoder(
    config: PMMRecItemEncoderConfig, text_model: str | None, vision_model: str | None, seed: int | None
) -> PMMRecItemEncoder:
    """An item encoder with the original backbone weights (from `text_model`/`vision_model` when given,
    else backbones initialised from their configs) and fresh projections and fusion."""
    if seed is not None:
        torch.manual_seed(seed)
    if (config.uses_text and text_model) or (config.uses_vision and vision_model):
        kwargs = {k: v for k, v in config.to_dict().items() if k in _ITEM_FIELDS}
        return PMMRecItemEncoder.from_backbones_pretrained(
            text_model if config.uses_text else None,
            vision_model if config.uses_vision else None,
            modality=config.modality,
            **kwargs,
        )
    return PMMRecItemEncoder(config)


_ITEM_FIELDS = (
    "hidden_size", "fusion_num_layers", "fusion_num_attention_heads", "fusion_intermediate_size", "fusion_hidden_act",
    "fusion_dropout", "fusion_layer_norm_eps", "text_trainable_layers", "vision_trainable_layers", "max_text_length",
    "image_size", "image_mean", "image_std", "initializer_range",
)


def load_for_transfer(
    setting: str,
    pretrained: str | PMMRecModel | None = None,
    *,
    item_encoder: str | PMMRecItemEncoder | None = None,
    user_encoder: str | PMMRecUserEncoder | None = None,
    text_model: str | None = None,
    vision_model: str | None = None,
    config: PMMRecConfig | None = None,
    seed: int | None = 0,
    random_towers: bool = False,
    **config_overrides,
) -> PMMRecModel:
    """Build the model to fine-tune on a target dataset in one of `TRANSFER_SETTINGS`.

    Args:
        setting: the transfer setting.
        pretrained: a pre-trained full model (object, folder or Hub id). Alternatively give the separately
            published `item_encoder` and/or `user_encoder`.
        text_model, vision_model: the original backbones (Hub ids or folders) for the settings that re-start
            the towers from them (`user_encoder`, `scratch`); without them the towers are initialised from
            their configs.
        config: the architecture for `scratch` when there is no pre-trained model to read it from.
        seed: seeds the freshly initialised parts.
        random_towers: `user_encoder` and `scratch` re-start the towers from their original backbone weights,
            so they need `text_model` / `vision_model` for every tower the model has; without them they refuse,
            unless `random_towers=True` says to start those towers from random initialisation instead (what
            the built-in tiny backbones of the synthetic dataset are anyway).
        config_overrides: objective settings for the fine-tuning run (e.g. `nicl_weight=0.0`).
    """
    if setting not in TRANSFER_SETTINGS:
        raise ValueError(f"`setting` must be one of {TRANSFER_SETTINGS}, got {setting!r}.")
    if pretrained is not None and not isinstance(pretrained, PMMRecModel) and not isinstance(pretrained, str):
        raise ValueError("`pretrained` must be a PMMRecModel, a folder or a Hub id.")
    if isinstance(pretrained, str):
        pretrained = PMMRecModel.from_pretrained(pretrained)
    if isinstance(item_encoder, str):
        item_encoder = PMMRecItemEncoder.from_pretrained(item_encoder)
    if isinstance(user_encoder, str):
        user_encoder = PMMRecUserEncoder.from_pretrained(user_encoder)
    if pretrained is not None:
        item_encoder = item_encoder or pretrained.item_encoder
        user_encoder = user_encoder or pretrained.user_encoder
    needs = {"full": ("item", "user"), "item_encoder": ("item",), "user_encoder": ("user",),
             "text": ("item", "user"), "vision": ("item", "user"), "scratch": ()}[setting]
    if "item" in needs and item_encoder is None:
        raise ValueError(f"Setting {setting!r} needs a pre-trained item encoder (`pretrained` or `item_encoder`).")
    if "user" in needs and user_encoder is None:
        raise ValueError(f"Setting {setting!r} needs a pre-trained user encoder (`pretrained` or `user_encoder`).")
    if item_encoder is None and pretrained is None and config is None:
        raise ValueError(
            f"Setting {setting!r} needs the item encoder's architecture: pass `config` (or a pre-trained model)."
        )
    if pretrained is not None:
        base_config = pretrained.config
    elif item_encoder is not None or user_encoder is not None:
        base_config = PMMRecConfig(
            item_encoder_config=(item_encoder.config if item_encoder is not None else config.item_encoder_config),
            user_encoder_config=(user_encoder.config if user_encoder is not None else None),
        )
    elif config is not None:
        base_config = config
    else:
        raise ValueError("Give a pre-trained model (`pretrained`), its encoders, or a `config` for `scratch`.")


    if setting in ("user_encoder", "scratch"):
        item_cfg = base_config.item_encoder_config
        absent = [flag for flag, used, given in (("text_model", item_cfg.uses_text, text_model),
                                                 ("vision_model", item_cfg.uses_vision, vision_model)) if used and not given]
        if absent and not random_towers:
            raise ValueError(
                f"Setting {setting!r} re-starts the towers from their original backbone weights, but "
                f"{' and '.join('`' + a + '`' for a in absent)} {'is' if len(absent) == 1 else 'are'} not given: the "
                "towers would be randomly initialised, which is not this setting. Give the original backbones "
                "(e.g. text_model='xlm-roberta-base'; `--text-model` / `--vision-model` in finetune.py), or pass "
                "random_towers=True (`--random-towers`) to start them from random weights on purpose."
            )
        if absent:
            logger.warning("Setting %r: %s not given, those towers start from random weights (random_towers=True).",
                           setting, " and ".join(absent))

    config_dict = base_config.to_dict()
    for key in ("item_encoder_config", "user_encoder_config", "model_type", "transformers_version", "architectures",
                "auto_map"):
        config_dict.pop(key, None)
    config_dict.update(config_overrides)
    item_config = copy.deepcopy(base_config.item_encoder_config)
    if setting in ("text", "vision"):
        item_config = _single_modality_config(item_config, setting)
        config_dict["nicl_weight"] = 0.0
    new_config = PMMRecConfig(
        item_encoder_config=item_config, user_encoder_config=copy.deepcopy(base_config.user_encoder_config),
        **{k: v for k, v in config_dict.items() if k in _MODEL_FIELDS},
    )

    if seed is not None:
        torch.manual_seed(seed)
    if setting == "full" and pretrained is not None:  # the pre-training heads carry over too
        model = copy.deepcopy(pretrained)
        for key, value in _objective_kwargs(new_config).items():
            setattr(model.config, key, value)
        model.config.validate()
    elif setting == "full":
        model = PMMRecModel.from_encoders(copy.deepcopy(item_encoder), copy.deepcopy(user_encoder),
                                          **_objective_kwargs(new_config))
    elif setting == "item_encoder":
        model = PMMRecModel.from_encoders(copy.deepcopy(item_encoder), PMMRecUserEncoder(new_config.user_encoder_config),
                                          **_objective_kwargs(new_config))
    elif setting == "user_encoder":
        fresh = _fresh_item_encoder(item_config, text_model, vision_model, seed)
        model = PMMRecModel.from_encoders(fresh, copy.deepcopy(user_encoder), **_objective_kwargs(new_config))
    elif setting in ("text", "vision"):
        single = PMMRecItemEncoder(item_config)
        source = item_encoder.state_dict()
        kept = {k: v for k, v in source.items() if k.startswith(f"{setting}_tower.") or k.startswith(f"{setting}_projection.")}
        missing, unexpected = single.load_state_dict(kept, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"Single-modality transfer did not match: missing {missing}, unexpected {unexpected}")
        model = PMMRecModel.from_encoders(single, copy.deepcopy(user_encoder), **_objective_kwargs(new_config))
    else:  # scratch
        fresh = _fresh_item_encoder(item_config, text_model, vision_model, seed)
        model = PMMRecModel.from_encoders(fresh, PMMRecUserEncoder(new_config.user_encoder_config),
                                          **_objective_kwargs(new_config))
    model.apply_freezing()  # the objectives of the fine-tuning run decide which heads train
    logger.info("Transfer setting %r: %s", setting, describe_transfer(setting))
    return model


_MODEL_FIELDS = (
    "next_item_weight", "nicl_weight", "nid_weight", "rcl_weight", "nicl_temperature", "rcl_temperature",
    "nicl_projection_size", "logq_correction", "next_item_similarity", "next_item_temperature", "gather_negatives",
    "replace_prob", "shuffle_prob",
)


def _objective_kwargs(config: PMMRecConfig) -> dict:
    return {k: getattr(config, k) for k in _MODEL_FIELDS}


def _single_modality_config(config: PMMRecItemEncoderConfig, modality: str) -> PMMRecItemEncoderConfig:
    values = config.to_dict()
    values["modality"] = modality
    if modality == "text":
        values["vision_config"] = None
    else:
        values["text_config"] = None
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        values.pop(key, None)
    return PMMRecItemEncoderConfig(**values)


def describe_transfer(setting: str) -> str:
    return {
        "full": "all weights from the pre-trained model",
        "item_encoder": "item encoder from the pre-trained model, user encoder re-initialised",
        "user_encoder": "user encoder from the pre-trained model, towers from their original weights, "
        "projections and fusion re-initialised",
        "text": "text tower + projection and user encoder from the pre-trained model, no vision, no fusion",
        "vision": "vision tower + projection and user encoder from the pre-trained model, no text, no fusion",
        "scratch": "no recommendation pre-training: original backbone weights, all else re-initialised",
    }[setting]


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def lora_target_modules(model: PMMRecModel, include_user_encoder: bool = True) -> list[str]:
    """Full names of the Linear layers LoRA adapts: the towers' trainable blocks, the fusion, the user encoder."""
    names: list[str] = []
    item = model.item_encoder
    for tower_name in ("text_tower", "vision_tower"):
        tower = getattr(item, tower_name)
        if tower is None:
            continue
        _, _, blocks = find_blocks(tower.backbone)
        first = tower.first_trainable
        block_ids = {id(b) for b in list(blocks)[first:]}
        for block_name, block in tower.backbone.named_modules():
            if id(block) in block_ids:
                for sub, module in block.named_modules():
                    if isinstance(module, nn.Linear):
                        names.append(f"item_encoder.{tower_name}.backbone.{block_name}.{sub}")
    prefixes = ["item_encoder.fusion."] + (["user_encoder.layers."] if include_user_encoder else [])
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(tuple(prefixes)):
            names.append(name)
    return names


def apply_lora(
    model: PMMRecModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    include_user_encoder: bool = True,
):
    """Wrap the model with peft LoRA adapters; afterwards only the adapter weights train."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, include_user_encoder)
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        param.requires_grad = "lora_" in name
    return peft_model


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def lora_base_model(peft_model) -> PMMRecModel:
    """The base model of a LoRA-wrapped PMMRec model, without its adapters (a copy: `peft_model` is unchanged).
    Only the adapters train under :func:`apply_lora`, so this is the model the adapters were trained on."""
    return copy.deepcopy(peft_model).unload()


#: What `AutoPeftModel` imports to load the base model: transformers' AutoModel, which reads the base repo's
#: `auto_map` (with `trust_remote_code=True`), instead of this package's class (not in peft's import allowlist).
LORA_AUTO_MAPPING = {"base_model_class": "AutoModel", "parent_library": "transformers"}


def save_lora_adapter(peft_model, save_directory: str, base_model_name_or_path: str, revision: str | None = None):
    """Save the LoRA adapter of `peft_model` alone (adapter_config.json + adapter_model.safetensors), naming its base
    model `base_model_name_or_path` (the published full model's repo id, or a folder) and mapping the base class to
    ``transformers.AutoModel``, so that both ``PeftModel.from_pretrained(AutoModel.from_pretrained(base,
    trust_remote_code=True), adapter)`` and ``AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)`` load
    it. peft would otherwise record the local path of the base and the class ``pmmrec_hf.modeling_pmmrec.PMMRecModel``,
    which ``AutoPeftModel`` refuses ("not in the import allowlist")."""
    import json
    import os

    if not is_peft_model(peft_model):
        raise TypeError(f"Expected a peft PeftModel (see apply_lora), got {type(peft_model).__name__}.")
    if not base_model_name_or_path:
        raise ValueError("`base_model_name_or_path` is required: the repo id (or folder) of the adapter's base model.")
    peft_model.save_pretrained(save_directory)
    written = []
    for root, _, files in os.walk(save_directory):
        if "adapter_config.json" in files:
            path = os.path.join(root, "adapter_config.json")
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            config["base_model_name_or_path"] = str(base_model_name_or_path)
            config["revision"] = revision
            config["auto_mapping"] = dict(LORA_AUTO_MAPPING)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
            written.append(path)
    if not written:
        raise RuntimeError(f"peft wrote no adapter_config.json under {save_directory}.")
    return written
