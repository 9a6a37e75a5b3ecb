"""Model cards of published PMMRec components (item encoder, user encoder, full model).

A card is a [`PMMRecCardData`] (what the caller knows: sibling repos, datasets, hyperparameters, evaluation
results...) plus what the model's config says (towers, sizes), rendered with
``huggingface_hub.ModelCard.from_template`` and this package's Jinja template
(``pmmrec_hf/templates/model_card_template.md``). The YAML metadata is a ``huggingface_hub.ModelCardData``:

* ``library_name: transformers``: every published folder carries its modelling code and an ``auto_map``, so
  ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` works with transformers alone; the Hub's
  "Use this model" button then shows that (working) snippet.
* ``tags``: ``pmmrec``, ``recommendation``, ``sequential-recommendation``, ``multimodal`` (dropped for a text-only
  or vision-only item encoder), the component (``item-encoder`` / ``user-encoder`` / ``full-model``), then the
  caller's tags.
* ``base_model``: the text and vision backbones (item encoder and full model), read from the backbone configs
  when they name a Hub repo, or given in ``PMMRecCardData.base_model``. Not set for the user encoder (trained
  from scratch).
* ``datasets``, ``license`` (default ``apache-2.0``), ``language``.
* ``pipeline_tag``: none by default. No Hub pipeline fits: transformers' ``feature-extraction`` pipeline feeds
  text only and would not run an item encoder (text + image) or a user encoder (item embeddings), and with a
  pipeline tag the Hub would advertise that broken pipeline snippet. Set ``PMMRecCardData.pipeline_tag`` to
  override.
* ``model-index``: the evaluation results, built with ``huggingface_hub.EvalResult``
  (task type ``sequential-recommendation``, metric types such as ``hr@10`` / ``ndcg@10``).

See ``model_cards/README.md`` for the fields and ``model_cards/*_example.md`` for rendered examples.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_pmmrec import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecUserEncoderConfig

__all__ = [
    "CITATION",
    "COMPONENTS",
    "TEMPLATE_PATH",
    "PMMRecCardData",
    "backbone_base_models",
    "component_of",
    "render_model_card",
]

#: Path of the Jinja template (shipped as package data: ``templates/*``).
TEMPLATE_PATH: str = str(Path(__file__).resolve().parent / "templates" / "model_card_template.md")

#: The three publishable components, as used in card data, tags and ``push_pmmrec_to_hub``'s result.
COMPONENTS: tuple[str, ...] = ("item_encoder", "user_encoder", "full_model")

_MODEL_TYPE_TO_COMPONENT = {
    PMMRecItemEncoderConfig.model_type: "item_encoder",
    PMMRecUserEncoderConfig.model_type: "user_encoder",
    PMMRecConfig.model_type: "full_model",
}
_COMPONENT_TITLE = {"item_encoder": "item encoder", "user_encoder": "user encoder", "full_model": "full model"}
_COMPONENT_TAG = {"item_encoder": "item-encoder", "user_encoder": "user-encoder", "full_model": "full-model"}
BASE_TAGS: tuple[str, ...] = ("pmmrec", "recommendation", "sequential-recommendation", "multimodal")
EVAL_TASK_TYPE = "sequential-recommendation"
EVAL_TASK_NAME = "Sequential Recommendation"
_EVAL_KEYS = {"dataset", "metric", "value", "split", "dataset_name", "dataset_config"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

CITATION = """@inproceedings{li2024multimodality,
  title         = {Multi-Modality is All You Need for Transferable Recommender Systems},
  author        = {Li, Youhua and Du, Hanwen and Ni, Yongxin and Zhao, Pengpeng and Guo, Qi and Yuan, Fajie and Zhou, Xiaofang},
  booktitle     = {Proceedings of the 40th IEEE International Conference on Data Engineering (ICDE)},
  year          = {2024},
  eprint        = {2312.09602},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2312.09602}
}"""


def _as_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"`{name}` must be a string or a list of strings, got {value!r}.")


def _dedup(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


@dataclass
class PMMRecCardData:
    """What a PMMRec model card says beyond the model's config.

    Args:
        component: ``"item_encoder"``, ``"user_encoder"`` or ``"full_model"``; None = inferred from the model.
        repo_id: the repo the card is for (used in the usage snippets); None renders a placeholder.
        item_encoder_repo, user_encoder_repo, full_model_repo: repos of the sibling components (linked, and
            used by the "assemble" snippet). ``push_pmmrec_to_hub`` fills them.
        model_name: title of the card and name in ``model-index``; default: the repo name.
        description: an extra paragraph shown under the title (e.g. what the model was trained for).
        base_model: Hub ids of the backbones; None = read from the backbone configs (``_name_or_path``) when
            they name a Hub repo.
        datasets: Hub ids of the training datasets (metadata ``datasets``).
        training_data: free text describing the training data (shown in the card).
        hyperparameters: training hyperparameters, shown as a table (e.g. learning_rate, batch size, epochs).
        eval_results: a list of ``{"dataset", "metric", "value"[, "split", "dataset_name", "dataset_config"]}``,
            e.g. ``{"dataset": "pixelrec", "split": "test", "metric": "ndcg@10", "value": 0.0321}``; metrics
            are lower-cased (``hr@10``, ``ndcg@10``, ``mrr@10``), ``split`` defaults to ``"test"``.
        evaluation_protocol: how the results were computed (shown above the table); default: PMMRec's protocol
            (leave-one-out, full ranking over all items, history excluded).
        license: metadata ``license`` (default ``apache-2.0``).
        language: metadata ``language`` (ISO codes), e.g. ``["en", "zh"]``.
        tags: extra tags, after the standard ones.
        pipeline_tag: metadata ``pipeline_tag`` (default none: see the module docstring).
        library_name: metadata ``library_name`` (default ``transformers``).
        limitations: extra bullet points for the limitations section.
        hub_url: base URL of the links to sibling repos (``push_pmmrec_to_hub`` sets the endpoint it used).
    """

    component: str | None = None
    repo_id: str | None = None
    item_encoder_repo: str | None = None
    user_encoder_repo: str | None = None
    full_model_repo: str | None = None
    model_name: str | None = None
    description: str | None = None
    base_model: list[str] | None = None
    datasets: list[str] = field(default_factory=list)
    training_data: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    evaluation_protocol: str | None = None
    license: str = "apache-2.0"
    language: list[str] | None = None
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    library_name: str = "transformers"
    limitations: list[str] = field(default_factory=list)
    hub_url: str = "https://huggingface.co"

    def __post_init__(self) -> None:
        if self.component is not None and self.component not in COMPONENTS:
            raise ValueError(f"`component` must be one of {COMPONENTS} (or None), got {self.component!r}.")
        self.base_model = None if self.base_model is None else _as_list(self.base_model, "base_model")
        self.datasets = _as_list(self.datasets, "datasets")
        self.language = None if self.language is None else _as_list(self.language, "language")
        self.tags = _as_list(self.tags, "tags")
        self.limitations = _as_list(self.limitations, "limitations")
        if not isinstance(self.hyperparameters, dict):
            raise ValueError(f"`hyperparameters` must be a dict, got {type(self.hyperparameters).__name__}.")
        self.eval_results = [self._check_eval(entry) for entry in (self.eval_results or [])]
        self.hub_url = str(self.hub_url).rstrip("/")

    @staticmethod
    def _check_eval(entry: Any) -> dict[str, Any]:
        if not isinstance(entry, dict):
            raise ValueError(f"each evaluation result must be a dict, got {entry!r}.")
        unknown = set(entry) - _EVAL_KEYS
        if unknown:
            raise ValueError(f"unknown evaluation result keys {sorted(unknown)}; allowed: {sorted(_EVAL_KEYS)}.")
        missing = {"dataset", "metric", "value"} - set(entry)
        if missing:
            raise ValueError(f"evaluation result {entry!r} lacks {sorted(missing)}.")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"evaluation result value must be a finite number, got {value!r} in {entry!r}.")
        out = {"split": "test", **entry}
        out["metric"] = str(out["metric"]).strip().lower()
        out["value"] = float(value)
        return out

    @classmethod
    def coerce(cls, value: PMMRecCardData | dict | None) -> PMMRecCardData:
        """A PMMRecCardData from itself, a dict of its fields (unknown keys are an error) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return cls(**asdict(value))  # a copy: callers fill per-component fields
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown model card fields {sorted(unknown)}; known: {sorted(known)}.")
            return cls(**value)
        raise TypeError(f"card_data must be a PMMRecCardData, a dict or None, got {type(value).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# helpers on configs
# --------------------------------------------------------------------------------------------------


def component_of(config: Any) -> str:
    """The component (item_encoder / user_encoder / full_model) a PMMRec config or model is."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_TYPE_TO_COMPONENT:
        raise ValueError(f"Not a PMMRec model or config: model_type {model_type!r}.")
    return _MODEL_TYPE_TO_COMPONENT[model_type]


def _looks_like_hub_id(name: Any) -> bool:
    if not isinstance(name, str) or not _HUB_ID_RE.match(name) or ".." in name:
        return False
    return not os.path.exists(name)  # a local folder is not a Hub repo


def _backbone_name(config: Any) -> str | None:
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name if _looks_like_hub_id(name) else None


def backbone_base_models(config: Any) -> list[str]:
    """Hub ids of the text and vision backbones of an item-encoder or full-model config (when recorded)."""
    config = getattr(config, "config", config)
    item = config.item_encoder_config if isinstance(config, PMMRecConfig) else config
    if not isinstance(item, PMMRecItemEncoderConfig):
        return []
    names = []
    for sub in (item.text_config if item.uses_text else None, item.vision_config if item.uses_vision else None):
        if sub is not None:
            name = _backbone_name(sub)
            if name:
                names.append(name)
    return _dedup(names)


def _backbone_label(sub: Any) -> str:
    name = getattr(sub, "_name_or_path", "") or ""
    label = f"`{sub.model_type}`"
    if _looks_like_hub_id(name):
        label += f" ([{name}](https://huggingface.co/{name}))"
    return label


def _item_rows(item: PMMRecItemEncoderConfig) -> list[tuple[str, str]]:
    rows = [("modality", f"`{item.modality}`"), ("item embedding size d", str(item.hidden_size))]
    if item.uses_text:
        rows += [
            ("text tower", _backbone_label(item.text_config)),
            ("text tower width", str(item.text_hidden_size)),
            ("trainable text blocks", "all" if item.text_trainable_layers < 0 else f"top {item.text_trainable_layers}"),
            ("max text tokens", str(item.max_text_length)),
        ]
    if item.uses_vision:
        rows += [
            ("vision tower", _backbone_label(item.vision_config)),
            ("vision tower width", str(item.vision_hidden_size)),
            ("trainable vision blocks",
             "all" if item.vision_trainable_layers < 0 else f"top {item.vision_trainable_layers}"),
            ("image size", f"{item.image_size} x {item.image_size} (squashed, no crop)"),
            ("image mean / std", f"{list(item.image_mean)} / {list(item.image_std)}"),
        ]
    if item.modality == "multimodal":
        rows.append(
            ("merge-attention fusion",
             f"{item.fusion_num_layers} layer(s), {item.fusion_num_attention_heads} heads, "
             f"FFN {item.fusion_intermediate_size} ({item.fusion_hidden_act}), masked-mean pooling")
        )
    return rows


def _user_rows(user: PMMRecUserEncoderConfig) -> list[tuple[str, str]]:
    return [
        ("user encoder",
         f"{user.num_hidden_layers} layer(s), {user.num_attention_heads} heads, d = {user.hidden_size}, "
         f"FFN {user.intermediate_size} ({user.hidden_act}), {user.layer_norm_position}-LN, causal"),
        ("max sequence length L", f"{user.max_position_embeddings} (left-padded; the last input is the newest item)"),
    ]


def _full_rows(config: PMMRecConfig) -> list[tuple[str, str]]:
    return [
        ("loss weights",
         f"next-item {config.next_item_weight}, NICL {config.nicl_weight}, NID {config.nid_weight}, "
         f"RCL {config.rcl_weight}"),
        ("temperatures", f"NICL {config.nicl_temperature}, RCL {config.rcl_temperature}"),
        ("log-popularity correction", str(bool(config.logq_correction))),
        ("corruption (NID/RCL)", f"replace p = {config.replace_prob}, span shuffle p = {config.shuffle_prob}"),
    ]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _count_parameters(model: Any) -> tuple[int, int] | None:
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    total = trainable = 0
    for p in params():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def _model_card_data(data: PMMRecCardData, component: str, config: Any, modality: str | None) -> ModelCardData:
    tags = list(BASE_TAGS)
    if component != "user_encoder" and modality in ("text", "vision"):
        tags.remove("multimodal")
    tags = _dedup(tags + [_COMPONENT_TAG[component]] + data.tags)
    base_model = data.base_model if data.base_model is not None else (
        backbone_base_models(config) if component != "user_encoder" else []
    )
    eval_results = [
        EvalResult(
            task_type=EVAL_TASK_TYPE,
            task_name=EVAL_TASK_NAME,
            dataset_type=entry["dataset"],
            dataset_name=entry.get("dataset_name") or entry["dataset"],
            dataset_config=entry.get("dataset_config"),
            dataset_split=entry.get("split"),
            metric_type=entry["metric"],
            metric_name=_metric_label(entry["metric"]),
            metric_value=entry["value"],
        )
        for entry in data.eval_results
    ]
    return ModelCardData(
        library_name=data.library_name,
        license=data.license,
        language=data.language or None,
        tags=tags,
        base_model=base_model or None,
        datasets=data.datasets or None,
        pipeline_tag=data.pipeline_tag,
        model_name=_model_name(data, component) if eval_results else None,
        eval_results=eval_results or None,
    )


def _metric_label(metric: str) -> str:
    name, sep, k = metric.partition("@")
    return f"{name.upper()}{sep}{k}"


def _model_name(data: PMMRecCardData, component: str) -> str:
    if data.model_name:
        return data.model_name
    if data.repo_id:
        return data.repo_id.split("/")[-1]
    return f"pmmrec-{_COMPONENT_TAG[component]}"


def render_model_card(
    model_or_config: Any,
    card_data: PMMRecCardData | dict | None = None,
    *,
    component: str | None = None,
    template_path: str | os.PathLike | None = None,
    has_tokenizer: bool = True,
    has_image_processor: bool = True,
) -> ModelCard:
    """Render the model card of one PMMRec component.

    Args:
        model_or_config: the component's model (parameter counts are then shown) or its config: a
            ``PMMRecItemEncoder[Config]``, ``PMMRecUserEncoder[Config]`` or ``PMMRecModel`` / ``PMMRecConfig``.
        card_data: [`PMMRecCardData`] or a dict of its fields.
        component: overrides ``card_data.component``; by default inferred from the config's ``model_type``.
        template_path: another Jinja template (default: :data:`TEMPLATE_PATH`).
        has_tokenizer / has_image_processor: whether the repo holds them (with what its modality reads, the repo
            holds a PMMRecProcessor and the usage snippet loads it with AutoProcessor; else the tokenizer comes from
            the text backbone / an equivalent image processor is built inline).

    Returns:
        a ``huggingface_hub.ModelCard``; ``card.save(folder / "README.md")`` writes it.
    """
    data = PMMRecCardData.coerce(card_data)
    config = getattr(model_or_config, "config", model_or_config)
    inferred = component_of(config)
    component = component or data.component or inferred
    if component not in COMPONENTS:
        raise ValueError(f"`component` must be one of {COMPONENTS}, got {component!r}.")
    if component != inferred:
        raise ValueError(f"A {_COMPONENT_TITLE[inferred]} config cannot get a {_COMPONENT_TITLE[component]} card.")
    data.component = component
    item = config.item_encoder_config if isinstance(config, PMMRecConfig) else (
        config if isinstance(config, PMMRecItemEncoderConfig) else None
    )
    user = config.user_encoder_config if isinstance(config, PMMRecConfig) else (
        config if isinstance(config, PMMRecUserEncoderConfig) else None
    )
    rows: list[tuple[str, str]] = []
    if item is not None:
        rows += _item_rows(item)
    if user is not None:
        rows += _user_rows(user)
    if isinstance(config, PMMRecConfig):
        rows += _full_rows(config)
    counts = _count_parameters(model_or_config) if model_or_config is not config else None
    if counts is not None:
        rows.append(("parameters", f"{_human(counts[0])} ({_human(counts[1])} trainable)"))

    modality = item.modality if item is not None else None
    repo = data.repo_id or f"your-name/pmmrec-{_COMPONENT_TAG[component]}"
    text_backbone = _backbone_name(item.text_config) if item is not None and item.uses_text else None
    tokenizer_source = repo if has_tokenizer else text_backbone
    hub_card_data = _model_card_data(data, component, config, modality)
    siblings = {
        "item_encoder": repo if component == "item_encoder" else data.item_encoder_repo,
        "user_encoder": repo if component == "user_encoder" else data.user_encoder_repo,
        "full_model": repo if component == "full_model" else data.full_model_repo,
    }
    context = dict(
        component=component,
        component_title=_COMPONENT_TITLE[component],
        title=_model_name(data, component),
        repo=repo,
        siblings=siblings,
        hub_url=data.hub_url,
        description=data.description,
        modality=modality,
        uses_text=item is not None and item.uses_text,
        uses_vision=item is not None and item.uses_vision,
        item=item,
        user=user,
        full=config if isinstance(config, PMMRecConfig) else None,
        architecture=rows,
        tokenizer_source=tokenizer_source,
        has_image_processor=has_image_processor,
        # the repo holds a PMMRecProcessor (AutoProcessor) when it holds what the modality reads
        has_processor=item is not None and (has_tokenizer or not item.uses_text)
        and (has_image_processor or not item.uses_vision),
        training_datasets=data.datasets,
        training_data=data.training_data,
        hyperparameters=[(k, _format_value(v)) for k, v in data.hyperparameters.items()],
        eval_rows=[
            dict(entry, metric_label=_metric_label(entry["metric"]), value_str=f"{entry['value']:.4f}")
            for entry in data.eval_results
        ],
        evaluation_protocol=data.evaluation_protocol,
        extra_limitations=data.limitations,
        citation=CITATION,
    )
    card = ModelCard.from_template(
        hub_card_data, template_path=str(template_path or TEMPLATE_PATH), **context
    )
    # the template is written for readability: collapse the blank lines its block tags leave
    content = re.sub(r"\n{3,}", "\n\n", card.content.strip()) + "\n"
    return ModelCard(content)
