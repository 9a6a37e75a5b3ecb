"""Packed (unpadded) tokens for the item encoder's trainable part: the text tower's top blocks and the fusion.

A batch's titles are short (MovieLens-100K titles: ~9 tokens) but padded to the item encoder's text length
(50). With a `TokenPacking` plan, `PMMRecItemEncoder.forward(..., token_packing=plan)` runs every per-token
operation of the trainable text blocks and of the fusion (projections, FFNs, layer norms, residuals) on the
real tokens only, laid end to end, and the attention as variable-length attention:

- ``attention="grid"`` (default): each sequence's queries/keys/values are scattered into a small padded grid
  (rows = items, width = the batch's longest sequence, rounded up to `length_multiple`), attended with
  `scaled_dot_product_attention` under a key mask, and gathered back. Static shapes, works on CPU and CUDA,
  compiles. Attention is the smaller part of a block's FLOPs at these lengths (4 T^2 h vs 2 T (4 h^2 + 2 h f)).
- ``attention="nested"``: SDPA on nested (jagged) tensors, no grid at all (torch >= 2.5; CPU and CUDA).

The plan is computed on the host from the text lengths (known when the batch is built: the collator's
attention mask, or the feature cache's stored lengths), so the step itself needs no device-to-host sync; the
packed token count can be rounded up to a few bucket sizes (`token_buckets`) so that compiled code sees a
few shapes only. Bucket-padding tokens read a real token's input, attend only among themselves and never
reach an output.

What equals the padded path: the item, text and vision embeddings (the padded path masks every padding
token out of attention keys and means), up to float rounding (tests/test_throughput_packing.py states the
tolerances). `last_hidden_state` is not returned in packed mode (None). Text backbones: any transformers
model whose self-attention goes through `transformers.AttentionInterface` (BERT, RoBERTa, XLM-R, ...), with
absolute positions added before the first trainable block; a backbone whose attention does not is refused
with an error naming `token_packing`.

This module is used by the package only (it is not part of the remote-code files of a Hub checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["TokenPacking", "VarlenAttention", "bucket_size", "geometric_buckets", "packed_item_forward"]

ATTENTION_KINDS = ("grid", "nested")
_INTERFACE_NAME = "pmmrec_packed"


def geometric_buckets(smallest: int, largest: int, per_doubling: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """Sizes from `smallest` to at least `largest`, `per_doubling` per factor of 2, each a multiple of
    `multiple` (e.g. 64, 80, 96, 112, 128, 152, ...): padding to the next one costs at most ~19% (4 per doubling)."""
    if smallest < 1 or largest < smallest or per_doubling < 1 or multiple < 1:
        raise ValueError(f"geometric_buckets: need 1 <= smallest <= largest, per_doubling >= 1 and multiple >= 1; "
                         f"got {smallest}, {largest}, {per_doubling}, {multiple}.")
    sizes, k = [], 0
    while True:
        size = int(math.ceil(smallest * 2 ** (k / per_doubling) / multiple) * multiple)
        if not sizes or size > sizes[-1]:
            sizes.append(size)
        if size >= largest:
            return tuple(sizes)
        k += 1


def bucket_size(count: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket >= count (count itself without buckets); a ValueError when count exceeds them all."""
    if not buckets:
        return count
    for size in buckets:
        if size >= count:
            return int(size)
    raise ValueError(f"{count} exceeds the largest bucket size {max(buckets)}: give larger buckets.")


class VarlenAttention:
    """Variable-length self-attention over packed tokens: sequence `s` holds the tokens whose `grid_index`
    lies in grid row s. q, k, v: (P, heads, head_dim) -> (P, heads, head_dim)."""

    def __init__(self, grid_index: torch.Tensor, key_mask: torch.Tensor, offsets: torch.Tensor | None,
                 order: torch.Tensor | None, kind: str):
        self.grid_index = grid_index  # (P,) flat index into the (rows, width) grid (bucket padding: last row)
        self.key_mask = key_mask  # (rows, width) bool, True at occupied grid positions (and column 0 of every row)
        self.offsets = offsets  # (S + 1,) sequence starts in `order` (nested only)
        self.order = order  # (P,) packed positions sorted by sequence (nested only)
        self.kind = kind

    def to(self, device) -> "VarlenAttention":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return VarlenAttention(move(self.grid_index), move(self.key_mask), move(self.offsets), move(self.order),
                               self.kind)

    def __call__(self, q, k, v, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
        if self.kind == "nested":
            return self._nested(q, k, v, dropout, scale)
        rows, width = self.key_mask.shape
        heads, head_dim = q.shape[1], q.shape[2]

        def to_grid(x):  # (P, h, dh) -> (rows, h, width, dh)
            grid = x.new_zeros(rows * width, heads, head_dim).index_copy(0, self.grid_index, x)
            return grid.view(rows, width, heads, head_dim).transpose(1, 2)

        context = F.scaled_dot_product_attention(to_grid(q), to_grid(k), to_grid(v),
                                                 attn_mask=self.key_mask[:, None, None, :], dropout_p=dropout,
                                                 scale=scale)  # (rows, h, width, dh)
        return context.transpose(1, 2).reshape(rows * width, heads, head_dim).index_select(0, self.grid_index)

    def _nested(self, q, k, v, dropout, scale):
        def jagged(x):  # (P, h, dh) -> nested (S, h, j, dh)
            return torch.nested.nested_tensor_from_jagged(x.index_select(0, self.order), self.offsets).transpose(1, 2)

        context = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout, scale=scale)
        flat = context.transpose(1, 2).values()  # (P, h, dh) in `order`
        return torch.empty_like(flat).index_copy(0, self.order, flat)


@dataclass
class TokenPacking:
    """Where a batch's real tokens go, computed on the host (see the module docstring). Build with
    `TokenPacking.build`; `to(device)` moves it. Sizes: N items (rows of the padded inputs), T text width of the
    inputs, V vision tokens per item, Pt packed text tokens (bucketed), Pf = Pt + N * V fusion tokens."""

    num_items: int
    text_width: int
    vision_tokens: int
    real_text_tokens: int
    text_token_index: torch.Tensor  # (Pt,) flat index into the (N * T) padded text tokens
    text_token_item: torch.Tensor  # (Pt,) item of each packed text token; N for bucket padding
    text_count: torch.Tensor  # (N, 1) float, text tokens per item (>= 1)
    text_attention: VarlenAttention
    fusion_token_item: torch.Tensor  # (Pf,) item of each fusion token; N for bucket padding / no-image tokens
    fusion_count: torch.Tensor  # (N, 1) float, fusion tokens per item
    fusion_attention: VarlenAttention

    @classmethod
    def build(cls, text_lengths, text_width: int, vision_tokens: int, has_image=None, token_buckets=None,
              length_multiple: int = 8, attention: str = "grid") -> "TokenPacking":
        """Plan for N items whose texts hold `text_lengths` (N,) real tokens each, right-padded to `text_width`
        (the collator's and the feature cache's layout: real tokens first), followed in the fusion by
        `vision_tokens` image tokens (left out for items whose `has_image` is False). `token_buckets`: sizes
        the packed text token count is rounded up to (None: exact). `length_multiple`: the attention grid's
        width is rounded up to a multiple of it. CPU tensors or lists only (no device sync)."""
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"token_packing attention must be one of {ATTENTION_KINDS}, got {attention!r}.")
        lengths = torch.as_tensor(text_lengths, dtype=torch.long).cpu()
        if lengths.dim() != 1:
            raise ValueError(f"token_packing: text_lengths must be (num_items,), got shape {tuple(lengths.shape)}.")
        n = lengths.numel()
        if n and (int(lengths.min()) < 1 or int(lengths.max()) > text_width):
            raise ValueError(f"token_packing: every text length must lie in [1, {text_width}] (at least the start "
                             f"token), got {int(lengths.min())}..{int(lengths.max())}.")
        images = (torch.ones(n, dtype=torch.bool) if has_image is None
                  else torch.as_tensor(has_image, dtype=torch.bool).cpu())
        real = int(lengths.sum())
        packed = bucket_size(real, token_buckets)
        spare = packed - real
        item_of = torch.repeat_interleave(torch.arange(n), lengths)  # (real,)
        starts = torch.cumsum(lengths, 0) - lengths  # (N,)
        position = torch.arange(real) - starts[item_of]  # (real,) position inside its text
        text_index = torch.cat([item_of * text_width + position, torch.zeros(spare, dtype=torch.long)])
        text_item = torch.cat([item_of, torch.full((spare,), n, dtype=torch.long)])
        # fusion tokens: the packed text tokens, then every item's V image tokens (row-major)
        vision_item = torch.arange(n).repeat_interleave(vision_tokens)  # (N * V,)
        vision_position = torch.arange(vision_tokens).repeat(n)  # (N * V,)
        vision_real = images[vision_item] if n else torch.zeros(0, dtype=torch.bool)
        fusion_item = torch.cat([text_item, torch.where(vision_real, vision_item, torch.full_like(vision_item, n))])
        text_grid_pos = torch.cat([position, torch.zeros(spare, dtype=torch.long)])
        fusion_pos = torch.cat([text_grid_pos, lengths[vision_item] + vision_position if n else vision_position])
        text_count = lengths.clamp(min=1).float()[:, None]
        fusion_count = (lengths + images.long() * vision_tokens).clamp(min=1).float()[:, None]
        longest = int(lengths.max()) if n else 1
        text_attention = _varlen(text_item, text_grid_pos, n, longest, length_multiple, attention)
        fusion_attention = _varlen(fusion_item, fusion_pos, n, longest + vision_tokens, length_multiple, attention)
        return cls(n, text_width, vision_tokens, real, text_index, text_item, text_count, text_attention,
                   fusion_item, fusion_count, fusion_attention)

    def to(self, device) -> "TokenPacking":
        move = (lambda t: t.to(device, non_blocking=True))
        return TokenPacking(self.num_items, self.text_width, self.vision_tokens, self.real_text_tokens,
                            move(self.text_token_index), move(self.text_token_item), move(self.text_count),
                            self.text_attention.to(device), move(self.fusion_token_item), move(self.fusion_count),
                            self.fusion_attention.to(device))

    @property
    def packed_text_tokens(self) -> int:
        return int(self.text_token_index.numel())

    def segment_mean(self, tokens: torch.Tensor, token_item: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """(N, d) mean of each item's packed tokens (bucket-padding / left-out tokens dropped)."""
        sums = tokens.new_zeros(self.num_items + 1, tokens.shape[-1]).index_add(0, token_item, tokens)
        return sums[: self.num_items] / count.to(tokens.dtype)


def _varlen(token_item, token_pos, n, longest, multiple, kind) -> VarlenAttention:
    """Grid layout: item s in row s at its position; bucket-padding and left-out tokens in one extra row
    (position 0 upwards, wrapping), which only they occupy."""
    width = max(int(math.ceil(longest / multiple) * multiple), 1)
    spare = token_item == n
    spare_pos = torch.arange(int(spare.sum())) % width
    pos = token_pos.clone()
    pos[spare] = spare_pos
    grid_index = token_item * width + pos
    key_mask = torch.zeros(n + 1, width, dtype=torch.bool)
    key_mask.view(-1)[grid_index] = True
    key_mask[:, 0] = True  # empty rows attend to something (their outputs are never read)
    offsets = order = None
    if kind == "nested":
        order = torch.argsort(token_item * width + pos, stable=True)  # by sequence, then position
        counts = torch.bincount(token_item, minlength=n + 1)
        if bool((counts[:n] == 0).any()):
            raise ValueError("token_packing attention 'nested' needs at least one token per item.")
        if int(counts[n]) == 0:
            counts = counts[:n]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    return VarlenAttention(grid_index, key_mask, offsets, order, kind)


# --------------------------------------------------------------------------------------------------
# running the item encoder on packed tokens
# --------------------------------------------------------------------------------------------------

_registered = False


def _packed_attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for packed tokens: query/key/value (1, heads, P, head_dim)."""
    varlen = kwargs.get("pmmrec_varlen")
    if varlen is None:
        raise RuntimeError("The 'pmmrec_packed' attention runs only inside PMMRecItemEncoder's token_packing path.")
    varlen.called = True
    context = varlen.attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                               dropout=dropout, scale=scaling)  # (P, h, dh)
    return context[None], None  # (1, P, h, dh): what the backbone's attention reshapes to (1, P, h * dh)


def _register_interface() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(_INTERFACE_NAME, _packed_attention_interface)
        _registered = True


class _VarlenCall:
    def __init__(self, attention: VarlenAttention):
        self.attention = attention
        self.called = False


def _packed_text_tokens(encoder, text_features, packing: TokenPacking) -> torch.Tensor:
    """(Pt, H_text) text token states after the trainable top blocks, computed on packed tokens."""
    from .modeling_pmmrec import _first_tensor, find_blocks

    tower = encoder.text_tower
    if tower.fully_trainable:
        raise ValueError("token_packing needs a text tower with frozen lower blocks (text_trainable_layers >= 0).")
    _register_interface()
    hidden = text_features.reshape(-1, text_features.shape[-1]).index_select(0, packing.text_token_index)
    _, _, blocks = find_blocks(tower.backbone)
    top = list(blocks)[tower.first_trainable:]
    if not top:
        return hidden
    config = tower.backbone.config
    previous = config.__dict__.get("_attn_implementation_internal")
    call = _VarlenCall(packing.text_attention)
    config._attn_implementation_internal = _INTERFACE_NAME
    try:
        states = hidden[None]  # (1, Pt, H): one "sequence" of packed tokens, attention by the plan
        for block in top:
            states = _first_tensor(block(states, attention_mask=None, pmmrec_varlen=call))
    finally:
        config._attn_implementation_internal = previous
    if not call.called:
        raise ValueError(f"token_packing: the text backbone {type(tower.backbone).__name__} does not route its "
                         "attention through transformers' AttentionInterface; run it without token_packing.")
    return states[0]


def packed_item_forward(encoder, packing: TokenPacking, input_ids=None, attention_mask=None, text_features=None,
                        pixel_values=None, vision_features=None, image_mask=None):
    """(item_embeddings, text_embeddings, vision_embeddings) of a multi-modal item encoder on packed tokens."""
    config = encoder.config
    if config.modality != "multimodal":
        raise ValueError(f"token_packing supports multi-modal item encoders only, not modality {config.modality!r}.")
    if text_features is None:
        if input_ids is None:
            raise ValueError("The text tower needs `input_ids` (or `text_features`).")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        text_features = encoder.text_tower.frozen_features({"input_ids": input_ids, "attention_mask": mask})
    else:
        encoder._ensure_stem(encoder.text_tower, text_features, attention_mask)
    n, width = text_features.shape[:2]
    if n != packing.num_items or width != packing.text_width:
        raise ValueError(f"token_packing was planned for {packing.num_items} items x {packing.text_width} text "
                         f"positions, the inputs hold {n} x {width}.")
    text_tokens = encoder.text_projection(_packed_text_tokens(encoder, text_features, packing))  # (Pt, d)
    text_emb = packing.segment_mean(text_tokens, packing.text_token_item, packing.text_count)  # (N, d)
    # (N, V, d); the items without an image skip the tower (zeros), as in the padded path
    vision_tokens = encoder._projected_vision_tokens(pixel_values, vision_features, image_mask)
    if vision_tokens.shape[1] != packing.vision_tokens:
        raise ValueError(f"token_packing was planned for {packing.vision_tokens} image tokens per item, the vision "
                         f"tower gives {vision_tokens.shape[1]}.")
    vision_emb = vision_tokens.mean(1)  # (N, d)
    tokens = torch.cat([text_tokens, vision_tokens.reshape(-1, vision_tokens.shape[-1])])  # (Pf, d)
    for layer in encoder.fusion:
        tokens = layer(tokens, packing.fusion_attention)
    item_emb = packing.segment_mean(tokens, packing.fusion_token_item, packing.fusion_count)  # (N, d)
    return item_emb, text_emb, vision_emb
