"""The example scripts run in-process on the synthetic dataset (tiny backbones) and write what they promise."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain, finetune, evaluate_script = _load("pretrain"), _load("finetune"), _load("evaluate")

TINY = ["--synthetic-users", "120", "--synthetic-items", "60", "--hidden-size", "16", "--batch-size", "8",
        "--report-to", "none", "--logging-steps", "1"]


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    summary = pretrain.main(TINY + ["--max-steps", "4", "--eval-steps", "2", "--output-dir", str(out)])
    assert summary["global_step"] == 4
    return out, summary


def test_pretrain_writes_the_full_model_and_each_encoder(pretrained):
    out, summary = pretrained
    from pmmrec_hf import PMMRecItemEncoder, PMMRecModel, PMMRecUserEncoder

    model = PMMRecModel.from_pretrained(out / "model")
    item = PMMRecItemEncoder.from_pretrained(out / "item_encoder")
    user = PMMRecUserEncoder.from_pretrained(out / "user_encoder")
    full = model.state_dict()
    assert all(torch.equal(v, full[f"item_encoder.{k}"]) for k, v in item.state_dict().items())
    assert all(torch.equal(v, full[f"user_encoder.{k}"]) for k, v in user.state_dict().items())
    assert (out / "model" / "tokenizer.json").exists() and (out / "item_encoder" / "tokenizer.json").exists()
    history = json.loads((out / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4]  # before training, every eval_steps, at the end
    assert {"hr@10", "ndcg@10", "mrr@10", "hr@50"} <= set(history[-1])
    assert set(summary["last_logs"]) == {"loss", "next_item_loss", "nicl_loss", "nid_loss", "rcl_loss"}


@pytest.mark.parametrize("setting", ["full", "item_encoder", "user_encoder", "text", "vision", "scratch"])
def test_finetune_every_setting(pretrained, tmp_path, setting):
    out, _ = pretrained
    random = ["--random-towers"] if setting in ("user_encoder", "scratch") else []  # built-in backbones: no original
    summary = finetune.main(TINY[:4] + TINY[6:] + random + ["--pretrained", str(out / "model"), "--setting", setting,
                                                           "--max-steps", "2", "--eval-steps", "0",
                                                           "--output-dir", str(tmp_path)])
    assert summary["global_step"] == 2 and summary["eval_history"]
    from pmmrec_hf import PMMRecModel

    model = PMMRecModel.from_pretrained(tmp_path / "model")
    expected = {"text": "text", "vision": "vision"}.get(setting, "multimodal")
    assert model.config.item_encoder_config.modality == expected


def test_finetune_with_lora_saves_adapter_and_merged_model(pretrained, tmp_path):
    out, _ = pretrained
    summary = finetune.main(TINY[:4] + TINY[6:] + ["--pretrained", str(out / "model"), "--lora", "--lora-r", "2",
                                                  "--max-steps", "2", "--eval-steps", "0", "--output-dir", str(tmp_path)])
    assert summary["setting"] == "full+lora" and summary["saved"]["adapter"].startswith(f"{tmp_path}/adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "model")  # the --pretrained it adapts
    assert adapter_config["auto_mapping"]["base_model_class"] == "AutoModel"
    merged = _state(tmp_path / "model")
    assert not any("lora_" in k for k in merged)  # merged back into plain weights
    source = _state(out / "model")
    assert merged.keys() == source.keys()


def test_evaluate_script(pretrained, tmp_path):
    out, _ = pretrained
    result = evaluate_script.main(["--model", str(out / "model"), "--synthetic-users", "120", "--synthetic-items",
                                   "60", "--split", "test", "--output", str(tmp_path / "m.json")])
    assert result["metrics"]["num_users"] == json.loads((tmp_path / "m.json").read_text())["metrics"]["num_users"]
    assert 0.0 <= result["metrics"]["hr@10"] <= 1.0


def test_sasrec_baseline_through_the_same_script(tmp_path):
    summary = pretrain.main(TINY + ["--model-type", "sasrec", "--max-steps", "3", "--eval-steps", "0",
                                    "--output-dir", str(tmp_path)])
    assert summary["global_step"] == 3
    from pmmrec_hf import SASRecModel

    assert isinstance(SASRecModel.from_pretrained(tmp_path / "model"), SASRecModel)


@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_weights(tmp_path):
    common = TINY + ["--max-steps", "6", "--save-steps", "3", "--eval-steps", "0", "--replace-prob", "0.3"]
    pretrain.main(common + ["--output-dir", str(tmp_path / "straight")])
    killed = pretrain.main(common + ["--output-dir", str(tmp_path / "killed"), "--stop-after-steps", "4"])
    assert killed["stopped"] and killed["global_step"] == 4
    assert (tmp_path / "killed" / "checkpoints" / "step_3").is_dir()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = pretrain.main(common + ["--output-dir", str(tmp_path / "killed"), "--resume-from-checkpoint", "latest"])
    assert resumed["global_step"] == 6
    straight, again = _state(tmp_path / "straight" / "model"), _state(tmp_path / "killed" / "model")
    assert straight.keys() == again.keys()
    for key in straight:  # bit-identical on CPU
        assert torch.equal(straight[key], again[key]), key


@pytest.mark.slow
def test_accelerate_launch_cpu_flag_runs_one_process_and_says_so(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process (Accelerate's CPU launcher needs MPI for
    # more); the script warns and points to the commands that do start two (tests/test_multiprocess.py runs them)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "examples" / "pretrain.py")] + TINY + ["--max-steps", "2", "--eval-steps", "0",
                                                            "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "starts ONE process" in result.stderr and "--multi_gpu" in result.stderr
    assert json.loads((tmp_path / "trainer_state.json").read_text())["num_processes"] == 1
    assert (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_short_pretraining_beats_most_popular(tmp_path):
    summary = pretrain.main(["--report-to", "none", "--max-steps", "120", "--eval-steps", "0",
                             "--output-dir", str(tmp_path)])
    final, popular = summary["eval_history"][-1], summary["popularity"]
    # measured with seed 0: about 0.42 against 0.25 for the most-popular baseline
    assert final["hr@10"] > popular["hr@10"] + 0.1, (final, popular)


def test_pretrain_streams_a_prepared_folder_and_logs_to_tensorboard(tmp_path):
    from pmmrec_hf.data import make_synthetic_dataset, read_metadata

    make_synthetic_dataset(num_items=60, num_users=120, seed=0, output_dir=tmp_path / "data")
    assert read_metadata(tmp_path / "data")["num_rows"]["train"] > 0
    summary = pretrain.main(TINY[4:6] + TINY[6:8] + ["--report-to", "tensorboard", "--dataset", str(tmp_path / "data"),
                                                     "--streaming", "--max-steps", "3", "--eval-steps", "0",
                                                     "--output-dir", str(tmp_path / "out")])
    assert summary["global_step"] == 3
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_train_fraction_and_repeated_targets_through_the_scripts(pretrained, tmp_path):
    out, _ = pretrained
    # one epoch of a quarter of the training users: ceil(ceil(users / 4) / batch) steps
    from pmmrec_hf.data.synthetic import make_synthetic_dataset

    users = len(make_synthetic_dataset(num_items=60, num_users=120, seed=0, max_length=20).splits["train"])
    summary = finetune.main(TINY[:4] + TINY[6:] + ["--pretrained", str(out / "model"), "--num-epochs", "1",
                                                  "--train-fraction", "0.25", "--eval-steps", "0",
                                                  "--output-dir", str(tmp_path / "ft")])
    assert summary["global_step"] == -(-(-(-users // 4)) // 8)
    ranked = evaluate_script.main(["--model", str(out / "model"), "--synthetic-users", "120", "--synthetic-items",
                                   "60", "--split", "test"])
    missed = evaluate_script.main(["--model", str(out / "model"), "--synthetic-users", "120", "--synthetic-items",
                                   "60", "--split", "test", "--repeated-targets", "miss"])
    assert (ranked["repeated_targets"], missed["repeated_targets"]) == ("rank", "miss")
    assert all(missed["metrics"][k] <= ranked["metrics"][k] for k in ranked["metrics"] if k != "num_users")


def test_zero_shot_evaluation_on_a_dataset_the_model_never_saw(pretrained, tmp_path):
    # no target training: the catalogue comes from the pre-trained item encoder, the user encoder runs as is
    from pmmrec_hf.data import make_synthetic_dataset

    make_synthetic_dataset(num_items=45, num_users=70, seed=7, output_dir=tmp_path / "target")
    out, _ = pretrained
    result = evaluate_script.main(["--model", str(out / "model"), "--dataset", str(tmp_path / "target"),
                                   "--split", "test"])
    assert result["metrics"]["num_users"] == 70 and result["dataset"] == str(tmp_path / "target")
    assert 0.0 <= result["metrics"]["ndcg@10"] <= result["metrics"]["hr@10"] <= 1.0
