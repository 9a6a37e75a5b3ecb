"""Sequence corruption for NID (noised item detection) and RCL (robustness-aware contrastive learning).

See ``docs/formats.md`` (``corrupted_index`` / ``noise_labels``) and the reference, section 2.
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "corrupt_sequences"]

IGNORE_INDEX = -100  # label at padding positions (ignored by the NID loss)


def _check_probability(name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
    if not ok:
        raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}.")
    return float(value)


def _uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float64 draws made on the generator's device, moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float64).to(device)


def corrupt_sequences(
    item_index: torch.Tensor,
    num_items: int,
    replace_prob: float = 0.1,
    shuffle_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt left-padded sequences of batch-item indices; return ``(corrupted_index, noise_labels)``.

    Args:
        item_index: (B, L) long, indices into the batch's N distinct items, left-padded with -1 (the
            real part of each row is contiguous and ends in the last column).
        num_items: N, the number of distinct items of the batch.
        replace_prob: each real position is, with this probability, replaced by a uniformly drawn
            *different* item of the batch (an index in ``0..N-1`` other than the current one). With
            ``N == 1`` nothing can be replaced.
        shuffle_prob: with this probability per sequence (with at least 2 real positions), a random
            contiguous span of the real part is permuted: span length uniform in ``[2, n]`` (n = real
            length), start uniform among the valid starts, and a uniformly random permutation of the
            span that is not the identity (when the draw is the identity, the span is rotated by one).
            Applied after the replacement.
        generator: a ``torch.Generator`` for reproducibility (same seed, same result); random numbers
            are drawn on its device and moved to ``item_index``'s device. ``None`` uses the global RNG.

    Returns:
        ``corrupted_index`` (B, L) long, -1 kept at padding, and ``noise_labels`` (B, L) long: 1 where the
        final index differs from the original, 0 where it is equal (a shuffle that swaps two occurrences of
        the same item leaves label 0), -100 at padding.

    The computation is vectorised over the whole batch (no Python loop over rows or positions). The same
    number of random values is always drawn, whatever the probabilities, so a seeded generator gives
    results that depend only on the seed and the input shape.
    """
    replace_prob = _check_probability("replace_prob", replace_prob)
    shuffle_prob = _check_probability("shuffle_prob", shuffle_prob)
    if not isinstance(item_index, torch.Tensor) or item_index.dim() != 2:
        raise ValueError("`item_index` must be a 2-D (batch, length) tensor.")
    if item_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"`item_index` must be an integer tensor, got {item_index.dtype}.")
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise ValueError(f"`num_items` must be a non-negative integer, got {num_items!r}.")
    item_index = item_index.long()
    real = item_index >= 0
    if bool((item_index >= num_items).any()):
        raise ValueError(f"`item_index` holds values >= num_items ({num_items}).")
    batch, length = item_index.shape
    device = item_index.device
    if batch == 0 or length == 0:
        return item_index.clone(), torch.full_like(item_index, IGNORE_INDEX)

    # draw everything up front, in a fixed order
    u_replace = _uniform((batch, length), generator, device)
    u_choice = _uniform((batch, length), generator, device)
    u_shuffle = _uniform((batch,), generator, device)
    u_span_len = _uniform((batch,), generator, device)
    u_span_start = _uniform((batch,), generator, device)
    u_perm = _uniform((batch, length), generator, device)

    # (a) replacement by a different item: draw in 0..N-2 and skip the current index
    corrupted = item_index.clone()
    if num_items > 1:
        replace = real & (u_replace < replace_prob)
        choice = (u_choice * (num_items - 1)).long().clamp_(max=num_items - 2)
        choice = choice + (choice >= item_index).long()
        corrupted = torch.where(replace, choice, corrupted)

    # (b) span shuffle, as one stable sort of per-position keys:
    # positions outside the span keep key = column; span positions get key = span_start + u in
    # [span_start, span_start + 1), so they stay inside the span and are randomly permuted there.
    n_real = real.sum(dim=1)  # (B,)
    do_shuffle = (u_shuffle < shuffle_prob) & (n_real >= 2)
    span_len = 2 + (u_span_len * (n_real - 1).clamp(min=1).double()).long()
    span_len = torch.minimum(span_len, n_real.clamp(min=2))
    start_in_real = (u_span_start * (n_real - span_len + 1).clamp(min=1).double()).long()
    start_in_real = torch.minimum(start_in_real, (n_real - span_len).clamp(min=0))
    span_start = (length - n_real) + start_in_real  # column of the first span element
    cols = torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
    in_span = do_shuffle.unsqueeze(1) & (cols >= span_start.unsqueeze(1)) & (cols < (span_start + span_len).unsqueeze(1))
    base = cols.double()
    keys = torch.where(in_span, span_start.unsqueeze(1).double() + u_perm, base)
    perm = torch.sort(keys, dim=1, stable=True).indices
    # a permutation that is the identity on a span: rotate that span by one instead
    identity = (perm == cols).all(dim=1) & do_shuffle
    rotated = torch.where(
        in_span,
        span_start.unsqueeze(1) + (cols - span_start.unsqueeze(1) + 1) % span_len.unsqueeze(1),
        cols,
    )
    perm = torch.where(identity.unsqueeze(1), rotated, perm)
    corrupted = corrupted.gather(1, perm)

    labels = (corrupted != item_index).long()
    labels = labels.masked_fill(~real, IGNORE_INDEX)
    corrupted = corrupted.masked_fill(~real, -1)
    return corrupted, labels
