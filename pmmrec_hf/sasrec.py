"""SASRec: the classic item-ID sequential recommender, as a baseline for PMMRec.

SASRec (Kang & McAuley, 2018) represents every item by a learned ID embedding. This implementation
differs from PMMRec in exactly one place: the item encoder is an ``nn.Embedding(num_items, d)`` table
instead of text + image towers. The user encoder is the same :class:`PMMRecUserEncoder` (same causal
transformer, same left padding, same learned right-aligned positions), the batch has the same keys (see
docs/formats.md; text and pixel keys are ignored), the output is the same :class:`PMMRecModelOutput`, and
``encode_items`` / ``encode_users`` mirror :class:`PMMRecModel`, so training and evaluation code treat both
models alike and result tables compare them on identical splits and metrics.

Training objective (``SASRecConfig.negatives``):

- ``"in_batch"`` (default, what the comparison tables use): exactly PMMRec's next-item loss
  (:func:`pmmrec_hf.losses.next_item_loss`): every real position is a training example, the candidates
  are the batch's distinct items (gathered across processes when ``gather_negatives``), the user's own
  sequence items other than the positive are masked as false negatives, and the log-popularity
  correction is applied when ``logq_correction`` and the batch carries ``item_log_popularity``.
- ``"full"``: softmax over **all** ``num_items`` items, with the same false-negative masking (items of the
  user's own sequence other than the positive), without log-q correction (there is no sampling bias to
  correct). Memory grows as positions x num_items; meant for catalogues up to ~1e5 items.

The original SASRec paper trains with one sampled negative per position and binary cross-entropy; that
variant is not provided: the in-batch softmax is both stronger and the same objective PMMRec uses, which
keeps the comparison about the item representation only.

This file imports only torch, transformers and its sibling files, so it travels with a checkpoint
(``trust_remote_code`` loading).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .configuration_pmmrec import PMMRecUserEncoderConfig, _check_positive, _check_scoring
from .losses import _user_item_ids, distributed_mean, next_item_loss
from .modeling_pmmrec import (
    PMMRecModelOutput,
    PMMRecPreTrainedModel,
    PMMRecUserEncoder,
    PMMRecUserEncoderOutput,
    _check_inference_index,
    _encode_users,
    _GatheredItems,
    _normalise_if_cosine,
)

NEGATIVES = ("in_batch", "full")

_USER_ENCODER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "layer_norm_position",
    "max_position_embeddings",
    "initializer_range",
)


class SASRecConfig(PMMRecUserEncoderConfig):
    r"""Configuration of [`SASRecModel`]: an item-ID embedding table + PMMRec's user encoder.

    Every argument of [`PMMRecUserEncoderConfig`] (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob, layer_norm_eps,
    layer_norm_position, max_position_embeddings, initializer_range) has the same meaning and default here,
    plus:

    Args:
        num_items (`int`): number of items I; item ids are 0..I-1 (rows of items.parquet).
        negatives (`str`, *optional*, defaults to `"in_batch"`):
            `"in_batch"` (PMMRec's in-batch softmax; the comparison tables use it) or `"full"` (softmax over
            all items).
        logq_correction (`bool`, *optional*, defaults to `True`):
            subtract log q(item) from the in-batch logits when the batch has `item_log_popularity`
            (ignored for `negatives="full"`).
        next_item_similarity (`str`, *optional*, defaults to `"dot"`), next_item_temperature (`float`,
            *optional*, defaults to 1.0): as in [`PMMRecConfig`]: `"cosine"` L2-normalises the item table rows
            and the user embeddings, and the logits are divided by the temperature.
        gather_negatives (`bool`, *optional*, defaults to `True`):
            gather in-batch negatives across processes when torch.distributed is initialised.

    `user_encoder_config` gives the [`PMMRecUserEncoderConfig`] of the user encoder (same fields).
    """

    model_type = "pmmrec_sasrec"

    def __init__(
        self,
        num_items: int | None = None,
        negatives: str = "in_batch",
        logq_correction: bool = True,
        gather_negatives: bool = True,
        next_item_similarity: str = "dot",
        next_item_temperature: float = 1.0,
        **kwargs,
    ):
        self.num_items = num_items
        self.negatives = negatives
        self.logq_correction = logq_correction
        self.next_item_similarity = next_item_similarity
        self.next_item_temperature = next_item_temperature
        self.gather_negatives = gather_negatives
        super().__init__(**kwargs)  # user-encoder fields; calls validate()

    def validate(self) -> None:
        super().validate()
        if self.num_items is not None:
            _check_positive("num_items", self.num_items)
        if self.negatives not in NEGATIVES:
            raise ValueError(f"`negatives` must be one of {NEGATIVES}, got {self.negatives!r}.")
        _check_scoring(self.next_item_similarity, self.next_item_temperature)

    @property
    def user_encoder_config(self) -> PMMRecUserEncoderConfig:
        """A plain [`PMMRecUserEncoderConfig`] with this config's user-encoder fields."""
        return PMMRecUserEncoderConfig(**{name: getattr(self, name) for name in _USER_ENCODER_FIELDS})


class SASRecModel(PMMRecPreTrainedModel):
    """SASRec baseline: `nn.Embedding(num_items, d)` item table + [`PMMRecUserEncoder`].

    `forward` takes the PMMRec batch (docs/formats.md): `item_ids` (N,) integer ids of the batch's distinct
    items, `item_index` (B, S) left-padded with -1 (columns [:, :-1] inputs, [:, 1:] next-item targets),
    optional `item_log_popularity` (N,); text / pixel / corruption keys are accepted and ignored.
    """

    config_class = SASRecConfig
    base_model_prefix = "sasrec"

    def __init__(self, config: SASRecConfig):
        super().__init__(config)
        if config.num_items is None:
            raise ValueError("`SASRecConfig.num_items` is required to build a SASRecModel.")
        self.item_embeddings = nn.Embedding(config.num_items, config.hidden_size)
        self.user_encoder = PMMRecUserEncoder(config.user_encoder_config)
        self.post_init()

    # --- the interface shared with PMMRecModel -------------------------------------------------------

    def encode_items(self, item_ids: torch.Tensor | None = None, **ignored: Any) -> torch.Tensor:
        """(N, d) embeddings of the items `item_ids` (N,); other item-input keys (texts, pixels) are ignored."""
        if item_ids is None:
            raise ValueError("SASRecModel.encode_items needs `item_ids` (an ID model has no text or image input).")
        item_ids = torch.as_tensor(item_ids, device=self.item_embeddings.weight.device)
        if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= self.config.num_items):
            raise ValueError(
                f"`item_ids` must lie in [0, {self.config.num_items}), got values in "
                f"[{int(item_ids.min())}, {int(item_ids.max())}]."
            )
        return _normalise_if_cosine(self.item_embeddings(item_ids), self.config)

    def encode_users(self, item_embeddings: torch.Tensor, item_index: torch.Tensor) -> PMMRecUserEncoderOutput:
        """User states for sequences given as indices (B, S) into item_embeddings (N, d), -1 at padding."""
        return _encode_users(self.user_encoder, item_embeddings, item_index, self.config)

    def all_item_embeddings(self) -> torch.Tensor:
        """(num_items, d) the whole item table (row i = item id i), e.g. for full-ranking evaluation
        (L2-normalised rows with `next_item_similarity="cosine"`)."""
        return _normalise_if_cosine(self.item_embeddings.weight, self.config)

    # --- training -----------------------------------------------------------------------------------

    def forward(
        self,
        item_ids: torch.Tensor,
        item_index: torch.Tensor,
        item_log_popularity: torch.Tensor | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> PMMRecModelOutput:
        """Next-item loss (see the module docstring for `negatives`); other batch keys are ignored."""
        config = self.config
        if not return_loss:
            _check_inference_index(item_index, config.max_position_embeddings)
        item_emb = self.encode_items(item_ids)  # (N, d)
        if not return_loss:
            users = self.encode_users(item_emb, item_index)
            return PMMRecModelOutput(
                item_embeddings=item_emb, user_states=users.last_hidden_state, user_embeddings=users.user_embeddings
            )

        inputs, targets = item_index[:, :-1], item_index[:, 1:]  # (B, L), (B, L)
        users = self.encode_users(item_emb, inputs)
        states = users.last_hidden_state  # (B, L, d)
        positions = (inputs >= 0) & (targets >= 0)  # (B, L)
        query_users, query_slots = positions.nonzero(as_tuple=True)  # (P,), (P,)
        query = _normalise_if_cosine(states[query_users, query_slots], config)  # (P, d)
        target_rows = targets[query_users, query_slots]  # (P,) rows of item_emb
        user_ids = _user_item_ids(item_index, item_ids)  # (B, S)
        count = torch.tensor(query_users.numel(), device=item_emb.device)

        if config.negatives == "full":
            table = self.all_item_embeddings()  # (I, d)
            total = next_item_loss(
                query=query,
                candidates=table,
                targets=item_ids[target_rows],  # global ids = rows of the table
                query_users=query_users,
                user_item_ids=user_ids,
                candidate_ids=torch.arange(table.shape[0], device=table.device),
                reduction="sum",
                temperature=config.next_item_temperature,
            )
        else:
            pool = _GatheredItems(item_emb, item_ids, item_log_popularity, config.gather_negatives)
            total = next_item_loss(
                query=query,
                candidates=pool.embeddings,
                targets=target_rows + pool.offset,
                query_users=query_users,
                user_item_ids=user_ids,
                candidate_ids=pool.ids,
                candidate_log_q=pool.log_q if config.logq_correction else None,
                candidate_valid=pool.valid,
                reduction="sum",
                temperature=config.next_item_temperature,
            )
        # mean over all positions of all processes (= total / count with one process)
        loss = distributed_mean(total, count)
        return PMMRecModelOutput(
            loss=loss,
            next_item_loss=loss,
            item_embeddings=item_emb,
            user_states=states,
            user_embeddings=users.user_embeddings,
        )


__all__ = ["NEGATIVES", "SASRecConfig", "SASRecModel"]
