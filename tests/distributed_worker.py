"""Runs an example script inside a launched process and records what the tests compare.

    python tests/distributed_worker.py --expect-world-size 1 --record DIR pretrain [pretrain.py arguments]
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py --expect-world-size 2 \
        --record DIR pretrain [pretrain.py arguments]

The script (`examples/<name>.py`, or `recommender`: Recommender.encode_catalogue on a tiny model) runs unchanged,
through its own `main`. The worker asserts, inside every process, that the process group has the expected
size (at the first training forward pass, while the group exists: the script ends it), and writes
``DIR/rank<r>.json``: the world size seen, the item ids of every training batch this process saw, the script's
summary (log history with the losses and learning rates of every step, evaluation history).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_world(expected: int, seen: dict) -> None:
    from accelerate import PartialState

    world = _world()
    state = PartialState()
    assert world == expected, f"process group of {world} processes, expected {expected}"
    assert state.num_processes == expected, f"Accelerate runs {state.num_processes} processes, expected {expected}"
    assert int(os.environ.get("WORLD_SIZE", "1")) == expected
    seen.update(world_size=world, process_index=state.process_index, accelerate_processes=state.num_processes,
                distributed_type=str(state.distributed_type))


def _watch_training_batches(expected: int, seen: dict) -> None:
    """Wrap the models' forward: the first training call checks the world size; every call records item ids."""
    from pmmrec_hf import PMMRecModel, SASRecModel

    seen["batches"] = []
    for cls in (PMMRecModel, SASRecModel):
        original = cls.forward

        def forward(self, *args, _original=original, **kwargs):
            if self.training and kwargs.get("return_loss", True):
                if "world_size" not in seen:
                    _check_world(expected, seen)
                seen["batches"].append(sorted(kwargs["item_ids"].tolist()))
            return _original(self, *args, **kwargs)

        cls.forward = forward


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recommender(expected: int, argv: list[str], seen: dict) -> dict:
    """Recommender.encode_catalogue of 23 items in batches of 4, under an accelerator of N processes."""
    import torch

    from pmmrec_hf import PMMRecModel
    from pmmrec_hf.recommend import Recommender
    from pmmrec_hf.training import TrainingConfig, make_accelerator
    from tiny_models import item_inputs, tiny_config

    accelerator = make_accelerator(TrainingConfig(report_to="none", mixed_precision="no"))
    _check_world(expected, seen)
    torch.manual_seed(0)
    model = PMMRecModel(tiny_config()).eval()
    inputs = item_inputs(23, seed=3)
    rec = Recommender(model)
    ids = [f"item_{i}" for i in range(23)]
    matrix = rec.encode_catalogue(ids, inputs, batch_size=4, accelerator=accelerator)
    batches = [{k: v[i : i + 5] for k, v in inputs.items()} for i in range(0, 23, 5)]  # an iterable of batches
    again = rec.embed_items(23, batches, accelerator=accelerator)
    return {"catalogue": matrix.tolist(), "from_iterable": again.tolist(), "item_ids": rec.item_ids}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-world-size", type=int, required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("script", choices=["pretrain", "finetune", "evaluate", "recommender"])
    args, rest = parser.parse_known_args()
    seen: dict = {}
    if args.script == "recommender":
        summary = _recommender(args.expect_world_size, rest, seen)
    else:
        _watch_training_batches(args.expect_world_size, seen)
        if args.script == "evaluate":  # no training: check the group once the script has made it
            from pmmrec_hf import training

            original = training.evaluate_model

            def evaluate_model(*a, **kw):
                _check_world(args.expect_world_size, seen)
                return original(*a, **kw)

            from pmmrec_hf.commands import evaluate as evaluate_command

            evaluate_command.evaluate_model = evaluate_model
            module = _load_example("evaluate")
        else:
            module = _load_example(args.script)
        summary = module.main(rest)
    assert seen.get("world_size") == args.expect_world_size, "the world size was never checked"
    keep = ("global_step", "log_history", "eval_history", "metrics", "num_processes", "catalogue", "from_iterable",
            "item_ids", "early_stopped", "best_metric", "best_step")
    record = {"seen": seen, "summary": {k: v for k, v in summary.items() if k in keep}}
    out = Path(args.record)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{seen['process_index']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
