#!/usr/bin/env python
"""End-to-end training throughput (prepared dataset on disk -> collator -> DataLoader -> step) and evaluation
throughput (full ranking of N users against an M-item catalogue, exact and through FAISS). See
benchmarks/README.md, section "Pipeline benchmark".

    python benchmarks/pipeline.py --size small --device cpu --steps 10 --num-workers 1 \
        --eval-users 2000 --eval-items 100000 --output pipeline_cpu.json

Train part: a synthetic prepared dataset (`pmmrec_hf.data.synthetic`, PNG images, written to --data-folder or a
temporary folder) is read with `load_prepared` / `load_items`, batched by the package's `PMMRecCollator` (text
tokenised and images decoded in the DataLoader workers), moved to the device (pinned memory, non_blocking), and
trained with the benchmark's model of --size. Per step it records the time spent waiting for the next batch and
the step time; "stalled" steps are those whose wait exceeds 5% of the median step time.

Eval part: random unit-norm user and item embeddings of width d; `pmmrec_hf.metrics.target_ranks` (the exact
full ranking with history masking) and a FAISS IndexFlatIP top-k search (`faiss-cpu`, skipped with a message
when not installed). Users/s and peak memory (CUDA max allocated, or the process's RSS peak on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import throughput as bench  # noqa: E402

GIB = 1024**3


def _peak(device) -> float | None:
    return bench._peak_memory(device)[0]


def prepare_dataset(folder: Path, num_items: int, num_users: int, image_size: int, seed: int) -> Path:
    from pmmrec_hf.data.format import is_prepared_folder
    from pmmrec_hf.data.synthetic import make_synthetic_dataset

    if not is_prepared_folder(folder):
        make_synthetic_dataset(num_items=num_items, num_users=num_users, image_size=image_size, seed=seed,
                               output_dir=folder, min_sequence_length=15, max_sequence_length=30)
    return folder


def run_train(args, spec, device) -> dict:
    from torch.utils.data import DataLoader

    from pmmrec_hf.data.collator import PMMRecCollator
    from pmmrec_hf.data.format import load_items, load_prepared
    from pmmrec_hf.data.synthetic import synthetic_tokenizer

    folder = Path(args.data_folder) if args.data_folder else Path(tempfile.mkdtemp(prefix="pmmrec_pipeline_"))
    t0 = time.perf_counter()
    prepare_dataset(folder, args.num_items, args.num_users, spec.image_size, args.seed)
    prepare_s = time.perf_counter() - t0
    tokenizer = synthetic_tokenizer(model_max_length=spec.text_tokens)
    if len(tokenizer) > spec.text.get("vocab_size", 250002):  # tiny: widen the vocabulary to the tokenizer's
        spec = bench.SizeSpec(**{**spec.__dict__, "text": {**spec.text, "vocab_size": len(tokenizer)}})
    model = bench.build_model(spec, "sdpa" if args.sdpa else "eager", seed=args.seed).to(device).train()
    optimizer = bench.make_optimizer(model, args.fused_adamw, device)
    train = load_prepared(folder, split="train")
    items, _ = load_items(folder, decode_images=False)  # PNG bytes: the collator decodes them in the workers
    collator = PMMRecCollator.from_config(model.config, items, tokenizer=tokenizer)
    batch_size = args.batch_size or spec.batch_size
    loader_kwargs = dict(batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=args.num_workers,
                         pin_memory=device.type == "cuda" and args.pin_memory, drop_last=True)
    if args.num_workers > 0:
        loader_kwargs.update(prefetch_factor=args.prefetch_factor, persistent_workers=True)
    loader = DataLoader(train, generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    waits, steps, losses = [], [], []
    total = args.warmup + args.steps
    started = time.perf_counter()
    iterator = iter(loader)
    for step in range(total):
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        waited = time.perf_counter() - t0
        t1 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        keys = bench._MODEL_KEYS + ("image_mask",)
        with bench.autocast_context(device, args.bf16):
            loss = model(**{k: batch[k] for k in keys if k in batch}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bench._sync(device)
        if step >= args.warmup:
            waits.append(waited)
            steps.append(time.perf_counter() - t1)
            losses.append(float(loss.detach()))
    wall = time.perf_counter() - started
    median_step = statistics.median(steps)
    stalled = [w for w in waits if w > 0.05 * median_step]
    return {
        "dataset": {"folder": str(folder), "items": args.num_items, "users": args.num_users, "image_size":
                    spec.image_size, "prepare_s": prepare_s, "train_rows": len(train)},
        "loader": {"batch_size": batch_size, "num_workers": args.num_workers, "pin_memory":
                   loader_kwargs["pin_memory"], "prefetch_factor": args.prefetch_factor if args.num_workers else None},
        "switches": {"bf16": args.bf16, "sdpa": args.sdpa, "fused_adamw": args.fused_adamw},
        "steps": len(steps), "median_step_s": median_step, "median_wait_s": statistics.median(waits),
        "mean_wait_s": statistics.fmean(waits), "max_wait_s": max(waits),
        "wait_fraction": sum(waits) / (sum(waits) + sum(steps)),
        "stalled_steps": len(stalled), "stall_rule": "wait for the next batch > 5% of the median step time",
        "sequences_per_s_end_to_end": len(steps) * batch_size / (sum(waits) + sum(steps)),
        "sequences_per_s_step_only": batch_size / median_step, "wall_s": wall,
        "loss_first": losses[0], "loss_last": losses[-1], "peak_memory_gib": _peak(device),
    }


def run_eval(args, spec, device) -> dict:
    from pmmrec_hf.metrics import target_ranks

    g = torch.Generator().manual_seed(args.seed)
    d = spec.hidden
    users = torch.nn.functional.normalize(torch.randn(args.eval_users, d, generator=g), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(args.eval_items, d, generator=g), dim=-1)
    targets = torch.randint(0, args.eval_items, (args.eval_users,), generator=g)
    history = torch.randint(0, args.eval_items, (args.eval_users, spec.max_length), generator=g)
    dtype = torch.bfloat16 if args.eval_bf16 else torch.float32
    users, items = users.to(device, dtype), items.to(device, dtype)
    targets, history = targets.to(device), history.to(device)
    out = {"users": args.eval_users, "items": args.eval_items, "d": d, "dtype": str(dtype).replace("torch.", ""),
           "history_per_user": spec.max_length}
    bench._free(device)
    bench._sync(device)
    t0 = time.perf_counter()
    ranks = target_ranks(users, items, targets, history=history)
    bench._sync(device)
    exact_s = time.perf_counter() - t0
    out["exact"] = {"method": "pmmrec_hf.metrics.target_ranks (full ranking, history masked, exact ties)",
                    "seconds": exact_s, "users_per_s": args.eval_users / exact_s, "peak_memory_gib": _peak(device),
                    "median_rank": float(ranks.float().median())}
    try:
        import faiss
    except ImportError:
        out["faiss"] = "skipped: faiss is not installed (pip install faiss-cpu)"
        return out
    matrix = items.float().cpu().contiguous().numpy()
    faiss_users = min(args.faiss_users or args.eval_users, args.eval_users)
    queries = users[:faiss_users].float().cpu().contiguous().numpy()
    bench._free(device)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(d)
    index.add(matrix)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, top = index.search(queries, args.faiss_k)
    search_s = time.perf_counter() - t0
    exact_top = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(matrix).T, args.faiss_k).indices.numpy() \
        if faiss_users * args.eval_items <= 2e8 else None
    agree = None if exact_top is None else float(np.mean([len(set(a) & set(b)) / args.faiss_k
                                                           for a, b in zip(top, exact_top)]))
    out["faiss"] = {"method": f"faiss.IndexFlatIP top-{args.faiss_k} on the CPU (faiss {faiss.__version__}; the "
                    "export of Recommender.to_faiss_index('flat_ip'); no history masking)",
                    "users": faiss_users, "build_s": build_s, "seconds": search_s,
                    "users_per_s": faiss_users / search_s,
                    "peak_memory_gib": _peak(torch.device("cpu")), "top_k_agreement_with_matmul": agree}
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    p.add_argument("--device", default=None)
    p.add_argument("--parts", default="train,eval", help="train and/or eval")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--prefetch-factor", type=int, default=4)
    p.add_argument("--no-pin-memory", dest="pin_memory", action="store_false")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--sdpa", action="store_true")
    p.add_argument("--fused-adamw", action="store_true")
    p.add_argument("--num-items", type=int, default=2000)
    p.add_argument("--num-users", type=int, default=2000)
    p.add_argument("--data-folder", default=None, help="prepared dataset folder (created if not prepared)")
    p.add_argument("--eval-users", type=int, default=2000)
    p.add_argument("--eval-items", type=int, default=100_000)
    p.add_argument("--eval-bf16", action="store_true", help="bf16 embeddings for the exact ranking")
    p.add_argument("--faiss-k", type=int, default=10)
    p.add_argument("--faiss-users", type=int, default=None, help="users searched through FAISS (default: all)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("steps", "num_items", "num_users", "eval_users", "eval_items", "faiss_k"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"train", "eval"}:
        raise SystemExit(f"--parts takes train and/or eval, got {args.parts!r}.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = bench.size_spec(args.size)
    report = {"benchmark": "pmmrec_hf pipeline (end-to-end training, evaluation)", "arguments": vars(args),
              "device_name": bench.device_name(device), "torch": torch.__version__}
    if "train" in parts:
        report["train"] = r = run_train(args, spec, device)
        print(f"train end-to-end: median step {r['median_step_s']:.4f} s, median wait {r['median_wait_s']:.4f} s "
              f"(max {r['max_wait_s']:.4f}), wait fraction {100 * r['wait_fraction']:.1f}%, stalled steps "
              f"{r['stalled_steps']}/{r['steps']}, {r['sequences_per_s_end_to_end']:.1f} seq/s end to end vs "
              f"{r['sequences_per_s_step_only']:.1f} step only", flush=True)
    if "eval" in parts:
        report["eval"] = e = run_eval(args, spec, device)
        print(f"eval exact: {e['users']} users x {e['items']} items: {e['exact']['users_per_s']:.0f} users/s, "
              f"peak {e['exact']['peak_memory_gib']:.2f} GiB", flush=True)
        faiss_row = e["faiss"]
        print("eval faiss: " + (faiss_row if isinstance(faiss_row, str) else
                                f"{faiss_row['users_per_s']:.0f} users/s (build {faiss_row['build_s']:.2f} s), "
                                f"top-k agreement {faiss_row['top_k_agreement_with_matmul']}"), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
