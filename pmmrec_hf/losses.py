"""PMMRec training objectives as pure functions on embeddings, indices and masks.

Shapes: B users, S sequence slots (left-padded, -1 = padding), N distinct items of this process's
batch, C candidate items (N, or the items of every process when negatives are gathered), P real
(input, target) positions, A real item positions (anchors), d / p feature sizes.

This file travels with Hub checkpoints (``trust_remote_code``): it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "first_occurrence_index",
    "first_occurrence_index_sorted",
    "gather_across_processes",
    "distributed_mean",
    "next_item_loss",
    "nicl_loss",
    "nid_loss",
    "rcl_loss",
    "rows_of_ids",
    "similarity_logits",
]


def first_occurrence_index(ids: torch.Tensor) -> torch.Tensor:
    """For every element, the index of the first element with the same id. ids: (C,) -> (C,) long."""
    count = ids.shape[0]
    _, inverse = torch.unique(ids, return_inverse=True)  # (C,)
    positions = torch.arange(count, device=ids.device)  # (C,)
    first = torch.full((int(inverse.max()) + 1 if count else 0,), count, dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # (G,)
    return first[inverse]  # (C,)


def first_occurrence_index_sorted(ids: torch.Tensor) -> torch.Tensor:
    """`first_occurrence_index` without `torch.unique` (a device-to-host sync for its output size): a stable
    sort puts equal ids next to each other, first occurrence first. The same integers. ids: (C,) -> (C,) long."""
    count = ids.shape[0]
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=ids.device)
    sorted_ids, order = torch.sort(ids, stable=True)  # (C,), (C,)
    positions = torch.arange(count, device=ids.device)  # (C,)
    starts = torch.ones(count, dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]  # (C,) first element of each run of equal ids
    run_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(0).values  # (C,)
    first = torch.empty_like(order)
    first[order] = order[run_start]
    return first  # (C,)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def gather_across_processes(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate a tensor's rows over all processes, keeping gradients for this process's rows.

    Rows are padded to the largest count so processes may hold different numbers of rows.
    Returns (gathered (W * M, ...), valid (W * M,) bool, offset of this process's first row).
    Without an initialised process group (or with one process) returns the tensor itself.
    """
    rows = tensor.shape[0]
    if not _distributed():
        return tensor, torch.ones(rows, dtype=torch.bool, device=tensor.device), 0
    import torch.distributed.nn.functional as dist_fn

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    torch.distributed.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=tensor.device))
    counts = [int(c.item()) for c in counts]
    width = max(counts)
    padded = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, width - rows])  # (M, ...)
    gathered = torch.cat(dist_fn.all_gather(padded), dim=0)  # (W * M, ...)
    valid = torch.cat(
        [torch.arange(width, device=tensor.device) < count for count in counts]
    )  # (W * M,)
    return gathered, valid, rank * width


def distributed_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Turn this process's loss sum into its share of the global mean.

    With W processes, returns total * W / global_count, so that averaging gradients over processes (DDP)
    gives the gradient of the mean over all processes' examples, and the mean of the returned values over
    processes equals that global mean. With one process: total / count.
    """
    count = count.detach().to(total.dtype)
    if not _distributed():
        return total / count.clamp(min=1)
    global_count = count.clone()
    torch.distributed.all_reduce(global_count)
    return total * torch.distributed.get_world_size() / global_count.clamp(min=1)


def _user_item_ids(item_index: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """Item id of every sequence slot, -1 at padding. item_index: (B, S) -> (B, S)."""
    ids = item_ids[item_index.clamp(min=0)]  # (B, S)
    return torch.where(item_index >= 0, ids, torch.full_like(ids, -1))  # (B, S)


def next_item_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    query_users: torch.Tensor,
    user_item_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_log_q: torch.Tensor | None = None,
    candidate_valid: torch.Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
    sync_free: bool = False,
) -> torch.Tensor:
    """In-batch softmax next-item loss over every real position ("all-action").

    Args:
        query: (P, d) user states at real input positions whose next item is real.
        candidates: (C, d) embeddings of the candidate items.
        targets: (P,) index of each position's next item among the candidates.
        query_users: (P,) which user (row of `user_item_ids`) each position belongs to.
        user_item_ids: (B, S) item ids of every user's whole sequence, -1 at padding.
        candidate_ids: (C,) item ids of the candidates.
        candidate_log_q: (C,) optional log popularity, subtracted from the logits (log-q correction).
        candidate_valid: (C,) optional mask of real candidates (False for padding rows of a gather).
        reduction: "mean" or "sum" over positions, or "none" (the (P,) per-position losses).
        sync_free: group the candidate ids by sorting instead of `torch.unique` (no device-to-host sync; the
            same integers, so the same loss).
        temperature: logits are ``query @ candidates.T / temperature`` (1.0: the research code's raw dot
            products; with L2-normalised query and candidates, a cosine softmax at that temperature).

    Candidates are masked out for a position when their id occurs anywhere in the position's user's
    sequence (false negatives) unless they are that position's positive; duplicate candidates (the same id
    more than once) count once: every copy after the first is masked and the positive is mapped to the
    first copy, so the loss does not depend on how the batch was split into distinct items.
    """
    columns = torch.arange(candidate_ids.shape[0], device=candidate_ids.device)  # (C,)
    # padding rows of a gather must never be the "first copy" of a real id (they become unique negatives)
    candidate_ids = _unique_ids_at_padding(candidate_ids, candidate_valid)  # (C,)
    canonical = (first_occurrence_index_sorted if sync_free else first_occurrence_index)(candidate_ids)  # (C,)
    is_first = canonical == columns  # (C,)
    if candidate_valid is not None:
        is_first = is_first & candidate_valid
    target_canonical = canonical[targets]  # (P,)
    logits = similarity_logits(query, candidates, temperature)  # (P, C) fp32
    if candidate_log_q is not None:
        logits = logits - candidate_log_q.float()[None, :]  # (P, C)
    in_sequence = (candidate_ids[None, :, None] == user_item_ids[:, None, :]).any(-1)  # (B, C)
    false_negative = in_sequence[query_users]  # (P, C)
    is_target = columns[None, :] == target_canonical[:, None]  # (P, C)
    masked = (false_negative & ~is_target) | ~is_first[None, :]  # (P, C)
    logits = logits.masked_fill(masked, torch.finfo(logits.dtype).min)  # (P, C)
    losses = F.cross_entropy(logits, target_canonical, reduction="none")  # (P,)
    return _reduce(losses, reduction)


def _unique_ids_at_padding(ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`ids` (C,) with every invalid row (False in `valid`, e.g. the padding of a gather) given an id of its own,
    below every id in `ids`, so that no invalid row ever matches a real id (or another invalid row)."""
    if valid is None or ids.numel() == 0:
        return ids
    columns = torch.arange(ids.shape[0], device=ids.device)
    return torch.where(valid, ids, ids.min() - 1 - columns)


def similarity_logits(query: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``query @ keys.T / temperature`` in float32, also under autocast (bf16/fp16 logits of a softmax over
    thousands of candidates lose the differences that matter). query: (P, d), keys: (C, d) -> (P, C) fp32."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        logits = query.float() @ keys.float().t()  # (P, C)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def nicl_loss(
    text_features: torch.Tensor,
    vision_features: torch.Tensor,
    item_index: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float = 0.1,
    candidate_text: torch.Tensor | None = None,
    candidate_vision: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    candidate_is_local: torch.Tensor | None = None,
    candidate_valid: torch.Tensor | None = None,
    reduction: str = "mean",
    item_has_image: torch.Tensor | None = None,
    candidate_has_image: torch.Tensor | None = None,
    return_count: bool = False,
    sync_free: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NICL: next-item enhanced cross-modal contrastive loss (the design adopted in the reference).

    Args:
        text_features, vision_features: (N, p) L2-normalised per-modality features of the N distinct items.
        item_index: (B, S) sequences as indices into the N items, -1 at padding (left-padded).
        item_ids: (N,) item ids.
        temperature: softmax temperature.
        candidate_text, candidate_vision, candidate_ids: (C, p), (C, p), (C,) negatives pool; defaults to the
            local items. When gathered across processes, local rows must come first at their local indices
            or be flagged by `candidate_is_local`.
        candidate_is_local: (C,) bool, True for candidates that are this process's item of the same index
            (index c < N); remote candidates belong to other users by construction.
        candidate_valid: (C,) bool, False for padding rows of a gather.
        reduction: "mean" over anchors, or "sum" (for a mean over every process's anchors).
        item_has_image: (N,) bool, False for items without a real image (their `vision_features` are a
            placeholder's): such an image is never an anchor, a positive or a negative. Default: all True.
        candidate_has_image: (C,) bool, the same for the candidates (default: `item_has_image` for a local pool,
            all True for a given one).
        return_count: also return the number of anchors that took part (for a mean over processes).
        sync_free: static shapes, no device-to-host sync: every slot of `item_index` is an anchor, the padding
            ones masked out of the sums (instead of selected with `nonzero`), and ids grouped by sorting instead
            of `torch.unique`. The same loss up to float summation order.

    Anchor t(u,l) for every real item; positives: its own image v(u,l) and, when l+1 is real, the next
    item's text t(u,l+1) and image v(u,l+1). Negatives: text and image features of other users' items whose
    id differs from every positive's id, each distinct id once. Per-positive InfoNCE averaged over the
    anchor's positives, then over anchors; the symmetric direction (image anchor) likewise; the mean of the
    two directions. With items lacking an image, each anchor averages the directions it has (the image
    anchor needs its own image; the text anchor needs one valid positive), anchors with none are left out, and
    the mean runs over the anchors that took part.
    """
    num_items = text_features.shape[0]
    device = item_ids.device
    has_image = (torch.ones(num_items, dtype=torch.bool, device=device) if item_has_image is None
                 else item_has_image.to(device=device, dtype=torch.bool))
    if candidate_text is None:
        candidate_text, candidate_vision, candidate_ids = text_features, vision_features, item_ids
        candidate_is_local = torch.ones(num_items, dtype=torch.bool, device=item_ids.device)
        if candidate_has_image is None:
            candidate_has_image = has_image
    num_candidates = candidate_ids.shape[0]
    if candidate_valid is None:
        candidate_valid = torch.ones(num_candidates, dtype=torch.bool, device=device)
    if candidate_has_image is None:
        candidate_has_image = torch.ones(num_candidates, dtype=torch.bool, device=device)
    candidate_has_image = candidate_has_image.to(device=device, dtype=torch.bool)

    batch, slots = item_index.shape
    real = item_index >= 0  # (B, S)
    # which local items each user holds
    occurrence = torch.zeros(batch, num_items, dtype=torch.bool, device=device)  # (B, N)
    occurrence[torch.arange(batch, device=device)[:, None].expand_as(item_index)[real], item_index[real]] = True
    holders = occurrence.sum(0)  # (N,)
    local_col = torch.arange(num_candidates, device=device).clamp(max=max(num_items - 1, 0))  # (C,)
    held_by_other = (holders[local_col][None, :] - occurrence[:, local_col].long()) > 0  # (B, C)
    eligible = torch.where(candidate_is_local[None, :], held_by_other, torch.ones_like(held_by_other))  # (B, C)
    eligible = eligible & candidate_valid[None, :]  # (B, C)
    # keep one eligible copy per (user, id)
    columns = torch.arange(num_candidates, device=device)  # (C,)
    if sync_free:  # group label = first occurrence of the id (< C): no unique, no max read back
        group = first_occurrence_index_sorted(candidate_ids)  # (C,)
        groups = num_candidates
    else:
        _, group = torch.unique(candidate_ids, return_inverse=True)  # (C,)
        groups = int(group.max()) + 1
    first = torch.full((batch, groups), num_candidates, dtype=torch.long, device=device)
    first = first.scatter_reduce(
        1, group[None, :].expand(batch, -1), torch.where(eligible, columns[None, :], num_candidates), reduce="amin"
    )  # (B, G)
    keep = eligible & (first.gather(1, group[None, :].expand(batch, -1)) == columns[None, :])  # (B, C)

    # anchors: every real position; next item where the next slot is real
    if sync_free:  # every slot is an anchor (A = B * S), the padding ones masked below
        anchor_user = torch.arange(batch, device=device).repeat_interleave(slots)  # (A,)
        anchor_slot = torch.arange(slots, device=device).repeat(batch)  # (A,)
        anchor_real = real.reshape(-1)  # (A,)
    else:
        anchor_user, anchor_slot = real.nonzero(as_tuple=True)  # (A,), (A,)
        anchor_real = None
    anchor_item = item_index[anchor_user, anchor_slot].clamp(min=0)  # (A,)
    next_slot = (anchor_slot + 1).clamp(max=slots - 1)  # (A,)
    next_item = item_index[anchor_user, next_slot]  # (A,)
    has_next = (anchor_slot + 1 < slots) & (next_item >= 0)  # (A,)
    next_item = torch.where(has_next, next_item, anchor_item)  # (A,)
    anchor_id, next_id = item_ids[anchor_item], item_ids[next_item]  # (A,), (A,)
    negative = keep[anchor_user] & (candidate_ids[None, :] != anchor_id[:, None]) & (
        candidate_ids[None, :] != next_id[:, None]
    )  # (A, C)
    own_image, next_image = has_image[anchor_item], has_next & has_image[next_item]  # (A,), (A,)
    # positives: [the anchor's other modality, the next item's text, the next item's image]
    text_valid = torch.stack([own_image, has_next, next_image], dim=1)  # (A, 3) text anchor: own image first
    image_valid = torch.stack([own_image, has_next & own_image, next_image & own_image], dim=1)  # (A, 3)
    negative_columns = torch.cat([negative, negative & candidate_has_image[None, :]], dim=1)  # (A, 2C)

    def direction(anchor_feats: torch.Tensor, own_other: torch.Tensor, pos_valid: torch.Tensor) -> torch.Tensor:
        # anchor_feats: (A, p); own_other: (A, p) the anchor item's other modality
        positives = torch.stack(
            [own_other, text_features[next_item], vision_features[next_item]], dim=1
        )  # (A, 3, p)
        pos_logits = (positives.float() * anchor_feats.float()[:, None, :]).sum(-1) / temperature  # (A, 3)
        neg_logits = torch.cat([similarity_logits(anchor_feats, candidate_text, temperature),
                                similarity_logits(anchor_feats, candidate_vision, temperature)], 1)  # (A, 2C)
        neg_logits = neg_logits.masked_fill(~negative_columns, float("-inf"))  # (A, 2C)
        neg_lse = torch.logsumexp(neg_logits, dim=1)  # (A,)
        per_positive = torch.logaddexp(pos_logits, neg_lse[:, None]) - pos_logits  # (A, 3)
        per_positive = per_positive.masked_fill(~pos_valid, 0.0)  # (A, 3)
        return per_positive.sum(1) / pos_valid.sum(1).clamp(min=1)  # (A,)

    text_anchor = text_features[anchor_item]  # (A, p)
    vision_anchor = vision_features[anchor_item]  # (A, p)
    # for the text anchor the first positive is the own image; for the image anchor, the own text
    uses_text_anchor = text_valid.any(1)  # (A,)
    uses_image_anchor = own_image  # (A,)
    if anchor_real is not None:
        uses_text_anchor, uses_image_anchor = uses_text_anchor & anchor_real, uses_image_anchor & anchor_real
    directions = uses_text_anchor.float() + uses_image_anchor.float()  # (A,)
    summed = (direction(text_anchor, vision_anchor, text_valid) * uses_text_anchor
              + direction(vision_anchor, text_anchor, image_valid) * uses_image_anchor)  # (A,)
    taking_part = directions > 0
    if sync_free:
        per_anchor = torch.where(taking_part, summed / directions.clamp(min=1), torch.zeros_like(summed))  # (A,)
        reduced = per_anchor.sum()
        if reduction == "mean":
            reduced = reduced / taking_part.sum().clamp(min=1)
        elif reduction != "sum":
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    else:
        per_anchor = summed[taking_part] / directions[taking_part]  # (A',)
        reduced = _reduce(per_anchor, reduction)
    if return_count:
        return reduced, taking_part.sum()
    return reduced


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean() if values.numel() else values.sum()
    raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")


def nid_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """NID: binary cross-entropy of "changed vs original" over real positions.

    logits: (B, L) per-position scores on the corrupted sequence; labels: (B, L) 1 changed, 0 original,
    -100 padding (ignored). Mean (or sum) over real positions.
    """
    real = labels != -100  # (B, L)
    losses = F.binary_cross_entropy_with_logits(logits[real].float(), labels[real].float(), reduction="none")  # (R,)
    return _reduce(losses, reduction)


def rcl_loss(
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    temperature: float = 0.1,
    all_clean: torch.Tensor | None = None,
    all_corrupted: torch.Tensor | None = None,
    offset: int = 0,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """RCL: symmetric InfoNCE between clean and corrupted user representations.

    clean, corrupted: (B, d) representations of the same users; all_clean / all_corrupted: (M, d)
    the pools of every process (defaults to the local ones), where this process's users sit at rows
    offset..offset+B-1; valid: (M,) False for rows that take no part (padding rows of a gather, users
    without a real input position); with one process and no pools, (B,). Cosine similarity / temperature;
    the other valid users are the negatives. Mean of both directions; mean (or sum) over this process's
    valid users (a user whose row is not valid is neither an anchor nor a negative).
    """
    clean_n = F.normalize(clean, dim=-1)  # (B, d)
    corrupted_n = F.normalize(corrupted, dim=-1)  # (B, d)
    pool_clean = F.normalize(all_clean, dim=-1) if all_clean is not None else clean_n  # (M, d)
    pool_corrupted = F.normalize(all_corrupted, dim=-1) if all_corrupted is not None else corrupted_n  # (M, d)
    targets = torch.arange(clean.shape[0], device=clean.device) + offset  # (B,)
    logits_a = similarity_logits(clean_n, pool_corrupted, temperature)  # (B, M)
    logits_b = similarity_logits(corrupted_n, pool_clean, temperature)  # (B, M)
    anchor = torch.ones(clean.shape[0], dtype=torch.bool, device=clean.device)  # (B,)
    if valid is not None:
        logits_a = logits_a.masked_fill(~valid[None, :], float("-inf"))
        logits_b = logits_b.masked_fill(~valid[None, :], float("-inf"))
        anchor = valid[targets]
        # an invalid anchor's own column is -inf: point it at any finite column, its loss is dropped below
        targets = torch.where(anchor, targets, valid.float().argmax())
    per_user = (
        F.cross_entropy(logits_a, targets, reduction="none")
        + F.cross_entropy(logits_b, targets, reduction="none")
    ) / 2  # (B,)
    return _reduce(per_user[anchor], reduction)


def rows_of_ids(ids: torch.Tensor, pool_ids: torch.Tensor, pool_valid: torch.Tensor | None = None) -> torch.Tensor:
    """For every id of `ids` (any shape, -1 = padding), the first valid row of `pool_ids` (C,) holding it;
    -1 stays -1. Raises a ValueError naming the ids that are not in the pool."""
    keys = _unique_ids_at_padding(pool_ids, pool_valid)  # (C,) invalid rows match no real id
    order = torch.sort(keys, stable=True).indices  # equal ids keep row order: the first row comes first
    sorted_keys = keys[order]
    flat = ids.reshape(-1)
    real = flat >= 0
    position = torch.searchsorted(sorted_keys, flat).clamp(max=max(keys.shape[0] - 1, 0))
    found = (sorted_keys[position] == flat) if keys.numel() else torch.zeros_like(real)
    missing = real & ~found
    if bool(missing.any()):
        raise ValueError(
            f"ids {sorted(set(flat[missing].tolist()))[:10]} are not among the batch's items (`item_ids`): "
            "corrupted sequences may only use items of the batch (of any process, when negatives are gathered)."
        )
    rows = torch.where(real, order[position], torch.full_like(flat, -1))
    return rows.reshape(ids.shape)
