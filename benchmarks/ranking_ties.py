#!/usr/bin/env python
"""Full ranking with near-tied scores vs random scores (issue 12, requirement 6: within 2x).

A catalogue of near-equal rows (one vector plus a tiny per-item perturbation) puts most items within the float32
rounding band of every target, so each of them needs the exact comparison of :func:`pmmrec_hf.metrics.target_ranks`.
This script times ``target_ranks`` (and ``topk_items``) on such a catalogue and on random rows of the same shape and
prints the tied / random time ratio (best of ``--repeats`` runs each, after one warm-up)::

    python benchmarks/ranking_ties.py                              # 200k items x 64, 16 users (CPU, ~1 min)
    python benchmarks/ranking_ties.py --items 1000000 --users 64 --device cuda

Not a timed test (timings depend on the machine); it prints figures, and exits 1 when the ratio exceeds
``--max-ratio`` (default 2).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pmmrec_hf.metrics import target_ranks, topk_items


def _best_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--noise", type=float, default=1e-6, help="per-element perturbation of the near-equal rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-ratio", type=float, default=2.0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(args.users, args.dim, generator=gen).to(device)
    targets = torch.randint(0, args.items, (args.users,), generator=gen).to(device)
    catalogues = {
        "random": torch.randn(args.items, args.dim, generator=gen),
        "near-tied": torch.randn(args.dim, generator=gen) + args.noise * torch.randn(args.items, args.dim, generator=gen),
    }
    times = {}
    for name, items in catalogues.items():
        items = items.to(device)
        times[name] = {
            "target_ranks": _best_time(lambda: target_ranks(users, items, targets), args.repeats, device),
            "topk_items": _best_time(lambda: topk_items(users, items, 10), args.repeats, device),
        }
    print(f"{args.items:,} items x {args.dim}, {args.users} users, device {device}, noise {args.noise:g}")
    worst = 0.0
    for fn in ("target_ranks", "topk_items"):
        ratio = times["near-tied"][fn] / times["random"][fn]
        worst = max(worst, ratio)
        print(f"  {fn:<13} random {times['random'][fn]:.3f} s | near-tied {times['near-tied'][fn]:.3f} s | "
              f"ratio {ratio:.2f}x")
    ok = worst <= args.max_ratio
    print(f"  worst ratio {worst:.2f}x ({'within' if ok else 'ABOVE'} {args.max_ratio:g}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
