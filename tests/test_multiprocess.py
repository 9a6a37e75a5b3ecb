"""Two real processes through the documented launcher equal one process with the whole batch.

Launcher: ``accelerate launch --multi_gpu --num_processes 2`` (on this CPU-only machine the scripts join the two
processes in one gloo group: ``pmmrec_hf.training.make_accelerator``; ``accelerate launch --cpu`` would start a
single process). Every launched process asserts that the process group has 2 processes
(``tests/distributed_worker.py``); the reference is ``python examples/<script>.py`` in one process with twice the
batch size.

Compared, over 6 optimiser steps with a linear schedule (2 warm-up steps): every logged loss component
(relative 1e-5: fp32 sums taken in another order), the learning rate of every step (exactly), the evaluation
metrics (exactly) and the final weights (absolute 1e-6 for every parameter except attention key biases, see
`KEY_BIAS`). Dropout is 0 in both runs (dropout masks cannot match across a different split of the batch).
The data (synthetic, 80 items, seed 0) puts item 0 on one process only in some step while the other process,
of lower rank, holds fewer distinct items: the case where padding rows of the gathered negatives used to
shadow item 0 (an infinite loss).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port, run_launched

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
# The loss does not depend on an attention layer's key bias (softmax is invariant to a constant added to a
# row of logits), so its exact gradient is 0 and its fp32 gradient is rounding noise (~1e-10) that Adam's
# normalisation turns into steps of size ~lr, different in each run. Those parameters are held to lr x steps.
KEY_BIAS = ("key.bias", "k_proj.bias")

COMMON = ["--synthetic-users", "120", "--synthetic-items", "80", "--report-to", "none",
          "--logging-steps", "1", "--max-steps", "6", "--lr-scheduler", "linear", "--warmup-steps", "2",
          "--eval-steps", "3", "--max-eval-users", "50", "--eval-batch-size", "16", "--catalogue-batch-size", "16"]
BATCH = 4  # users per process; the single-process reference takes 2 x BATCH
LEARNING_RATE = 1e-3
STEPS = 6

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch(processes: int, record: Path, script: str, args: list[str], cwd: Path) -> list[dict]:
    """Run `script` under `processes` processes; return each process's record (rank order)."""
    worker = [str(WORKER), "--expect-world-size", str(processes), "--record", str(record), script]
    if processes == 1:
        command = [sys.executable] + worker + args
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port())] + worker + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    result = run_launched(command, env=env, cwd=cwd, timeout=450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((record / f"rank{r}.json").read_text()) for r in range(processes)]
    for rank, rec in enumerate(records):  # asserted inside each process too; recorded for the reader
        assert rec["seen"]["world_size"] == processes and rec["seen"]["process_index"] == rank
        if processes > 1:
            assert rec["seen"]["distributed_type"] == "DistributedType.MULTI_CPU"
    return records


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def compare_runs(one: list[dict], two: list[dict], out_one: Path, out_two: Path) -> dict[str, float]:
    """Assert 2 processes x B == 1 process x 2B; return the largest differences seen."""
    single, rank0 = one[0]["summary"], two[0]["summary"]
    assert single["global_step"] == rank0["global_step"] == STEPS
    logs_one, logs_two = single["log_history"], rank0["log_history"]
    assert [e["step"] for e in logs_one] == [e["step"] for e in logs_two] == list(range(1, STEPS + 1))
    assert two[1]["summary"]["log_history"] == logs_two  # every process logs the same (global) values
    worst = {"loss": 0.0, "weight": 0.0, "key_bias": 0.0}
    for a, b in zip(logs_one, logs_two):
        assert a.keys() == b.keys()
        for key in a:
            if key.endswith("learning_rate"):
                assert a[key] == b[key], (a["step"], key)
            elif key != "step":
                assert torch.isfinite(torch.tensor(b[key])), (a["step"], key, b[key])
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key)
                worst["loss"] = max(worst["loss"], abs(a[key] - b[key]) / abs(a[key]))
    # the schedule follows optimiser steps: warm-up 0 -> lr over 2 steps, then linear decay to 0 at step 6
    expected = [LEARNING_RATE * min(s / 2, (STEPS - s) / (STEPS - 2)) for s in range(STEPS)]
    assert [e["learning_rate"] for e in logs_two] == pytest.approx(expected, abs=1e-12)
    # evaluation during training: catalogue and users split over the processes, metrics as with one process
    assert rank0["eval_history"] == single["eval_history"] == two[1]["summary"]["eval_history"]
    w1, w2 = _weights(out_one / "model"), _weights(out_two / "model")
    assert w1.keys() == w2.keys()
    for name in w1:
        diff = float((w1[name] - w2[name]).abs().max()) if w1[name].numel() else 0.0
        if name.endswith(KEY_BIAS):
            worst["key_bias"] = max(worst["key_bias"], diff)
            assert diff <= LEARNING_RATE * STEPS, name
        else:
            worst["weight"] = max(worst["weight"], diff)
            assert diff <= WEIGHT_ATOL, (name, diff)
    return worst


def item_zero_on_one_rank_only(two: list[dict]) -> list[int]:
    """Steps where item 0 is in rank 1's batch only and rank 0 holds fewer distinct items (its padding rows
    come first in the gathered pool)."""
    rank0, rank1 = two[0]["seen"]["batches"], two[1]["seen"]["batches"]
    return [step for step, (a, b) in enumerate(zip(rank0, rank1)) if 0 in b and 0 not in a and len(a) < len(b)]


def _union_is_the_single_batch(one: list[dict], two: list[dict]) -> None:
    for a, b, whole in zip(two[0]["seen"]["batches"], two[1]["seen"]["batches"], one[0]["seen"]["batches"]):
        assert sorted(set(a) | set(b)) == whole


def test_pmmrec_pretraining_and_finetuning_two_processes_equal_one(tmp_path):
    pretrain = COMMON + ["--hidden-size", "16", "--dropout", "0", "--learning-rate", str(LEARNING_RATE)]
    runs = {}
    for n, batch in ((1, 2 * BATCH), (2, BATCH)):
        out = tmp_path / f"pretrain{n}"
        runs[n] = launch(n, tmp_path / f"rec_pretrain{n}", "pretrain", pretrain + ["--batch-size", str(batch),
                                                                                    "--output-dir", str(out)], tmp_path)
    _union_is_the_single_batch(runs[1], runs[2])
    assert item_zero_on_one_rank_only(runs[2]), "the data no longer has the item-0-on-one-rank case"
    assert set(runs[1][0]["summary"]["log_history"][0]) >= {"next_item_loss", "nicl_loss", "nid_loss", "rcl_loss"}
    worst = compare_runs(runs[1], runs[2], tmp_path / "pretrain1", tmp_path / "pretrain2")
    print("pretraining, 1 vs 2 processes:", worst)

    # fine-tuning (next-item only) of the one-process model, on another seed's data
    finetune = COMMON + ["--seed", "1", "--pretrained", str(tmp_path / "pretrain1" / "model"), "--setting", "full",
                         "--learning-rate", str(LEARNING_RATE)]
    for n, batch in ((1, 2 * BATCH), (2, BATCH)):
        runs[n] = launch(n, tmp_path / f"rec_finetune{n}", "finetune", finetune + [
            "--batch-size", str(batch), "--output-dir", str(tmp_path / f"finetune{n}")], tmp_path)
    assert set(runs[1][0]["summary"]["log_history"][0]) == {"step", "loss", "next_item_loss", "learning_rate",
                                                           "tower_learning_rate"}
    worst = compare_runs(runs[1], runs[2], tmp_path / "finetune1", tmp_path / "finetune2")
    print("fine-tuning, 1 vs 2 processes:", worst)


def test_sasrec_two_processes_equal_one(tmp_path):
    args = COMMON + ["--hidden-size", "16", "--model-type", "sasrec", "--dropout", "0",
                     "--learning-rate", str(LEARNING_RATE)]
    runs = {n: launch(n, tmp_path / f"rec{n}", "pretrain", args + ["--batch-size", str(b), "--output-dir",
                                                                  str(tmp_path / f"out{n}")], tmp_path)
            for n, b in ((1, 2 * BATCH), (2, BATCH))}
    _union_is_the_single_batch(runs[1], runs[2])
    assert item_zero_on_one_rank_only(runs[2])
    worst = compare_runs(runs[1], runs[2], tmp_path / "out1", tmp_path / "out2")
    print("SASRec, 1 vs 2 processes:", worst)


def test_distributed_evaluation_and_catalogue_equal_one_process_exactly(tmp_path):
    # a model to evaluate: a short one-process pre-training
    launch(1, tmp_path / "rec_train", "pretrain", COMMON[:6] + ["--hidden-size", "16", "--max-steps", "3",
                                                                 "--eval-steps", "0",
                                                                 "--output-dir", str(tmp_path / "model")], tmp_path)
    args = ["--model", str(tmp_path / "model" / "model"), "--synthetic-users", "120", "--synthetic-items", "80",
            "--split", "test", "--batch-size", "16", "--catalogue-batch-size", "16"]
    one = launch(1, tmp_path / "eval1", "evaluate", args, tmp_path)
    two = launch(2, tmp_path / "eval2", "evaluate", args, tmp_path)
    assert one[0]["summary"]["metrics"]["num_users"] == 120
    assert two[0]["summary"]["num_processes"] == 2
    for rank in range(2):
        assert two[rank]["summary"]["metrics"] == one[0]["summary"]["metrics"]  # exactly equal floats

    one = launch(1, tmp_path / "rec1", "recommender", [], tmp_path)
    two = launch(2, tmp_path / "rec2", "recommender", [], tmp_path)
    for rank in range(2):
        for key in ("catalogue", "from_iterable", "item_ids"):
            assert two[rank]["summary"][key] == one[0]["summary"][key], key


def test_per_platform_batches_put_one_platform_in_every_step_of_two_processes(tmp_path):
    from pmmrec_hf.data import make_synthetic_dataset

    make_synthetic_dataset(num_items=30, num_users=40, seed=0, output_dir=tmp_path / "shop")
    make_synthetic_dataset(num_items=20, num_users=24, seed=1, output_dir=tmp_path / "books", missing_image_rate=1.0)
    args = ["--dataset", str(tmp_path / "shop"), str(tmp_path / "books"), "--mixture-batches", "per-platform",
            "--hidden-size", "16", "--image-size", "16", "--batch-size", "4", "--max-steps", "6", "--eval-steps", "0",
            "--max-eval-users", "16", "--report-to", "none", "--output-dir", str(tmp_path / "out")]
    two = launch(2, tmp_path / "rec", "pretrain", args, tmp_path)
    steps = list(zip(two[0]["seen"]["batches"], two[1]["seen"]["batches"]))
    assert len(steps) == 6
    platforms = [({i >= 30 for i in a}, {i >= 30 for i in b}) for a, b in steps]  # item rows 30.. are books
    assert all(len(a) == 1 and a == b for a, b in platforms)  # one platform per batch, the same on both processes
    assert {next(iter(a)) for a, _ in platforms} == {False, True}  # both platforms drawn


TWO_TRAININGS = r'''
import json, os, sys
import torch
import torch.distributed as dist
from pmmrec_hf.data.collator import PMMRecCollator
from pmmrec_hf.data.synthetic import make_synthetic_dataset
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel
from pmmrec_hf.training import TrainingConfig, train

rank, out = int(os.environ["RANK"]), sys.argv[1]
data = make_synthetic_dataset(num_items=20, num_users=32, seed=0, max_length=6, image_size=4)
collator = PMMRecCollator(data.items, modality="ids", max_length=6)
rows = [dict(r) for r in data.splits["train"]]
record = {"world_sizes": [], "weights": []}
for run in range(2):  # e.g. pre-train, then fine-tune, in one script under one launcher
    torch.manual_seed(0)
    model = SASRecModel(SASRecConfig(num_items=len(collator.items), hidden_size=8, intermediate_size=16,
                                     max_position_embeddings=6, num_hidden_layers=1))
    summary = train(model, rows, collator, TrainingConfig(output_dir=f"{out}/run{run}", batch_size=4, max_steps=3,
                                                          eval_steps=0, report_to="none", learning_rate=1e-2))
    # the group the first run's Accelerator started, still there after each run
    assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_rank() == rank, run
    record["world_sizes"].append([summary["num_processes"], dist.get_world_size()])
    record["weights"].append([float(p.double().sum()) for p in model.parameters()])
open(f"{out}/rank{rank}.json", "w").write(json.dumps(record))
dist.destroy_process_group()
'''


def test_one_launched_script_trains_twice_on_two_processes(tmp_path):
    # train() keeps the process group (Accelerator.end_training would destroy it and the second run would find
    # none); the console scripts leave it when they end
    script = tmp_path / "two_trainings.py"
    script.write_text(TWO_TRAININGS)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    result = run_launched(command, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for record in ranks:
        assert record["world_sizes"] == [[2, 2], [2, 2]]
        assert record["weights"][0] == record["weights"][1]  # same seed, same data: the same run twice
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for run in range(2):
        assert json.loads((tmp_path / f"run{run}" / "trainer_state.json").read_text())["num_processes"] == 2
