"""Publish PMMRec components to the Hugging Face Hub, and check what a repo holds before loading it.

``push_pmmrec_to_hub`` publishes the item encoder, the user encoder and (optionally) the full model of a trained
PMMRec model as **separate** repos, each loadable alone::

    from pmmrec_hf.hub import push_pmmrec_to_hub

    commits = push_pmmrec_to_hub(
        "runs/pmmrec/checkpoint-final",               # a PMMRecModel, or a folder saved with save_pretrained
        item_encoder_repo="me/pmmrec-item-encoder",
        user_encoder_repo="me/pmmrec-user-encoder",
        full_model_repo="me/pmmrec",                  # optional
        tokenizer=tokenizer,                          # optional: found in the checkpoint folder when saved there
        card_data={"datasets": ["me/my-interactions"], "eval_results": [...]},
    )

Each repo gets one commit holding: ``config.json`` (with an ``auto_map``), ``model.safetensors``, the modelling code
(every module the remote classes import: ``configuration_*.py``, ``modeling_*.py``, ``losses.py``,
``processing_pmmrec.py``, ``pipelines.py``; so ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` works
without this package), the ``PMMRecProcessor`` (tokenizer + image processor; item encoder and full model only) and a
model card ``README.md`` rendered by :mod:`pmmrec_hf.model_card`. A LoRA-wrapped model's adapter goes to its own repo
(``lora_adapter_repo``).

Policies
--------
* **Existing repos are updated, never deleted or recreated**: ``create_repo(exist_ok=True)`` then one
  ``upload_folder`` commit. Every file this function writes replaces the repo's copy (the README is regenerated from
  the card data each time). Files it does not write stay, except *our stale weights*: root-level
  ``model.safetensors``, ``model-*-of-*.safetensors``, ``model.safetensors.index.json`` and their
  ``pytorch_model*.bin`` counterparts are deleted in the same commit when this push does not write them (e.g. a
  sharded checkpoint replaced by a single file), so a repo never mixes weights of two pushes. An existing repo's
  visibility is not changed (``private`` applies to new repos; a warning says so).
* **Validation before any network call**: a NaN/inf weight, an item encoder whose width differs from the user
  encoder's, or encoders whose configs disagree with the full model's config raise ``ValueError``; the token is
  checked (``whoami``) and every target namespace must be writable by it before the first repo is created.
* **Untrained components**: the package's own layers have deterministic initial values (LayerNorm weight 1 and
  bias 0, Linear bias 0); a component whose such parameters *all* still hold them has never taken an optimiser
  step. With ``require_trained=True`` pushing such a component raises ``ValueError``; by default it is logged as a
  warning (tiny test models, or publishing a freshly assembled model on purpose).
* **Failures**: the staging folders live in one temporary directory removed on success and on any error. A network
  or permission error raises :class:`PMMRecPublishError` naming the repo that failed, the repos already published
  (with their commits) and the repos for which nothing was published. Commits are atomic: a repo gets the whole
  commit or none of it (a repo created just before a failed upload stays, empty).

Loading
-------
``PMMRecItemEncoder.from_pretrained(repo)``, ``PMMRecUserEncoder.from_pretrained(repo)``,
``PMMRecModel.from_pretrained(repo)``, ``PMMRecModel.from_encoders(item_repo, user_repo)`` and
``AutoModel.from_pretrained(repo, trust_remote_code=True)`` (no package needed). :func:`check_component` reads a
repo's (or folder's) ``config.json`` and raises a ``ValueError`` naming the expected and the found ``model_type``
when the repo holds another component, and an ``OSError`` naming the repo when it does not exist.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "STALE_WEIGHT_PATTERNS",
    "PMMRecAuthError",
    "PMMRecPublishError",
    "check_component",
    "default_image_processor",
    "looks_untrained",
    "push_pmmrec_to_hub",
]

logger = logging.getLogger(__name__)

#: Root-level weight files deleted from a repo when a push does not write them (stale weights of an older push).
STALE_WEIGHT_PATTERNS: tuple[str, ...] = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)

_COMPONENT_OF_MODEL_TYPE = {
    "pmmrec_item_encoder": "item_encoder",
    "pmmrec_user_encoder": "user_encoder",
    "pmmrec": "full_model",
}
_TITLE = {"item_encoder": "item encoder", "user_encoder": "user encoder", "full_model": "full model",
          "lora_adapter": "LoRA adapter"}
_CLASS_NAME = {"item_encoder": "PMMRecItemEncoder", "user_encoder": "PMMRecUserEncoder", "full_model": "PMMRecModel"}
_LOGIN_HINT = (
    "Pass a token with write access with `token=` (CLI: `--token`), set HF_TOKEN, or log in once with "
    "`hf auth login` (older clients: `huggingface-cli login`)."
)
_LOAD_KWARGS = ("token", "revision", "cache_dir", "force_download", "local_files_only", "subfolder", "proxies")


class PMMRecPublishError(RuntimeError):
    """Publishing failed. ``repo_id``: the repo being written (None before the first one); ``published``:
    ``{component: CommitInfo}`` already committed; ``not_published``: repo ids that received nothing."""

    def __init__(self, message: str, *, repo_id: str | None = None, published: Mapping | None = None,
                 not_published: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.repo_id = repo_id
        self.published = dict(published or {})
        self.not_published = list(not_published)


class PMMRecAuthError(PMMRecPublishError):
    """The token is missing, invalid, read-only, or may not write to a target namespace."""


# --------------------------------------------------------------------------------------------------
# what a repo holds
# --------------------------------------------------------------------------------------------------


def _describe(model_type: Any) -> str:
    component = _COMPONENT_OF_MODEL_TYPE.get(model_type)
    return f"a PMMRec {_TITLE[component]}" if component else "a model that is not a PMMRec component"


def _loader_hint(model_type: Any) -> str:
    component = _COMPONENT_OF_MODEL_TYPE.get(model_type)
    if component is None:
        return ""
    hint = f" Load it with {_CLASS_NAME[component]}.from_pretrained"
    if component != "full_model":
        hint += ", or assemble a full model with PMMRecModel.from_encoders(item_encoder_repo, user_encoder_repo)"
    return hint + "."


def read_config_dict(path_or_repo: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """The ``config.json`` of a local folder or a Hub repo, as a dict. ``OSError`` naming it when absent.

    Keyword arguments of ``from_pretrained`` that matter for finding the file (``token``, ``revision``,
    ``cache_dir``, ``force_download``, ``local_files_only``, ``subfolder``, ``proxies``) are honoured; the others are
    ignored.
    """
    import json

    from transformers.utils import CONFIG_NAME, cached_file

    name = os.fspath(path_or_repo)
    options = {k: kwargs[k] for k in _LOAD_KWARGS if kwargs.get(k) is not None}
    try:
        resolved = cached_file(name, CONFIG_NAME, **options)
    except OSError as err:
        if os.path.isdir(name):
            reason = f"the folder has no {CONFIG_NAME}"
        else:
            reason = (
                "no local folder of that name, and no Hub repo of that id readable with the given token (check the id "
                "and the revision; a private repo needs `token=` or `hf auth login`)"
            )
        raise OSError(f"Cannot load a PMMRec model from '{name}': {reason}. ({type(err).__name__}: {err})") from err
    if resolved is None:
        raise OSError(f"Cannot load a PMMRec model from '{name}': it has no {CONFIG_NAME}.")
    try:
        with open(resolved, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Cannot load a PMMRec model from '{name}': {resolved} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ValueError(f"Cannot load a PMMRec model from '{name}': {resolved} holds a JSON {type(config).__name__}, "
                         "not an object of config fields.")
    return config


def check_component(path_or_repo: str | os.PathLike, expected_model_type: str, **kwargs: Any) -> dict[str, Any]:
    """Check that a folder or Hub repo holds the PMMRec component of ``expected_model_type``; return its config dict.

    ``expected_model_type``: ``"pmmrec_item_encoder"``, ``"pmmrec_user_encoder"`` or ``"pmmrec"`` (the class's
    ``config_class.model_type``). Raises ``ValueError`` naming the expected and the found ``model_type`` (and the
    class that loads what was found), or ``OSError`` naming the repo when it (or its ``config.json``) is missing.
    ``kwargs`` are ``from_pretrained``'s (``token``, ``revision``, ...). Needs only transformers and the standard
    library, so it can be called from the modelling code.
    """
    config = read_config_dict(path_or_repo, **kwargs)
    found = config.get("model_type")
    if found != expected_model_type:
        raise ValueError(
            f"'{os.fspath(path_or_repo)}' holds {_describe(found)}, not {_describe(expected_model_type)}: expected "
            f"model_type {expected_model_type!r}, found {found!r}.{_loader_hint(found)}"
        )
    return config


# --------------------------------------------------------------------------------------------------
# checks on the model
# --------------------------------------------------------------------------------------------------


def _own_modules(module):
    """Modules of this package's own layers: everything but the pretrained backbones inside the towers."""
    from .modeling_pmmrec import BackboneTower

    skip: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, BackboneTower):
            skip.update(id(m) for m in sub.modules())
    return [m for m in module.modules() if id(m) not in skip]


def looks_untrained(module) -> bool:
    """True when every deterministically initialised parameter of the package's own layers (LayerNorm weight = 1,
    LayerNorm bias = 0, Linear bias = 0; backbones excluded) still holds its initial value, i.e. the component never
    took an optimiser step. False when it has no such parameter (nothing to tell)."""
    import torch
    from torch import nn

    seen = False
    with torch.no_grad():
        for sub in _own_modules(module):
            if isinstance(sub, nn.LayerNorm):
                pairs = [(sub.weight, 1.0), (sub.bias, 0.0)]
            elif isinstance(sub, nn.Linear):
                pairs = [(sub.bias, 0.0)]
            else:
                continue
            for param, value in pairs:
                if param is None:
                    continue
                seen = True
                if not bool((param == value).all()):
                    return False
    return seen


def _non_finite(module) -> list[str]:
    import torch

    bad = []
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "custom_pipelines"}


def _config_signature(config) -> Any:
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(config.to_dict())


def _components(model) -> dict[str, Any]:
    component = _COMPONENT_OF_MODEL_TYPE.get(getattr(getattr(model, "config", None), "model_type", None))
    if component is None:
        raise ValueError(
            f"Expected a PMMRecModel, PMMRecItemEncoder or PMMRecUserEncoder (or a folder saved from one), got "
            f"{type(model).__name__}."
        )
    if component == "full_model":
        return {"item_encoder": model.item_encoder, "user_encoder": model.user_encoder, "full_model": model}
    return {component: model}


def _check_publishable(parts: dict[str, Any], targets: dict[str, str], require_trained: bool) -> None:
    pushed = {c: parts[c] for c in targets}
    for component, module in pushed.items():
        bad = _non_finite(module)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ValueError(f"Refusing to publish the {_TITLE[component]}: non-finite (NaN/inf) weights in {shown}.")
    item, user = parts.get("item_encoder"), parts.get("user_encoder")
    if item is not None and user is not None:
        d_item, d_user = item.config.hidden_size, user.config.hidden_size
        width = getattr(getattr(user, "position_embeddings", None), "embedding_dim", d_user)
        if d_item != d_user or width != d_user:
            raise ValueError(
                f"Refusing to publish mismatched components: the item encoder's hidden size is {d_item} but the user "
                f"encoder's is {d_user} (weights: {width}); the user encoder consumes item embeddings, so they must "
                "agree."
            )
    full = parts.get("full_model")
    if full is not None:
        for name, module in (("item_encoder", item), ("user_encoder", user)):
            if _config_signature(getattr(full.config, f"{name}_config")) != _config_signature(module.config):
                raise ValueError(
                    f"Refusing to publish: the model's {_TITLE[name]} does not match the full model's config "
                    f"(`config.{name}_config`), so the published folders would not load. Rebuild the model with "
                    "PMMRecModel.from_encoders(item_encoder, user_encoder)."
                )
    for component, module in pushed.items():
        if component == "lora_adapter":
            continue  # adapters start at zero (B = 0) by design; only the non-finite check applies
        modules = [parts["item_encoder"], parts["user_encoder"]] if component == "full_model" else [module]
        if any(looks_untrained(m) for m in modules):
            message = (
                f"The {_TITLE[component]} looks untrained: its own layers (LayerNorm, Linear biases) all still hold "
                "their initial values."
            )
            if require_trained:
                raise ValueError(f"Refusing to publish: {message} Train it first, or pass require_trained=False.")
            logger.warning("%s Publishing it anyway (require_trained=False).", message)


# --------------------------------------------------------------------------------------------------
# model, tokenizer and image processor
# --------------------------------------------------------------------------------------------------


def default_image_processor(item_config):
    """The image processor an item encoder trains with (:class:`~pmmrec_hf.PMMRecImageProcessor`, the collator's
    code): RGB (any image mode), squash to ``image_size`` (bilinear, no crop), [0, 1], normalise with
    ``image_mean`` / ``image_std``."""
    from .processing_pmmrec import PMMRecImageProcessor

    return PMMRecImageProcessor.from_item_config(item_config)


def _load_model(model_or_path: Any, token: Any):
    """(model, local folder or None) from a model object, a saved folder or a Hub repo id."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path, None
    from .modeling_pmmrec import PMMRecItemEncoder, PMMRecModel, PMMRecUserEncoder

    classes = {"item_encoder": PMMRecItemEncoder, "user_encoder": PMMRecUserEncoder, "full_model": PMMRecModel}
    source = os.fspath(model_or_path)
    found = read_config_dict(source, token=token).get("model_type")
    component = _COMPONENT_OF_MODEL_TYPE.get(found)
    if component is None:
        raise ValueError(f"'{source}' does not hold a PMMRec model (model_type {found!r}).")
    model = classes[component].from_pretrained(source, token=token)
    return model, (source if os.path.isdir(source) else None)


def _load_tokenizer(tokenizer: Any, folder: str | None, token: Any):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer), token=token)
    if tokenizer is None and folder is not None and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return tokenizer


def _load_image_processor(image_processor: Any, folder: str | None, token: Any, item_config):
    if isinstance(image_processor, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(os.fspath(image_processor), token=token)
    if image_processor is None and folder is not None and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder)
    if image_processor is None and item_config is not None and item_config.uses_vision:
        return default_image_processor(item_config)
    return image_processor


def _save_processor(folder: Path, item_config, tokenizer, image_processor) -> None:
    """The item encoder's PMMRecProcessor (tokenizer + image processor + text settings) into `folder`; without a
    tokenizer for a text model, the image processor alone."""
    from .processing_pmmrec import PMMRecProcessor

    if isinstance(tokenizer, PMMRecProcessor):
        tokenizer.save_pretrained(folder)
        return
    if tokenizer is not None or not item_config.uses_text:
        PMMRecProcessor.from_item_config(item_config, tokenizer, image_processor).save_pretrained(folder)
        return
    if image_processor is not None:
        image_processor.save_pretrained(folder)


def _lora_card(adapter_repo: str, base_repo: str) -> str:
    """The model card of a published LoRA adapter (YAML metadata the Hub reads: library, base model, tags)."""
    return f"""---
library_name: peft
base_model: {base_repo}
tags:
- pmmrec
- recommendation
- lora
---

# PMMRec LoRA adapter

LoRA adapters (peft) for the PMMRec model [{base_repo}](../{base_repo}), published with `pmmrec_hf`. The base
model carries its modelling code, so both load with `transformers` and `peft` alone:

```python
from peft import AutoPeftModel, PeftModel
from transformers import AutoModel

base = AutoModel.from_pretrained("{base_repo}", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "{adapter_repo}").eval()

# or in one call (the adapter names its base model)
model = AutoPeftModel.from_pretrained("{adapter_repo}", trust_remote_code=True).eval()
print(type(model.get_base_model()).__name__)
```

`model.merge_and_unload()` folds the adapters into the base weights (a plain PMMRec model).
"""


def _saveable(obj: Any, what: str) -> None:
    if obj is not None and not callable(getattr(obj, "save_pretrained", None)):
        raise TypeError(f"`{what}` must have a save_pretrained method (a transformers {what}), got {type(obj).__name__}.")


# --------------------------------------------------------------------------------------------------
# pushing
# --------------------------------------------------------------------------------------------------


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _summary(published: Mapping[str, Any], repos: Mapping[str, str], remaining: list[str]) -> str:
    done = ", ".join(f"{_TITLE[c]} -> '{repos[c]}' (commit {getattr(info, 'oid', None) or '?'})"
                     for c, info in published.items())
    return (f"Already published: {done or 'nothing'}. Nothing was published for: "
            f"{', '.join(repr(r) for r in remaining) or 'no other repo'}.")


def _auth_context(api, targets: dict[str, str], token: Any) -> tuple[str, set[str]]:
    """(user name, writable namespaces) of the token; PMMRecAuthError / PMMRecPublishError before any upload."""
    from huggingface_hub import get_token

    repos = list(targets.values())
    if token is False or (token is None and not get_token()):
        raise PMMRecAuthError(f"No Hugging Face token found: publishing needs one. {_LOGIN_HINT} Nothing was published.",
                              not_published=repos)
    try:
        info = api.whoami()
    except Exception as err:
        status = _status(err)
        if status in (401, 403):
            raise PMMRecAuthError(
                f"The Hub at {api.endpoint} rejected the token (HTTP {status}: invalid or expired). {_LOGIN_HINT} "
                "Nothing was published.", not_published=repos,
            ) from err
        raise PMMRecPublishError(
            f"Could not reach the Hub at {api.endpoint} to check the token ({type(err).__name__}: {err}). "
            f"Nothing was published for: {', '.join(repr(r) for r in repos)}.", not_published=repos,
        ) from err
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PMMRecAuthError(f"The token of '{info.get('name')}' is read-only. {_LOGIN_HINT} Nothing was published.",
                              not_published=repos)
    namespaces = {info.get("name")} | {org.get("name") for org in info.get("orgs") or []}
    return info.get("name"), {n for n in namespaces if n}


def warn_if_public(api, repo_id: str, repo_type: str | None = None) -> bool:
    """After ``create_repo(private=True, exist_ok=True)``: log a warning when ``repo_id`` already existed and is
    public (``private`` does not change an existing repo); True when it warned. Used by every push."""
    try:
        public = not api.repo_info(repo_id, repo_type=repo_type).private
    except Exception:
        return False
    if public:
        logger.warning("'%s' already exists and is public: private=True does not change an existing repo, the upload "
                       "is public (make it private first with HfApi().update_repo_settings).", repo_id)
    return public


def _commit_to(api, component, repo_id, folder, *, private, revision, create_branch, commit_message, description):
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private:
        warn_if_public(api, repo_id)
    if revision is not None:
        branches = {b.name for b in api.list_repo_refs(repo_id).branches}
        if revision not in branches:
            if not create_branch:
                raise ValueError(f"Branch '{revision}' does not exist in '{repo_id}'; pass create_branch=True to create it.")
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message or f"Upload PMMRec {_TITLE[component]}",
        commit_description=description,
        delete_patterns=list(STALE_WEIGHT_PATTERNS),
    )


def push_pmmrec_to_hub(
    model_or_path: Any,
    item_encoder_repo: str | None = None,
    user_encoder_repo: str | None = None,
    full_model_repo: str | None = None,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    card_data: Any = None,
    create_branch: bool = True,
    require_trained: bool = False,
    endpoint: str | None = None,
    lora_adapter_repo: str | None = None,
    lora_base_model_repo: str | None = None,
) -> dict[str, Any]:
    """Publish the item encoder, the user encoder and optionally the full model of a PMMRec model as separate repos.

    Args:
        model_or_path: a ``PMMRecModel`` (or a ``PMMRecItemEncoder`` / ``PMMRecUserEncoder`` alone), or a folder
            saved with ``save_pretrained`` (its tokenizer / ``preprocessor_config.json`` are used when present), or a
            Hub repo id.
        item_encoder_repo, user_encoder_repo, full_model_repo: target repos (``name`` alone = the token owner's
            namespace); None skips that component. At least one is required.
        token: a Hub token with write access (default: the stored login / ``HF_TOKEN``).
        private: create new repos private (existing repos keep their visibility).
        revision: the branch to commit to (default: the main branch); created from the main branch when missing and
            ``create_branch`` is True, else a ``ValueError``.
        commit_message: the commit title (default "Upload PMMRec <component>").
        tokenizer: a transformers tokenizer (or its path / repo id), saved with the item encoder and the full model.
        image_processor: a transformers image processor (or its path / repo id), saved with the item encoder and the
            full model; default for a vision model: :func:`default_image_processor` (PMMRec's image transform).
        card_data: a :class:`~pmmrec_hf.model_card.PMMRecCardData` or a dict of its fields, shared by the three
            cards (component, repo id and sibling repo ids are filled per repo).
        create_branch: create ``revision`` when the repo lacks it.
        require_trained: refuse components that never took an optimiser step (see :func:`looks_untrained`).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` / huggingface.co).
        lora_adapter_repo: with a LoRA-wrapped model (a peft ``PeftModel`` from :func:`pmmrec_hf.transfer.apply_lora`),
            publish its adapter alone in this repo (``adapter_config.json`` + ``adapter_model.safetensors`` + a card).
            Its ``base_model_name_or_path`` is the published full model: ``full_model_repo`` when this push publishes
            the base model too (the model without its adapters), else ``lora_base_model_repo`` (an existing full-model
            repo). The adapter loads with ``PeftModel.from_pretrained(AutoModel.from_pretrained(base,
            trust_remote_code=True), adapter_repo)`` and ``AutoPeftModel.from_pretrained(adapter_repo,
            trust_remote_code=True)``. The other components of a LoRA-wrapped model are its base model's.
        lora_base_model_repo: the full-model repo the adapter names as its base when ``full_model_repo`` is not given.

    Returns:
        ``{component: CommitInfo}`` for the components pushed (``"item_encoder"``, ``"user_encoder"``,
        ``"full_model"``, ``"lora_adapter"``).

    Raises:
        ValueError: nothing to push, a component the model does not have, duplicate repos, NaN weights, mismatched
            components, an untrained component with ``require_trained=True`` (all before any network call).
        PMMRecAuthError: missing, invalid or read-only token, or a namespace the token may not write to (before
            any upload); or a 401/403 answer while publishing.
        PMMRecPublishError: a network or Hub error; names the failing repo, what was published, what was not.
    """
    from huggingface_hub import HfApi

    from .model_card import PMMRecCardData, render_model_card

    from .transfer import is_peft_model, lora_base_model

    targets = {c: r for c, r in (("item_encoder", item_encoder_repo), ("user_encoder", user_encoder_repo),
                                 ("full_model", full_model_repo), ("lora_adapter", lora_adapter_repo)) if r}
    if not targets:
        raise ValueError("Nothing to publish: pass item_encoder_repo, user_encoder_repo, full_model_repo and/or "
                         "lora_adapter_repo.")
    base_card = PMMRecCardData.coerce(card_data)  # card data errors before anything else
    peft_model = model_or_path if is_peft_model(model_or_path) else None
    if lora_adapter_repo and peft_model is None:
        raise ValueError(f"lora_adapter_repo='{lora_adapter_repo}' needs a LoRA-wrapped model (a peft PeftModel, see "
                         f"pmmrec_hf.transfer.apply_lora); got {type(model_or_path).__name__}.")
    if lora_adapter_repo and not (full_model_repo or lora_base_model_repo):
        raise ValueError("A LoRA adapter needs its base model's repo: pass full_model_repo (published by this push) or "
                         "lora_base_model_repo (an existing full-model repo).")
    if peft_model is not None:
        model_or_path = lora_base_model(peft_model)

    model, folder = _load_model(model_or_path, token)
    parts = _components(model)
    if peft_model is not None:
        parts["lora_adapter"] = peft_model
    missing = [c for c in targets if c not in parts]
    if missing:
        raise ValueError(
            f"A {type(model).__name__} has no {', '.join(_TITLE[c] for c in missing)} to publish: push a PMMRecModel "
            f"for that (or only the {', '.join(_TITLE[c] for c in parts)})."
        )
    _check_publishable(parts, targets, require_trained)
    item_config = parts["item_encoder"].config if "item_encoder" in parts else None
    tokenizer = _load_tokenizer(tokenizer, folder, token)
    image_processor = _load_image_processor(image_processor, folder, token, item_config)
    _saveable(tokenizer, "tokenizer")
    _saveable(image_processor, "image processor")
    if tokenizer is None and item_config is not None and item_config.uses_text and (
        {"item_encoder", "full_model"} & set(targets)
    ):
        logger.warning("No tokenizer given: the published item encoder / full model will not carry one (users must "
                       "load the text backbone's tokenizer).")

    api = HfApi(endpoint=endpoint, token=token)
    user, namespaces = _auth_context(api, targets, token)
    repos = {c: (r if "/" in r else f"{user}/{r}") for c, r in targets.items()}
    if len(set(repos.values())) != len(repos):
        raise ValueError(f"Each component needs its own repo, got {repos}.")
    lora_base = None
    if "lora_adapter" in repos:
        lora_base = repos.get("full_model") or (lora_base_model_repo if "/" in lora_base_model_repo
                                                 else f"{user}/{lora_base_model_repo}")
        if "full_model" not in repos:  # an existing repo: it must hold a full model
            check_component(lora_base, "pmmrec", token=token)
    forbidden = sorted(r for r in repos.values() if r.split("/")[0] not in namespaces)
    if forbidden:
        raise PMMRecAuthError(
            f"The token of '{user}' cannot write to {', '.join(repr(r) for r in forbidden)} (it may write to: "
            f"{', '.join(sorted(namespaces))}). {_LOGIN_HINT} Nothing was published.",
            repo_id=forbidden[0], not_published=list(repos.values()),
        )

    published: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pmmrec_push_") as staging:
        folders = {}
        for component in repos:
            target = Path(staging) / component
            if component == "lora_adapter":
                from .transfer import save_lora_adapter

                save_lora_adapter(peft_model, str(target), lora_base, revision=revision)
                (target / "README.md").write_text(_lora_card(repos[component], lora_base), encoding="utf-8")
                folders[component] = target
                continue
            parts[component].save_pretrained(target)
            if component != "user_encoder":
                _save_processor(target, item_config, tokenizer, image_processor)
            card = PMMRecCardData.coerce(base_card)
            card.component = component
            card.repo_id = repos[component]
            card.item_encoder_repo = repos.get("item_encoder", card.item_encoder_repo)
            card.user_encoder_repo = repos.get("user_encoder", card.user_encoder_repo)
            card.full_model_repo = repos.get("full_model", card.full_model_repo)
            card.hub_url = api.endpoint
            render_model_card(
                parts[component], card, has_tokenizer=tokenizer is not None,
                has_image_processor=image_processor is not None,
            ).save(target / "README.md")
            folders[component] = target

        order = list(repos)
        for position, component in enumerate(order):
            repo_id = repos[component]
            siblings = ", ".join(f"{_TITLE[c]}: {repos[c]}" for c in order if c != component)
            description = "Published with pmmrec_hf" + (f" together with {siblings}." if siblings else ".")
            try:
                published[component] = _commit_to(
                    api, component, repo_id, folders[component], private=private, revision=revision,
                    create_branch=create_branch, commit_message=commit_message, description=description,
                )
            except Exception as err:
                remaining = [repos[c] for c in order[position:]]
                status = _status(err)
                if isinstance(err, ValueError) and status is None:
                    raise ValueError(f"{err} {_summary(published, repos, remaining)}") from err
                kind = PMMRecAuthError if status in (401, 403) else PMMRecPublishError
                hint = f" {_LOGIN_HINT}" if status in (401, 403) else ""
                raise kind(
                    f"Publishing the {_TITLE[component]} to '{repo_id}' failed ({type(err).__name__}: {err}).{hint} "
                    f"{_summary(published, repos, remaining)}",
                    repo_id=repo_id, published=published, not_published=remaining,
                ) from err
    return published
