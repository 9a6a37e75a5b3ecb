"""Full-ranking evaluation metrics for PMMRec (HR@K, NDCG@K, MRR@K).

Protocol (the PMMRec paper's): full ranking over **all** items, no sampled negatives.

* Every item is embedded once; each user is scored against every item by dot product.
* The user's history items are excluded (their scores count as minus infinity). The target
  itself is never excluded, even when it also occurs in the history.
* ``rank = 1 + #(other items with score > target score) + #(other items with score == target score)``.
  Ties are counted **pessimistically**: a model that gives every item the same score gets the worst
  possible rank, not the best. Excluded (history) items never count.
* ``HR@K = 1[rank <= K]``, ``NDCG@K = 1 / log2(rank + 1) if rank <= K else 0``,
  ``MRR@K = 1 / rank if rank <= K else 0``; every metric is a mean over users.

Scores are computed in chunks of ``chunk_size`` items and batches of ``user_batch_size`` users, so the
peak memory is ``O(user_batch_size * chunk_size)`` instead of ``O(U * I)``. Comparisons with the
target are exact: the bulk of the items is classified from one matmul per chunk, and the few items
whose matmul score is within a rounding-error bound of the target's score are re-scored (together
with the target) in float64 with a fixed summation order. So an item with the same embedding as the
target always ties with it, and ranks do not depend on ``chunk_size``, ``user_batch_size`` or BLAS.

This module only needs ``torch`` and ``numpy``; :func:`load_ranking_metric` imports ``evaluate`` lazily.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_KS",
    "RANKING_METRIC_PATH",
    "evaluate_full_ranking",
    "load_ranking_metric",
    "ranking_metrics_from_ranks",
    "target_ranks",
    "REPEATED_TARGETS",
    "repeated_target_mask",
    "topk_items",
]

DEFAULT_KS: tuple[int, ...] = (10, 20, 50)

#: Folder of the bundled ``evaluate`` metric module (load it with ``evaluate.load(RANKING_METRIC_PATH)``).
RANKING_METRIC_PATH: str = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "evaluate_metrics", "pmmrec_ranking"
)

HistoryLike = torch.Tensor | Sequence[Sequence[int]] | None


# --------------------------------------------------------------------------------------------------
# metrics from ranks
# --------------------------------------------------------------------------------------------------
def _check_ks(ks: Any) -> tuple[int, ...]:
    """Validate ``ks``: a positive int or a non-empty sequence of positive ints. Sorted, deduplicated."""
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    if isinstance(ks, (str, bytes)) or not isinstance(ks, (Sequence, np.ndarray, torch.Tensor)):
        raise ValueError(f"ks must be a positive int or a non-empty sequence of positive ints, got {ks!r}")
    values = list(ks.tolist()) if isinstance(ks, (np.ndarray, torch.Tensor)) else list(ks)
    if not values:
        raise ValueError("ks must not be empty")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"ks must contain only positive ints, got {k!r} in {ks!r}")
    return tuple(sorted({int(k) for k in values}))


def _check_ranks(ranks: Any) -> np.ndarray:
    """Validate ``ranks`` (1-D, non-empty, whole numbers >= 1) and return them as int64 numpy."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    try:
        arr = np.asarray(ranks)
    except (TypeError, ValueError) as exc:  # ragged nested lists and the like
        raise ValueError(f"ranks must be a 1-D sequence of ints >= 1: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("ranks must not be empty")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"ranks must be ints, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("ranks must be whole numbers")
    arr = arr.astype(np.int64)
    if arr.min() < 1:
        raise ValueError(f"ranks must be >= 1, got minimum {int(arr.min())}")
    return arr


def _metrics_from_checked(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    # NOTE: the bundled evaluate module (evaluate_metrics/pmmrec_ranking) repeats this arithmetic
    # line for line; tests check both give identical dicts. Keep them in sync.
    r = ranks.astype(np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(np.mean(hit))
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)))
        out[f"mrr@{k}"] = float(np.mean(np.where(hit, 1.0 / r, 0.0)))
    out["num_users"] = int(ranks.size)
    return out


def ranking_metrics_from_ranks(
    ranks: torch.Tensor | Sequence[int], ks: Sequence[int] | int = DEFAULT_KS
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K (means over users) from each user's 1-based target rank.

    Args:
        ranks: (U,) target rank per user, ints >= 1 (tensor, array or sequence).
        ks: cut-offs; a positive int or a non-empty sequence of positive ints (sorted and deduplicated).

    Returns:
        ``{"hr@K": ..., "ndcg@K": ..., "mrr@K": ... for each K (ascending), "num_users": U}``; the metric
        values are Python floats, ``num_users`` an int.

    Raises:
        ValueError: ``ranks`` empty, not 1-D, not whole numbers or < 1; ``ks`` empty or not positive ints.
    """
    ks_t = _check_ks(ks)
    return _metrics_from_checked(_check_ranks(ranks), ks_t)


# --------------------------------------------------------------------------------------------------
# input checking for the embedding-level functions
# --------------------------------------------------------------------------------------------------
def _check_embeddings(user_embeddings: Any, item_embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(user_embeddings, torch.Tensor):
        raise ValueError(f"user_embeddings must be a torch.Tensor, got {type(user_embeddings).__name__}")
    if not isinstance(item_embeddings, torch.Tensor):
        raise ValueError(f"item_embeddings must be a torch.Tensor, got {type(item_embeddings).__name__}")
    if user_embeddings.dim() != 2:
        raise ValueError(f"user_embeddings must be 2-D (U, d), got shape {tuple(user_embeddings.shape)}")
    if item_embeddings.dim() != 2:
        raise ValueError(f"item_embeddings must be 2-D (I, d), got shape {tuple(item_embeddings.shape)}")
    if not user_embeddings.is_floating_point():
        raise ValueError(f"user_embeddings must be floating point, got {user_embeddings.dtype}")
    if not item_embeddings.is_floating_point():
        raise ValueError(f"item_embeddings must be floating point, got {item_embeddings.dtype}")
    if user_embeddings.shape[1] != item_embeddings.shape[1]:
        raise ValueError(
            "user_embeddings and item_embeddings must have the same embedding size, got "
            f"user_embeddings {tuple(user_embeddings.shape)} and item_embeddings {tuple(item_embeddings.shape)}"
        )
    if item_embeddings.shape[0] == 0:
        raise ValueError("item_embeddings must hold at least one item")
    if not bool(torch.isfinite(user_embeddings).all()):
        raise ValueError("user_embeddings contains NaN or infinite values")
    if not bool(torch.isfinite(item_embeddings).all()):
        raise ValueError("item_embeddings contains NaN or infinite values")
    dtype = torch.promote_types(user_embeddings.dtype, item_embeddings.dtype)
    return user_embeddings.detach().to(dtype), item_embeddings.detach()


def _check_positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _check_targets(targets: Any, num_users: int, num_items: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(targets)
    if t.dim() != 1 or t.shape[0] != num_users:
        raise ValueError(f"targets must have shape ({num_users},) (one per user), got {tuple(t.shape)}")
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise ValueError(f"targets must be integer item ids, got dtype {t.dtype}")
    t = t.to(device=device, dtype=torch.long)
    if num_users and (int(t.min()) < 0 or int(t.max()) >= num_items):
        raise ValueError(
            f"targets must be item ids in [0, {num_items}), got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _check_history(history: HistoryLike, num_users: int, num_items: int, device: torch.device) -> torch.Tensor | None:
    """Return history as a (U, H) long tensor padded with -1 (any negative entry is padding), or None."""
    if history is None:
        return None
    if isinstance(history, torch.Tensor) or isinstance(history, np.ndarray):
        h = torch.as_tensor(history)
        if h.dim() != 2 or h.shape[0] != num_users:
            raise ValueError(f"history must have shape ({num_users}, H), got {tuple(h.shape)}")
        if h.dtype == torch.bool or h.is_floating_point() or h.is_complex():
            raise ValueError(f"history must hold integer item ids, got dtype {h.dtype}")
        h = h.to(device=device, dtype=torch.long)
    else:
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise ValueError(f"history must be a (U, H) tensor or a list of lists, got {type(history).__name__}")
        if len(history) != num_users:
            raise ValueError(f"history must have one row per user ({num_users}), got {len(history)}")
        rows = [
            torch.as_tensor(r.cpu() if isinstance(r, torch.Tensor) else r, dtype=torch.long).reshape(-1)
            for r in history
        ]
        width = max((len(r) for r in rows), default=0)
        h = torch.full((num_users, width), -1, dtype=torch.long)
        for i, row_t in enumerate(rows):
            h[i, : len(row_t)] = row_t
        h = h.to(device)
    h = torch.where(h < 0, torch.full_like(h, -1), h)
    if h.numel() and int(h.max()) >= num_items:
        raise ValueError(f"history must hold item ids < {num_items} (negative = padding), got {int(h.max())}")
    return h


def _mask_history_in_chunk(scores: torch.Tensor, history: torch.Tensor | None, start: int, stop: int) -> None:
    """Set ``scores[b, j - start] = -inf`` for every history item j of user b with start <= j < stop."""
    if history is None or history.numel() == 0:
        return
    sel = (history >= start) & (history < stop)
    rows, cols = sel.nonzero(as_tuple=True)
    if rows.numel():
        scores[rows, history[rows, cols] - start] = float("-inf")


# --------------------------------------------------------------------------------------------------
# ranks and top-k
# --------------------------------------------------------------------------------------------------
def _exact_dot(
    a: torch.Tensor, a_index: torch.Tensor, b: torch.Tensor, b_index: torch.Tensor, max_elements: int = 1 << 22
) -> torch.Tensor:
    """Dot products ``a[a_index[n]] . b[b_index[n]]`` in float64, each summed in one fixed order.

    The products are summed by a fixed pairwise tree made of elementwise additions (no BLAS blocking,
    no fused multiply-add), so each result depends only on the two rows: identical rows always give
    identical scores, whatever batch they are computed in. For float32 (or lower precision) inputs every
    product is exact in float64. Rows are gathered ``max_elements // d`` pairs at a time.
    """
    n, d = a_index.shape[0], a.shape[1]
    out = torch.empty(n, dtype=torch.float64, device=a.device)
    step = max(1, max_elements // max(d, 1))
    for i0 in range(0, n, step):
        p = a[a_index[i0 : i0 + step]].to(torch.float64)
        p *= b[b_index[i0 : i0 + step]].to(torch.float64)
        while p.shape[1] > 1:
            half = p.shape[1] // 2
            q = p[:, :half] + p[:, half : 2 * half]
            if p.shape[1] % 2:
                q[:, :1] += p[:, 2 * half :]
            p = q
        out[i0 : i0 + step] = p[:, 0] if d else 0.0
    return out


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _row_ids(items: torch.Tensor, dtype: torch.dtype, device: torch.device, chunk_size: int) -> torch.Tensor:
    """(I,) long ids such that equal ids imply equal rows (compared as ``dtype`` values).

    Duplicated rows get the smallest index of their group; rows are grouped by a hash of their bits and
    every grouping is verified by an exact comparison (a hash collision only loses the shortcut, never
    correctness). O(I * d) work, chunked.
    """
    num_items, dim = items.shape
    gen = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(-(2**62), 2**62, (dim,), generator=gen, dtype=torch.int64).to(device) | 1
    int_t = _INT_VIEW[torch.empty((), dtype=dtype).element_size()]
    fps = []
    for s in range(0, num_items, chunk_size):
        chunk = items[s : s + chunk_size].to(device=device, dtype=dtype) + 0.0  # -0.0 -> +0.0
        fps.append((chunk.view(int_t).to(torch.int64) * mult).sum(dim=1))  # wraps around: fine for a hash
    fp = torch.cat(fps)
    order = torch.argsort(fp, stable=True)
    fp_sorted = fp[order]
    new_group = torch.ones(num_items, dtype=torch.bool, device=device)
    new_group[1:] = fp_sorted[1:] != fp_sorted[:-1]
    group_first = order[new_group]  # smallest index of each group (stable sort)
    rep = torch.empty(num_items, dtype=torch.long, device=device)
    rep[order] = group_first[torch.cumsum(new_group.long(), 0) - 1]
    ids = torch.arange(num_items, device=device)
    for s in range(0, num_items, chunk_size):
        e = min(s + chunk_size, num_items)
        mine = items[s:e].to(device=device, dtype=dtype)
        theirs = items[rep[s:e].to(items.device)].to(device=device, dtype=dtype)
        equal = (mine == theirs).all(dim=1)
        ids[s:e] = torch.where(equal, rep[s:e], ids[s:e])
    return ids


def _matmul_error_units(dtype: torch.dtype) -> tuple[float, float]:
    """(input rounding, accumulation unit) to assume for a matmul in ``dtype`` (float32 or float64).

    The error of one matmul entry is at most ``(eps_in + d * eps_acc) * sum_i |u_i v_i|`` whatever the
    summation order. ``eps_in`` covers float32 matmuls that round their inputs (TF32, bf16 modes).
    """
    if dtype == torch.float64:
        return 0.0, 2.0**-53
    eps_in = 0.0
    precision = torch.get_float32_matmul_precision()
    if precision == "high":
        eps_in = 2.0**-10  # TF32 inputs (10-bit mantissa), or the more precise bf16x3
    elif precision == "medium":
        eps_in = 2.0**-8  # bf16 inputs
    if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        eps_in = max(eps_in, 2.0**-10)
    return eps_in, 2.0**-24


def _refine_near(
    u: torch.Tensor, chunk: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, t_exact: torch.Tensor,
    user_norm64: torch.Tensor, chunk_norm64: torch.Tensor, factor64: float, count: torch.Tensor,
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify near-tie pairs ``(rows, cols)`` (user row, chunk column) of float32 scores with a float64 matmul.

    For float32 inputs every product is exact in float64, so the matmul score differs from the true dot product by at
    most ``d * 2**-53 * |u| |v|`` and :func:`_exact_dot` by at most ``(log2 d + 1) * 2**-53 * |u| |v|`` (any summation
    order). A pair whose matmul score is more than ``factor64 * |u| |v|`` (twice their sum) above ``t_exact`` has an
    exact score above the target's (counted in ``count``), one that much below has an exact score below it; the
    pairs in between are returned for the exact path. So the count is the same as the exact path's for every pair.
    """
    device = rows.device
    keep = torch.zeros(rows.shape[0], dtype=torch.bool, device=device)
    used = torch.zeros(chunk.shape[0], dtype=torch.bool, device=device)
    used[cols] = True
    col_ids = used.nonzero(as_tuple=True)[0]  # the chunk's columns with a near-tie, in order (no sort needed)
    position = torch.empty(chunk.shape[0], dtype=torch.long, device=device)
    position[col_ids] = torch.arange(col_ids.shape[0], device=device)
    col_pos = position[cols]
    users64 = u.to(torch.float64)
    block = max(1, max_elements // max(u.shape[0], 1))
    single_block = col_ids.shape[0] <= block
    for c0 in range(0, col_ids.shape[0], block):
        if single_block:
            sel = slice(None)
        else:
            sel = ((col_pos >= c0) & (col_pos < c0 + block)).nonzero(as_tuple=True)[0]
        scores = users64 @ chunk[col_ids[c0 : c0 + block]].to(torch.float64).T  # (users, block)
        diff = scores[rows[sel], col_pos[sel] - c0] - t_exact[rows[sel]]
        band = factor64 * user_norm64[rows[sel]] * chunk_norm64[cols[sel]] + 1e-300
        count.index_add_(0, rows[sel], (diff > band).long())
        keep[sel] = diff.abs() <= band
    return rows[keep], cols[keep]


def _refine_near_dense(
    u: torch.Tensor, chunk: torch.Tensor, near: torch.Tensor, t_exact: torch.Tensor, user_norm64: torch.Tensor,
    chunk_norm64: torch.Tensor, factor64: float, count: torch.Tensor, tie: torch.Tensor,
) -> torch.Tensor:
    """:func:`_refine_near` for a chunk where most (user, item) pairs are near-ties: `near` (Ub, C) bool. Exact
    ties (`tie`: the target's own row, or a zero user) count as higher-or-equal; the other near pairs are settled by a
    float64 matmul with the same bound; returns the mask of the pairs it cannot settle (for the exact path)."""
    count += (near & tie).sum(dim=1)
    near &= ~tie
    diff = u.to(torch.float64) @ chunk.to(torch.float64).T
    diff -= t_exact[:, None]
    band = (factor64 * user_norm64)[:, None] * chunk_norm64[None, :] + 1e-300
    count += (near & (diff > band)).sum(dim=1)
    return near & (diff.abs_() <= band)


REPEATED_TARGETS = ("rank", "miss")


def target_ranks(
    user_embeddings: torch.Tensor,
    item_embeddings: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    history: HistoryLike = None,
    chunk_size: int = 65536,
    user_batch_size: int | None = 1024,
    repeated_targets: str = "rank",
) -> torch.Tensor:
    """Pessimistic 1-based rank of each user's target among all items (full ranking, history masked).

    ``rank = 1 + #(score > target score) + #(score == target score)`` over the items other than the
    target that are not in the user's history.

    Exactness: the bulk of the scores comes from one float32 matmul (float64 for float64 input) per
    (user batch, item chunk). Every item whose matmul score lies within twice the worst-case rounding
    error of the target's score (``(eps_in + (d + 4) * eps_acc) * |u| * max |v|`` over the chunk, by
    Cauchy-Schwarz, plus the target's own bound) is re-scored with :func:`_exact_dot` (float64, fixed
    summation order), and so is the target; those are the scores compared. Ties are therefore exact
    ties (an item with the target's embedding always ties) and the ranks do not depend on
    ``chunk_size``, ``user_batch_size``, the device or how the matmul is blocked. Items with the same
    embedding as the target, and users with a zero embedding, skip the re-scoring. TF32/bf16 float32
    matmul modes only widen the band (more re-scoring, same ranks).

    Args:
        user_embeddings: (U, d) float.
        item_embeddings: (I, d) float; row i is item id i. Chunks are moved to the users' device.
        targets: (U,) item ids in [0, I).
        history: items to exclude per user: (U, H) long tensor padded with -1 (any negative entry is
            padding), or a list of U lists of item ids; None = exclude nothing. The target is never
            excluded, even if it appears in the history.
        chunk_size: items scored at once (peak memory O(user_batch_size * chunk_size)).
        user_batch_size: users scored at once (None = all users in one batch).
        repeated_targets: a target that is also in the user's history: ``"rank"`` (default) ranks it like any
            target (the history excludes the other items); ``"miss"`` (the research code's protocol, which
            masks every history item) counts it as a miss: its rank is I + 1, beyond every cut-off.

    Returns:
        (U,) long tensor of ranks (>= 1) on the users' device.
    """
    if repeated_targets not in REPEATED_TARGETS:
        raise ValueError(f"`repeated_targets` must be one of {REPEATED_TARGETS}, got {repeated_targets!r}.")
    users, items = _check_embeddings(user_embeddings, item_embeddings)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    user_batch_size = _check_positive_int(user_batch_size, "user_batch_size", allow_none=True)
    num_users, num_items = users.shape[0], items.shape[0]
    dim = users.shape[1]
    device = users.device
    tgt = _check_targets(targets, num_users, num_items, device)
    hist = _check_history(history, num_users, num_items, device)
    ranks = torch.ones(num_users, dtype=torch.long, device=device)
    if num_users == 0:
        return ranks
    step = user_batch_size or num_users
    # matmuls in float32 (float64 for float64 input): half/bf16 products are exact in float32, and
    # a float32 accumulation keeps the near-tie band (below) narrow
    work = torch.float64 if users.dtype == torch.float64 else torch.float32
    users = users.to(work)
    cmp = work  # dtype of the comparisons
    eps_in, eps_acc = _matmul_error_units(work)
    factor = 2.0 * (eps_in + (dim + 4) * eps_acc)  # twice the worst-case error bound, per |u| |v|
    tiny = (dim + 1) * torch.finfo(work).tiny  # underflow slack
    user_norm64 = torch.linalg.vector_norm(users.to(torch.float64), dim=1)
    item_norm64 = torch.cat(
        [
            torch.linalg.vector_norm(items[s : s + chunk_size].to(device=device, dtype=torch.float64), dim=1)
            for s in range(0, num_items, chunk_size)
        ]
    )
    user_norm, item_norm = user_norm64.to(cmp), item_norm64.to(cmp)

    # shortcuts of the exact path: an item whose row equals the target's row, or a zero user, ties exactly
    row_id = _row_ids(items, work, device, chunk_size)
    # float32 work: near-ties are first re-scored by a float64 matmul (products of float32 values are exact in
    # float64) whose error, plus the exact path's, is far below the float32 band; only the pairs it cannot tell
    # apart from the target go to the exact path, so the ranks are the exact path's (a catalogue of near-equal
    # rows, where most items are near-ties, stays about as fast as random scores)
    refine = work == torch.float32
    factor64 = 2.0 * (dim + math.ceil(math.log2(max(dim, 2))) + 4) * 2.0**-53

    with torch.no_grad():
        for u0 in range(0, num_users, step):
            u = users[u0 : u0 + step]
            t = tgt[u0 : u0 + step]
            h = None if hist is None else hist[u0 : u0 + step]
            row = torch.arange(u.shape[0], device=device)
            t_row_id = row_id[t]
            zero_user = user_norm[u0 : u0 + step] == 0
            t_rows = items[t.to(items.device)].to(device=device, dtype=work)
            t_exact = _exact_dot(u, row, t_rows, row)  # (Ub,) float64
            t_cmp = t_exact.to(cmp)
            u_tol = factor * user_norm[u0 : u0 + step]
            t_band = u_tol * item_norm[t] + tiny  # covers the target's own rounding
            count = torch.zeros(u.shape[0], dtype=torch.long, device=device)
            for s in range(0, num_items, chunk_size):
                e = min(s + chunk_size, num_items)
                chunk = items[s:e].to(device=device, dtype=work)
                diff = (u @ chunk.T).to(cmp)
                diff -= t_cmp[:, None]
                # history -> -inf (the target is handled through t_exact, never masked) ...
                _mask_history_in_chunk(diff, h, s, e)
                own = (t >= s) & (t < e)  # ... and the target's own column is not an "other item"
                if bool(own.any()):
                    diff[row[own], t[own] - s] = float("-inf")
                # one bound per user for the whole chunk (the largest item norm in it): looser than a
                # per-item bound, which only sends a few more items to the exact path
                band = (u_tol * item_norm[s:e].max() + t_band)[:, None]
                count += (diff > band).sum(dim=1)  # certainly higher than the target
                near = diff.abs_() <= band  # (-inf -> +inf: never near)
                del diff
                if refine and int(near.sum()) * 8 > near.numel():
                    # most of the chunk is a near-tie (near-equal rows): settle it densely, one float64 matmul and
                    # whole-matrix comparisons, instead of gathering every pair (same decisions as _refine_near)
                    near = _refine_near_dense(u, chunk, near, t_exact, user_norm64[u0 : u0 + step],
                                              item_norm64[s:e], factor64, count,
                                              (row_id[s:e][None, :] == t_row_id[:, None]) | zero_user[:, None])
                rows, cols = near.nonzero(as_tuple=True)
                del near
                if rows.numel():
                    tie = (row_id[s + cols] == t_row_id[rows]) | zero_user[rows]
                    count.index_add_(0, rows[tie], torch.ones_like(rows[tie]))
                    rows, cols = rows[~tie], cols[~tie]
                if rows.numel() and refine:  # near-ties: a float64 matmul settles all but the (near-)exact ones
                    rows, cols = _refine_near(u, chunk, rows, cols, t_exact, user_norm64[u0 : u0 + step],
                                              item_norm64[s:e], factor64, count)
                if rows.numel():  # the cost grows with the number of near-ties left
                    exact = _exact_dot(u, rows, chunk, cols)
                    count.index_add_(0, rows, (exact >= t_exact[rows]).long())
            ranks[u0 : u0 + step] = 1 + count
    if repeated_targets == "miss" and hist is not None:
        ranks = torch.where(repeated_target_mask(tgt, hist), torch.full_like(ranks, num_items + 1), ranks)
    return ranks


def repeated_target_mask(targets: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """(U,) bool: whether each user's target is also in its history ((U, H) padded with negatives)."""
    if history.numel() == 0:
        return torch.zeros(targets.shape[0], dtype=torch.bool, device=targets.device)
    return (history == targets[:, None]).any(1)


def topk_items(
    user_embeddings: torch.Tensor,
    item_embeddings: torch.Tensor,
    k: int,
    history: HistoryLike = None,
    chunk_size: int = 65536,
    user_batch_size: int | None = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items per user by dot-product score, history items excluded, computed chunk by chunk.

    Each chunk's top-k is merged with the running top-k, so peak memory is O(user batch * (chunk + k)).
    The result equals ``torch.topk(user_embeddings @ item_embeddings.T with history set to -inf, k)``;
    among equal scores the order (and, at the k-th place, the choice) of items is unspecified.
    Excluded items have score -inf and only show up when fewer than ``k`` items are left.

    Args:
        user_embeddings: (U, d) float.
        item_embeddings: (I, d) float.
        k: number of items to return, 1 <= k <= I.
        history: as in :func:`target_ranks` (all of it is excluded; there is no target here).
        chunk_size: items scored at once.
        user_batch_size: users scored at once (None = all users).

    Returns:
        ``(scores, indices)``: (U, k) float and (U, k) long, sorted by descending score.
    """
    users, items = _check_embeddings(user_embeddings, item_embeddings)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    user_batch_size = _check_positive_int(user_batch_size, "user_batch_size", allow_none=True)
    num_users, num_items = users.shape[0], items.shape[0]
    k = _check_positive_int(k, "k")
    if k > num_items:
        raise ValueError(f"k must be <= the number of items ({num_items}), got {k}")
    device = users.device
    hist = _check_history(history, num_users, num_items, device)
    out_scores = torch.empty(num_users, k, dtype=users.dtype, device=device)
    out_idx = torch.empty(num_users, k, dtype=torch.long, device=device)
    step = user_batch_size or max(num_users, 1)

    with torch.no_grad():
        for u0 in range(0, num_users, step):
            u = users[u0 : u0 + step]
            h = None if hist is None else hist[u0 : u0 + step]
            best_s = torch.empty(u.shape[0], 0, dtype=u.dtype, device=device)
            best_i = torch.empty(u.shape[0], 0, dtype=torch.long, device=device)
            for s in range(0, num_items, chunk_size):
                e = min(s + chunk_size, num_items)
                scores = u @ items[s:e].to(device=device, dtype=u.dtype).T
                _mask_history_in_chunk(scores, h, s, e)
                cs, ci = torch.topk(scores, min(k, e - s), dim=1)
                merged_s = torch.cat([best_s, cs], dim=1)
                merged_i = torch.cat([best_i, ci + s], dim=1)
                kk = min(k, merged_s.shape[1])
                best_s, pos = torch.topk(merged_s, kk, dim=1)
                best_i = torch.gather(merged_i, 1, pos)
            out_scores[u0 : u0 + step] = best_s
            out_idx[u0 : u0 + step] = best_i
    return out_scores, out_idx


def evaluate_full_ranking(
    user_embeddings: torch.Tensor,
    item_embeddings: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    history: HistoryLike = None,
    ks: Sequence[int] | int = DEFAULT_KS,
    chunk_size: int = 65536,
    user_batch_size: int | None = 1024,
    repeated_targets: str = "rank",
) -> dict[str, float]:
    """Full-ranking evaluation: :func:`target_ranks` then :func:`ranking_metrics_from_ranks`
    (`repeated_targets`: see :func:`target_ranks`).

    Returns ``{"hr@K", "ndcg@K", "mrr@K" for each K, "num_users"}``.
    """
    ks_t = _check_ks(ks)  # fail before the expensive part
    if isinstance(user_embeddings, torch.Tensor) and user_embeddings.dim() == 2 and user_embeddings.shape[0] == 0:
        raise ValueError("user_embeddings must hold at least one user")
    ranks = target_ranks(
        user_embeddings, item_embeddings, targets, history, chunk_size=chunk_size, user_batch_size=user_batch_size,
        repeated_targets=repeated_targets,
    )
    return ranking_metrics_from_ranks(ranks, ks_t)


def load_ranking_metric(**load_kwargs: Any):
    """``evaluate.load`` the bundled ``pmmrec_ranking`` metric (offline; extra kwargs go to ``evaluate.load``).

    Usage: ``load_ranking_metric().compute(predictions=ranks, ks=[10, 20, 50])``.
    """
    import evaluate  # lazy: pmmrec_hf.metrics must import without evaluate installed

    return evaluate.load(RANKING_METRIC_PATH, **load_kwargs)
