"""The installed commands (pmmrec-train, -finetune, -evaluate, -push): console scripts, run-config files, default
output folders, thread choice, and failing fast when the Hub is off or unreachable."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pmmrec_hf.commands import environment, evaluate, finetune, push, train
from pmmrec_hf.commands.run_config import RUN_CONFIG_NAME

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = {"pmmrec-prepare": "pmmrec_hf.data.cli:main", "pmmrec-train": "pmmrec_hf.commands.train:cli",
            "pmmrec-finetune": "pmmrec_hf.commands.finetune:cli", "pmmrec-evaluate": "pmmrec_hf.commands.evaluate:cli",
            "pmmrec-push": "pmmrec_hf.commands.push:cli"}
TINY = {"synthetic_users": 120, "synthetic-items": 60, "batch_size": 8, "report_to": "none", "eval_steps": 0,
        "learning_rate": "1e-3"}


def _command(name):
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed (pip install -e .)")
        path = Path(found)
    return str(path)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def test_every_command_is_an_installed_console_script():
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("pmmrec-")}
    assert installed == COMMANDS
    for name in COMMANDS:
        assert Path(_command(name)).is_file()


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~5-25 s on a busy 2-core machine
def test_train_help_from_a_fresh_process():
    result = subprocess.run([_command("pmmrec-train"), "--help"], capture_output=True, text=True, env=_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("usage: pmmrec-train [--config FILE] [options]")
    for group in ("run:", "data:", "model:", "objectives:", "training:", "examples:"):
        assert f"\n{group}\n" in out, group
    assert "(default: 32)" in out  # --batch-size
    assert "pmmrec-train --config run.yaml --learning-rate 1e-4" in out


@pytest.mark.parametrize("module", [train, finetune, evaluate, push])
def test_every_command_has_grouped_help_with_examples(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: {module.PROG} [--config FILE]" in out and "\nexamples:\n" in out and "--config FILE" in out


# --------------------------------------------------------------------------------------------------------------------
# run-config files
# --------------------------------------------------------------------------------------------------------------------


def test_a_config_file_sets_options_and_flags_override_it(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1e-4\nmodel-type: sasrec\nbatch_size: 16\n"
                                       "dataset: [synthetic]\nstreaming: false\n")
    args = train.parse_args(["--config", str(tmp_path / "run.yaml"), "--batch-size", "4"])
    assert (args.learning_rate, args.model_type, args.batch_size, args.dataset) == (1e-4, "sasrec", 4, ["synthetic"])
    assert args.output_dir == os.path.join("outputs", "pretrain", "sasrec")  # the default follows the file's type
    (tmp_path / "eval.json").write_text(json.dumps({"model": "outputs/finetune/full/model", "split": "validation"}))
    args = evaluate.parse_args(["--config", str(tmp_path / "eval.json")])  # a required option from the file
    assert (args.model, args.split) == ("outputs/finetune/full/model", "validation")


@pytest.mark.parametrize("text,message", [
    ("learning_rat: 0.1\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("batch_size: many\n", "key 'batch_size': invalid literal for int()"),
    ("batch_size: 2.5\n", "key 'batch_size' takes an integer, got 2.5"),
    ("model_type: bert\n", "key 'model_type': 'bert' is not one of pmmrec, sasrec"),
    ("streaming: 1\n", "key 'streaming' takes true or false, got 1"),
    ("- learning_rate\n", "must hold a mapping of option names to values, not a list"),
    ("learning_rate: [1\n", "not valid YAML"),
])
def test_a_bad_config_file_is_an_error_naming_the_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {path}" in err and message in err, err


def test_a_config_file_of_another_format_or_missing_is_refused(tmp_path, capsys):
    (tmp_path / "run.toml").write_text("x = 1\n")
    for path, message in ((tmp_path / "run.toml", "use a .yaml, .yml or .json file"),
                          (tmp_path / "none.yaml", "no such file")):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--config", str(path)])
        assert message in capsys.readouterr().err


def test_default_output_folders_do_not_collide():
    assert train.parse_args([]).output_dir == os.path.join("outputs", "pretrain", "pmmrec")
    assert train.parse_args(["--model-type", "sasrec"]).output_dir == os.path.join("outputs", "pretrain", "sasrec")
    assert finetune.parse_args([]).output_dir == os.path.join("outputs", "finetune", "full")
    assert finetune.parse_args(["--lora"]).output_dir == os.path.join("outputs", "finetune", "full-lora")
    args = finetune.parse_args(["--setting", "item_encoder", "--lora"])
    assert args.output_dir == os.path.join("outputs", "finetune", "item_encoder-lora")
    assert finetune.setting_name(args) == "item_encoder+lora"
    assert train.parse_args(["--output-dir", "mine"]).output_dir == "mine"


# --------------------------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------------------------


def test_thread_choice_does_not_oversubscribe():
    assert environment.choose_num_threads(8, 1)[0] == 8
    assert environment.choose_num_threads(8, 2)[0] == 4  # two processes on the node share the cores
    assert environment.choose_num_threads(2, 4)[0] == 1  # never 0
    count, reason = environment.choose_num_threads(2, 1, load_average=4.5)  # a busy 2-core machine
    assert count == 1 and "load average (4.5)" in reason
    assert environment.choose_num_threads(16, 1, load_average=3.2)[0] == 13
    assert environment.choose_num_threads(16, 2, load_average=0.0)[0] == 8


def test_num_threads_is_applied_and_printed(monkeypatch):
    import torch

    before = torch.get_num_threads()
    lines = []
    try:
        assert environment.set_torch_threads(1, print_fn=lines.append) == 1
        assert torch.get_num_threads() == 1 and lines == ["torch threads: 1 (--num-threads; set with --num-threads)"]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        environment.set_torch_threads(None, print_fn=lines.append)
        assert lines[-1].startswith("torch threads: 1 (OMP_NUM_THREADS")
        with pytest.raises(ValueError, match="--num-threads must be >= 1"):
            environment.set_torch_threads(0)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------------
# the Hub: fail fast, once
# --------------------------------------------------------------------------------------------------------------------


def _closed_port_endpoint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def test_hub_ids_are_told_from_local_paths(tmp_path):
    (tmp_path / "model").mkdir()
    assert environment.hub_repo_ids(str(tmp_path / "model"), None, "synthetic", "me/pmmrec", "bert-base-uncased",
                                    "outputs/finetune/full/model", "me/pmmrec") == ["me/pmmrec", "bert-base-uncased"]


def test_an_unreachable_hub_fails_fast_with_one_message(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_endpoint())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    code = finetune.cli(["--pretrained", "someone/pmmrec-never-downloaded", "--output-dir", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1 and elapsed < 20, (code, elapsed)
    assert err.count("someone/pmmrec-never-downloaded") == 1 and "did not answer" in err
    assert "not in the local cache" in err and not (tmp_path / "out").exists()


def test_offline_mode_refuses_what_is_not_cached_and_uses_what_is(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert evaluate.cli(["--model", "someone/missing"]) == 1
    err = capsys.readouterr().err
    assert "pmmrec-evaluate: error: pmmrec-evaluate: HF_HUB_OFFLINE is set, and someone/missing is not in the " \
           "local cache" in err
    # a repo in the cache: used offline, one warning
    snapshot = tmp_path / "cache" / "models--someone--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "cache" / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "cache" / "models--someone--cached" / "refs" / "main").write_text("a" * 40)
    environment.ensure_hub_access(["someone/cached"], "pmmrec-evaluate")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "using the cached someone/cached offline" in err


def test_push_needs_the_hub_and_says_so_at_once(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "ckpt").mkdir()
    assert push.cli(["--checkpoint", str(tmp_path / "ckpt"), "--item-encoder-repo", "me/x"]) == 1
    assert "pmmrec-push needs the Hub, but HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert push.cli(["--checkpoint", str(tmp_path / "ckpt"), "--item-encoder-repo", "me/x",
                     "--endpoint", _closed_port_endpoint()]) == 1
    assert "did not answer" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# the whole chain, installed commands in fresh processes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_train_finetune_evaluate_chain_with_config_files(tmp_path):
    env = _env()

    def run(name, *args):
        result = subprocess.run([_command(name), *args], capture_output=True, text=True, env=env, timeout=600,
                                cwd=tmp_path)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        return result.stdout + result.stderr

    # raw files, as a user has them: 60 text-only items in 6 categories, 120 users moving through categories
    words = ["red", "blue", "wool", "cotton", "summer", "winter"]
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"item_id": f"i{i}", "title": f"{words[i % 6]} item {i}"}) + "\n" for i in range(60)))
    rows = ["user,item,ts"] + [f"u{u},i{(u + 6 * t + t % 2) % 60},{t}" for u in range(120) for t in range(8)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    run("pmmrec-prepare", "--interactions", "log.csv", "--items", "items.jsonl", "--output", "data/mine",
        "--user-col", "user", "--item-col", "item", "--item-id-col", "item_id", "--time-col", "ts", "--text-cols", "title",
        "--no-progress")
    (tmp_path / "pretrain.yaml").write_text("\n".join(f"{k}: {v}" for k, v in {
        **TINY, "hidden_size": 16, "max_steps": 4, "dataset": "data/mine", "modality": "text"}.items()))
    out = run("pmmrec-train", "--config", "pretrain.yaml", "--max-steps", "2")  # the flag overrides the file
    pretrain_dir = tmp_path / "outputs" / "pretrain" / "pmmrec"
    assert json.loads((pretrain_dir / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((pretrain_dir / "model" / "config.json").read_text())["item_encoder_config"]["hidden_size"] == 16
    saved = json.loads((pretrain_dir / RUN_CONFIG_NAME).read_text())
    assert saved["max_steps"] == 2 and saved["learning_rate"] == 1e-3 and saved["dataset"] == ["data/mine"]
    assert "saved:" in out and f"full model    {Path('outputs/pretrain/pmmrec/model')}" in out
    assert "torch threads: 1 (OMP_NUM_THREADS" in out

    (tmp_path / "finetune.json").write_text(json.dumps({**TINY, "max_steps": 3, "dataset": "data/mine", "lora": True,
                                                        "lora_r": 2}))
    out = run("pmmrec-finetune", "--config", "finetune.json", "--pretrained", "outputs/pretrain/pmmrec/model",
              "--learning-rate", "5e-4")
    finetune_dir = tmp_path / "outputs" / "finetune" / "full-lora"
    assert json.loads((finetune_dir / "trainer_state.json").read_text())["global_step"] == 3
    assert json.loads((finetune_dir / RUN_CONFIG_NAME).read_text())["learning_rate"] == 5e-4
    assert (finetune_dir / "adapter" / "adapter_config.json").is_file()
    assert '"setting": "full+lora"' in out and "saved:" in out

    out = run("pmmrec-evaluate", "--model", "outputs/finetune/full-lora/model", "--dataset", "data/mine",
              "--output", "metrics.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metrics"]["num_users"] == 120 and metrics["model"] == "outputs/finetune/full-lora/model"
    assert "metrics  metrics.json" in out


@pytest.mark.slow
def test_the_train_module_runs_under_accelerate_launch(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pmmrec_hf.commands.train",
           "--synthetic-users", "60", "--synthetic-items", "30", "--hidden-size", "16", "--batch-size", "4",
           "--report-to", "none", "--max-steps", "2", "--eval-steps", "0", "--max-eval-users", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "outputs" / "pretrain" / "pmmrec" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["num_processes"] == 1
    assert "saved:" in result.stdout


def test_the_package_builds_its_data_files_without_setuptools_warnings(tmp_path):
    # the templates and the evaluate metric are data folders: listed as (namespace) packages, so setuptools
    # installs them without its "Package ... is absent from the `packages` configuration" warnings
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "absent from the `packages`" not in output and "Package would be ignored" not in output, output[-3000:]
    built = tmp_path / "pmmrec_hf"
    for path in ("templates/model_card_template.md", "evaluate_metrics/pmmrec_ranking/pmmrec_ranking.py",
                 "evaluate_metrics/pmmrec_ranking/README.md", "commands/train.py"):
        assert (built / path).is_file(), path
    assert not (built / "testing").exists() and not list(tmp_path.rglob("hub_server.py"))  # tests stay out
