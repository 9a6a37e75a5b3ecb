"""What Trainer users expect of our loop: checkpoint rotation, the best model, early stopping, a schedule that
follows optimiser steps, the launcher's settings honoured (ID baseline on a tiny synthetic dataset: fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmmrec_hf.data.collator import PMMRecCollator
from pmmrec_hf.data.format import load_items, load_prepared
from pmmrec_hf.data.synthetic import make_synthetic_dataset
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel
from pmmrec_hf.training import TrainingConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(num_items=30, num_users=40, seed=0, output_dir=folder, max_length=8, image_size=8)
    items, _ = load_items(folder, decode_images=False)
    splits = load_prepared(folder)
    collator = PMMRecCollator(items, modality="ids", max_length=8)
    return collator, [dict(r) for r in splits["train"]], [dict(r) for r in splits["validation"]]


def _model(collator) -> SASRecModel:
    torch.manual_seed(0)
    return SASRecModel(SASRecConfig(num_items=len(collator.items), hidden_size=16, intermediate_size=32,
                                    max_position_embeddings=8))


def _config(tmp_path, **kw) -> TrainingConfig:
    values = dict(output_dir=str(tmp_path), batch_size=8, learning_rate=1e-2, max_steps=8, eval_steps=2,
                  save_steps=0, report_to="none", ks=(5,), logging_steps=1)
    values.update(kw)
    return TrainingConfig(**values)


def _checkpoints(folder) -> list[str]:
    path = Path(folder) / "checkpoints"
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def test_save_total_limit_keeps_the_newest(data, tmp_path):
    collator, rows, _ = data
    summary = train(_model(collator), rows, collator, _config(tmp_path, save_steps=2, save_total_limit=2))
    assert summary["global_step"] == 8
    assert _checkpoints(tmp_path) == ["step_6", "step_8"]
    state = json.loads((tmp_path / "checkpoints" / "step_8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_the_best_checkpoint_is_kept_and_loaded_at_the_end(data, tmp_path):
    collator, rows, validation = data
    model = _model(collator)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # an improvement must exceed 1.0 in ndcg@5 (impossible): the best evaluation stays the first, at step 0
    config = _config(tmp_path, save_steps=2, save_total_limit=1, metric_for_best_model="ndcg@5",
                     early_stopping_threshold=1.0, load_best_model_at_end=True)
    summary = train(model, rows, collator, config, eval_rows=validation)
    assert summary["best_step"] == 0 and summary["best_metric"] == summary["eval_history"][0]["ndcg@5"]
    assert _checkpoints(tmp_path) == ["step_0", "step_8"]  # the newest one, and the best one
    saved = SASRecModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(saved[k], initial[k]) for k in initial)  # the final model is the best (initial) one
    trained = _model(collator)
    train(trained, rows, collator, _config(tmp_path / "plain"), eval_rows=validation)
    assert not torch.equal(trained.item_embeddings.weight, initial["item_embeddings.weight"])


def test_the_best_model_follows_the_metric(data, tmp_path):
    collator, rows, validation = data
    config = _config(tmp_path, metric_for_best_model="hr@5", load_best_model_at_end=True, max_steps=6)
    summary = train(_model(collator), rows, collator, config, eval_rows=validation)
    values = [(h["hr@5"], h["step"]) for h in summary["eval_history"]]
    best_value = max(v for v, _ in values)
    assert summary["best_metric"] == best_value
    assert summary["best_step"] == next(step for v, step in values if v == best_value)  # the first of equals
    assert f"step_{summary['best_step']}" in _checkpoints(tmp_path)


def test_early_stopping_after_patience_evaluations_without_improvement(data, tmp_path):
    collator, rows, validation = data
    config = _config(tmp_path, max_steps=40, metric_for_best_model="ndcg@5", early_stopping_threshold=1.0,
                     early_stopping_patience=2)
    summary = train(_model(collator), rows, collator, config, eval_rows=validation)
    assert summary["early_stopped"] and summary["global_step"] == 4
    assert [h["step"] for h in summary["eval_history"]] == [0, 2, 4]  # no extra evaluation at the stop
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["early_stopped"] and state["evaluations_without_improvement"] == 2


def test_on_evaluate_returning_true_stops_training(data, tmp_path):
    collator, rows, validation = data
    seen = []

    def on_evaluate(step, metrics, model, item_embeddings):
        seen.append(step)
        return step == 4  # stop after the evaluation at step 4 (anything else, None included, goes on)

    summary = train(_model(collator), rows, collator, _config(tmp_path, max_steps=40), eval_rows=validation,
                    on_evaluate=on_evaluate)
    assert seen == [0, 2, 4] and summary["global_step"] == 4 and summary["early_stopped"]
    assert [h["step"] for h in summary["eval_history"]] == [0, 2, 4]


def test_resume_keeps_the_best_and_the_patience(data, tmp_path):
    collator, rows, validation = data
    common = dict(max_steps=10, save_steps=2, metric_for_best_model="ndcg@5", early_stopping_threshold=1.0,
                  early_stopping_patience=4)
    killed = train(_model(collator), rows, collator, _config(tmp_path, stop_after_steps=4, **common),
                   eval_rows=validation)
    assert killed["stopped"]
    resumed = train(_model(collator), rows, collator, _config(tmp_path, resume_from_checkpoint="latest", **common),
                    eval_rows=validation)
    # evaluations at 2, 4 before the kill and 6, 8 after: four without improvement since step 0 -> stop at 8
    assert resumed["early_stopped"] and resumed["global_step"] == 8 and resumed["best_step"] == 0


@pytest.mark.parametrize("bad,match", [
    (dict(early_stopping_patience=2), "`early_stopping_patience` needs `metric_for_best_model`"),
    (dict(load_best_model_at_end=True), "`load_best_model_at_end` needs `metric_for_best_model`"),
    (dict(save_total_limit=0), "`save_total_limit` must be a positive integer"),
    (dict(metric_for_best_model="ndcg@7"), r"'ndcg@7' is not an evaluation metric; the metrics are \['hr@5'"),
])
def test_bad_options_are_named(data, tmp_path, bad, match):
    collator, rows, validation = data
    with pytest.raises(ValueError, match=match):
        train(_model(collator), rows, collator, _config(tmp_path, **bad), eval_rows=validation)


def test_the_schedule_follows_optimiser_steps_with_gradient_accumulation(data, tmp_path):
    collator, rows, _ = data
    config = _config(tmp_path, gradient_accumulation_steps=2, lr_scheduler="linear", warmup_steps=2, max_steps=6,
                     learning_rate=1e-3, eval_steps=0)
    summary = train(_model(collator), rows, collator, config)
    lrs = [entry["learning_rate"] for entry in summary["log_history"]]
    assert [e["step"] for e in summary["log_history"]] == [1, 2, 3, 4, 5, 6]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4], abs=1e-12)


def test_every_trainable_parameter_must_have_a_gradient_under_several_processes():
    from pmmrec_hf.training import _check_every_trainable_parameter_has_a_gradient

    class TwoProcesses:
        num_processes = 2

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0](torch.ones(1, 2)).sum().backward()  # layer 1 is never used
    with pytest.raises(RuntimeError, match=r"2 trainable parameter\(s\) received no gradient.*1\.weight, 1\.bias"):
        _check_every_trainable_parameter_has_a_gradient(model, TwoProcesses())
    model[1].requires_grad_(False)
    _check_every_trainable_parameter_has_a_gradient(model, TwoProcesses())


def test_the_scripts_take_the_new_options():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_pretrain", ROOT / "examples" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from pmmrec_hf.commands.arguments import training_config_from_args

    args = module.parse_args(["--save-total-limit", "3", "--metric-for-best-model", "ndcg@10",
                              "--early-stopping-patience", "2", "--load-best-model-at-end", "--no-greater-is-better"])
    config = training_config_from_args(args)
    assert (config.save_total_limit, config.metric_for_best_model, config.early_stopping_patience,
            config.load_best_model_at_end, config.greater_is_better) == (3, "ndcg@10", 2, True, False)
    defaults = training_config_from_args(module.parse_args([]))
    assert defaults.mixed_precision is None and defaults.gradient_accumulation_steps is None  # the launcher's


@pytest.mark.slow
@pytest.mark.parametrize("flags,expected", [
    ([], {"mixed_precision": "bf16", "gradient_accumulation_steps": 2}),  # the launcher's settings
    (["--mixed-precision", "no", "--gradient-accumulation-steps", "1"],  # the script's own flags win
     {"mixed_precision": "no", "gradient_accumulation_steps": 1}),
])
def test_accelerate_launch_settings_are_honoured_unless_the_script_is_given_its_own(tmp_path, flags, expected):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no",
           str(ROOT / "examples" / "pretrain.py"), "--synthetic-users", "60", "--synthetic-items", "30",
           "--hidden-size", "16", "--batch-size", "4", "--report-to", "none", "--max-steps", "2", "--eval-steps", "0",
           "--max-eval-users", "10", "--output-dir", str(tmp_path)] + flags
    # Accelerate's environment setting of gradient accumulation (its launcher sets it for DeepSpeed only)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert {k: state[k] for k in expected} == expected
    assert state["num_processes"] == 1 and state["global_step"] == 2


def test_latest_skips_incomplete_and_foreign_checkpoint_folders(data, tmp_path, caplog):
    import logging
    import shutil

    collator, rows, _ = data
    train(_model(collator), rows, collator, _config(tmp_path, save_steps=2, max_steps=4, stop_after_steps=4))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_4" / "trainer_state.json").unlink()  # as if killed while saving step 4
    shutil.copytree(checkpoints / "step_2", checkpoints / "step_8.old")
    with caplog.at_level(logging.INFO, logger="pmmrec_hf.training"):
        resumed = train(_model(collator), rows, collator, _config(tmp_path, save_steps=2, max_steps=4,
                                                                  resume_from_checkpoint="latest"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped" in m and "step_4 (trainer_state.json (listed in .pmmrec-complete.json) is missing), "
               "step_8.old (not a step_<N> folder)" in m for m in messages)
    assert any(m.startswith("Resumed from") and m.endswith(f"{checkpoints / 'step_2'} at step 2") for m in messages)
    assert resumed["global_step"] == 4 and [e["step"] for e in resumed["log_history"]] == [1, 2, 3, 4]


def test_divergence_stops_training_and_nothing_is_saved(data, tmp_path):
    collator, rows, _ = data
    with pytest.raises(FloatingPointError, match=r"Training diverged: the loss is (nan|inf) at step \d+ "
                                                 r"\(next_item_loss (nan|inf)\)"):
        train(_model(collator), rows, collator, _config(tmp_path, learning_rate=1e6, max_steps=40, eval_steps=0))
    assert not (tmp_path / "model.safetensors").exists()


def test_a_checkpoint_with_non_finite_weights_does_not_load(data, tmp_path):
    collator, _, _ = data
    model = _model(collator)
    with torch.no_grad():
        model.user_encoder.layers[0].ffn_output.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"1 weight tensor\(s\) hold NaN or inf \(user_encoder.layers.0.ffn_output"):
        SASRecModel.from_pretrained(tmp_path)


def test_one_nan_pixel_is_caught_at_the_step_it_enters():
    from pmmrec_hf import PMMRecModel
    from pmmrec_hf.training import _check_finite_loss, _loss_values
    from tiny_models import tiny_batch, tiny_config

    torch.manual_seed(0)
    model = PMMRecModel(tiny_config())
    batch = tiny_batch()
    _check_finite_loss(_loss_values(model(**batch)), 1)  # a healthy batch passes
    batch["pixel_values"][2, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 7 \(next_item_loss nan, nicl_loss nan"):
        _check_finite_loss(_loss_values(model(**batch)), 7)


def test_resume_latest_without_any_checkpoint_refuses_instead_of_starting_over(data, tmp_path):
    collator, rows, _ = data
    train(_model(collator), rows, collator, _config(tmp_path, max_steps=2, eval_steps=0))  # save_steps=0: none
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"latest: no complete checkpoint under .*checkpoints.*--save-steps"):
        train(_model(collator), rows, collator, _config(tmp_path, max_steps=2, resume_from_checkpoint="latest"))
