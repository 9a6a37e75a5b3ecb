"""Two processes (gloo on CPU): a loss that is NaN on ONE process only makes every process take the same
decision (one reduced flag): both raise naming the step, or, with on_non_finite="skip", both skip the step
and stay in step; without the shared decision the healthy process would wait forever in the all-reduce."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from launching import free_port, run_launched

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, os, sys
import torch
import torch.distributed as dist
from pmmrec_hf.data.collator import PMMRecCollator
from pmmrec_hf.data.synthetic import make_synthetic_dataset
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel
from pmmrec_hf.training import TrainingConfig, train

rank = int(os.environ["RANK"])
data = make_synthetic_dataset(num_items=20, num_users=32, seed=0, max_length=6, image_size=4)
collator = PMMRecCollator(data.items, modality="ids", max_length=6)
rows = [dict(r) for r in data.splits["train"]]

class Poisoned(SASRecModel):
    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        outputs = super().forward(*args, **kwargs)
        if rank == 1 and self.calls == 2:
            outputs.loss = outputs.loss * float("nan")
        return outputs

def model():
    torch.manual_seed(0)
    return Poisoned(SASRecConfig(num_items=len(collator.items), hidden_size=8, intermediate_size=16,
                                 max_position_embeddings=6, num_hidden_layers=1))

record = {}
out = sys.argv[1]
config = dict(batch_size=4, learning_rate=1e-2, max_steps=3, eval_steps=0, report_to="none", logging_steps=1)
try:
    train(model(), rows, collator, TrainingConfig(output_dir=out + "/raise", **config))
except FloatingPointError as err:
    record["raised"] = str(err)
assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_rank() == rank, "not one 2-process group"
m = model()
summary = train(m, rows, collator, TrainingConfig(output_dir=out + "/skip", on_non_finite="skip", **config))
record["skipped_steps"] = summary["skipped_steps"]
record["global_step"] = summary["global_step"]
record["weights"] = [float(p.double().sum()) for p in m.parameters()]
assert dist.is_initialized() and dist.get_world_size() == 2  # train() leaves the group to the script
dist.destroy_process_group()
open(f"{out}/rank{rank}.json", "w").write(json.dumps(record))
'''


def test_a_nan_loss_on_one_process_is_decided_alike_on_every_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    result = run_launched(command, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["raised"].startswith("Training diverged: the loss is nan at step 2 (next_item_loss ")
    assert ranks[0]["raised"].startswith("Training diverged: the loss is not finite on another process at step 2")
    assert [r["skipped_steps"] for r in ranks] == [1, 1] and [r["global_step"] for r in ranks] == [3, 3]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # still in step
    assert json.loads((tmp_path / "skip" / "trainer_state.json").read_text())["skipped_steps"] == 1
