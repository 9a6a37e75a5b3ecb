"""Work split over processes so that N processes compute exactly what one process computes.

Evaluation and catalogue embedding run in fixed batches. Under Accelerate with N processes, batch ``k`` goes
to process ``k % N``; every process runs its batches exactly as a single process would run them (same
rows, same shapes, so the same floating-point results), and :func:`gather_batches` puts the results of all
processes back in batch order. Metrics computed from the gathered values are therefore identical to the
single-process metrics, not merely close.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["batch_ranges", "gather_batches", "map_batches"]


def batch_ranges(count: int, batch_size: int) -> list[range]:
    """The row ranges of `count` rows cut into batches of `batch_size` (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _processes(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def gather_batches(local: torch.Tensor, count: int, batch_size: int, accelerator=None) -> torch.Tensor:
    """Reassemble per-process results in row order.

    `local` holds the rows of this process's batches (batch k on process k % N) concatenated, on the accelerator's
    device; returns all `count` rows, in order, on every process (a tensor collective: every process must
    call it). With one process (or none) returns `local`.
    """
    rank, world = _processes(accelerator)
    if world == 1:
        return local
    batches = batch_ranges(count, batch_size)
    sizes = [sum(len(b) for b in batches[r::world]) for r in range(world)]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"process {rank} holds {local.shape[0]} rows, its batches have {sizes[rank]}.")
    width = max(sizes)
    padded = torch.cat([local, local.new_zeros((width - local.shape[0], *local.shape[1:]))]) if width > local.shape[0] \
        else local
    gathered = accelerator.gather(padded.contiguous())  # (world * width, ...)
    pieces: list[torch.Tensor | None] = [None] * len(batches)
    for r in range(world):
        offset = r * width
        for k in range(r, len(batches), world):
            size = len(batches[k])
            pieces[k] = gathered[offset : offset + size]
            offset += size
    return torch.cat(pieces) if pieces else local


def map_batches(fn: Callable[[range], torch.Tensor], count: int, batch_size: int, accelerator=None,
                empty: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> torch.Tensor:
    """``cat([fn(b) for b in batches])`` computed with the batches spread over processes: each process runs
    ``fn`` on its own batches and the results are gathered in order (every process gets every row).

    `empty` / `dtype`: the trailing shape and dtype of one row, for a process that has no batch (fewer batches
    than processes); without `empty`, every process then computes every batch itself (same result, no split)."""
    rank, world = _processes(accelerator)
    batches = batch_ranges(count, batch_size)
    if world > 1 and len(batches) < world and empty is None:
        world = 1  # fewer batches than processes and no row shape to pad with: everyone does everything
    if world == 1:
        outputs = [fn(b) for b in batches]
        if not outputs:
            return torch.zeros((0, *(empty or ())), dtype=dtype, device=device)
        return torch.cat(outputs)
    mine = batches[rank::world]
    outputs = [fn(b) for b in mine]
    if outputs:
        local = torch.cat(outputs)
    else:
        local = torch.zeros((0, *empty), dtype=dtype, device=device or accelerator.device)
    return gather_batches(local.to(accelerator.device), count, batch_size, accelerator)
