"""Every output is atomic: killed at every write boundary (first write and rewrite), what is left loads as
the previous complete version, or as the new one once it is in place, or fails clearly as absent; never as
a half-written one. The kill points come from ``pmmrec_hf.atomic_io.WRITE_BOUNDARIES``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmmrec_hf import atomic_io
from pmmrec_hf.data import cli
from pmmrec_hf.data.format import SPLITS, load_items, load_prepared, read_metadata, save_prepared
from pmmrec_hf.recommend import load_catalogue_file, save_catalogue_file
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel

from .killing import kill_at_every_boundary, run_child

NEW_VISIBLE_FROM = "after_rename:"  # the only boundary at which the new version is already in place


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if "pmmrec-" in p.name and p.name != atomic_io.MARKER)


# ---- prepared datasets ------------------------------------------------------------------------------


def _dataset(version: int):
    items = [{"item_id": f"i{k}", "text": f"v{version} item {k}"} for k in range(6)]
    rows = [{"user_id": f"u{u}", "item_ids": [f"i{(u + j) % 6}" for j in range(3 + version)],
             "timestamps": list(range(3 + version))} for u in range(4)]
    return items, {split: rows for split in SPLITS}, {"name": f"v{version}"}


def _write_dataset(folder: Path, version: int) -> None:
    save_prepared(folder, *_dataset(version), num_shards=2)


def _dataset_version(folder: Path, cache: Path) -> int | None:
    """The version a user loads from `folder` (checked row by row), or None when it is absent (clear error)."""
    try:
        meta = read_metadata(folder)
    except FileNotFoundError as err:
        assert "no prepared dataset folder" in str(err) and str(folder) in str(err)
        return None
    version = int(meta["name"][1:])
    items, splits, _ = _dataset(version)
    test = load_prepared(folder, split="test", cache_dir=cache)
    assert test["item_ids"] == [r["item_ids"] for r in splits["test"]]
    loaded_items, _ = load_items(folder, decode_images=False, cache_dir=cache)
    assert loaded_items["text"] == [i["text"] for i in items]
    return version


@pytest.mark.parametrize("previous", [None, 1], ids=["first-write", "rewrite"])
def test_prepared_dataset_killed_at_every_boundary_loads_the_previous_or_the_new_version(tmp_path, previous):
    folder = tmp_path / "out" / "prepared"
    checks = iter(range(10_000))

    def setup():
        shutil.rmtree(folder.parent, ignore_errors=True)
        if previous is not None:
            _write_dataset(folder, previous)

    def check(point):
        version = _dataset_version(folder, tmp_path / f"cache{next(checks)}")
        assert version == (2 if point.startswith(NEW_VISIBLE_FROM) else previous), point
        _write_dataset(folder, 2)  # the next write recovers: the new version, no leftovers
        assert read_metadata(folder)["name"] == "v2" and _leftovers(folder) == [], point

    hit = kill_at_every_boundary(setup, lambda: _write_dataset(folder, 2), check)
    names = {p.split(":")[0] for p in hit}
    assert {"folder_begun", "file_written", "before_marker", "before_rename", "after_rename"} <= names
    assert ("after_rename_aside" in names) == (previous is not None)
    assert sum(p.startswith("file_written:") for p in hit) == 9  # items, 3 splits x 2 shards, metadata, card


def test_prepared_dataset_without_its_marker_is_refused_clearly(tmp_path):
    folder = tmp_path / "prepared"
    _write_dataset(folder, 1)
    (folder / atomic_io.MARKER).unlink()
    with pytest.raises(ValueError, match=rf"{folder} is not a complete prepared dataset: it has no completeness "
                                         rf"marker {atomic_io.MARKER}"):
        load_prepared(folder)
    atomic_io.write_marker(folder)
    (folder / "test-00001-of-00002.parquet").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"test-00001-of-00002.parquet has 9 bytes, .* says \d+"):
        load_items(folder)


def _prepare_command(tmp_path: Path, out: Path) -> list[str]:
    """`pmmrec-prepare` of a small interactions + items CSV pair (written under tmp_path/src) into `out`, as a
    command line of its own process (``cmd[3:]`` are the CLI's arguments)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "inter.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + j) % 5},{j}\n" for u in range(4) for j in range(4)))
    (tmp_path / "src" / "items.csv").write_text("item_id,text\n" + "".join(f"i{k},item {k}\n" for k in range(5)))
    return [sys.executable, "-c", "import sys; from pmmrec_hf.data.cli import main; sys.exit(main(sys.argv[1:]))",
            "--interactions", str(tmp_path / "src" / "inter.csv"), "--items", str(tmp_path / "src" / "items.csv"),
            "--output", str(out), "--no-progress"]


@pytest.mark.slow
def test_a_killed_cli_reimport_keeps_the_previous_dataset(tmp_path):
    """The user's path: `pmmrec-prepare` in its own process, SIGKILLed between moving the old version aside
    and moving the new one in; the old dataset still loads, and the next run completes the new one."""
    out = tmp_path / "out"
    cmd = _prepare_command(tmp_path, out)
    assert cli.main(cmd[3:] + ["--name", "old"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", atomic_io.KILL_ENV: "after_rename_aside"}
    killed = subprocess.run(cmd + ["--name", "new"], capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists() and atomic_io.aside_path(out).is_dir()
    assert read_metadata(out)["name"] == "old" and len(load_prepared(out, split="test", cache_dir=tmp_path / "c")) == 4
    assert cli.main(cmd[3:] + ["--name", "new"]) == 0  # the next run puts the old one back, then replaces it
    assert read_metadata(out)["name"] == "new" and _leftovers(out) == []


# ---- save_pretrained --------------------------------------------------------------------------------


def _sasrec(seed: int) -> SASRecModel:
    torch.manual_seed(seed)
    return SASRecModel(SASRecConfig(num_items=7, hidden_size=8, intermediate_size=16, max_position_embeddings=4,
                                    num_hidden_layers=1))


@pytest.mark.parametrize("previous", [None, 1], ids=["first-write", "rewrite"])
def test_save_pretrained_killed_at_every_boundary_loads_the_previous_or_the_new_model(tmp_path, previous):
    """The folder is shared (a run folder: notes, checkpoints): those are never touched."""
    folder = tmp_path / "run"
    models = {1: _sasrec(1), 2: _sasrec(2)}

    def setup():
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "note.txt").write_text("kept")
        (folder / "notes.md").write_text("mine")
        if previous is not None:
            models[previous].save_pretrained(folder)

    def loaded_version() -> int | None:
        try:
            model = SASRecModel.from_pretrained(folder)
        except OSError as err:
            assert str(folder) in str(err)
            return None
        weights = model.item_embeddings.weight
        version = next(v for v, m in models.items() if torch.equal(m.item_embeddings.weight, weights))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, models[version].state_dict()[name]), name
        return version

    def check(point):
        assert loaded_version() == (2 if point.startswith(NEW_VISIBLE_FROM) else previous), point
        assert (folder / "notes.md").read_text() == "mine" and (folder / "checkpoints" / "note.txt").is_file()
        models[2].save_pretrained(folder)  # the next save completes
        saved = load_file(str(folder / "model.safetensors"))
        assert all(torch.equal(t, models[2].state_dict()[n]) for n, t in saved.items()), point
        assert not (folder / atomic_io.WRITING_RECORD).exists() and not (folder / atomic_io.PREVIOUS_FOLDER).exists()
        assert not atomic_io.tmp_path(folder).exists()

    hit = kill_at_every_boundary(setup, lambda: models[2].save_pretrained(folder), check)
    names = {p.split(":")[0] for p in hit}
    assert {"folder_begun", "before_rename", "file_written", "before_record_removed", "after_rename"} <= names
    assert ("file_moved_aside" in names) == (previous is not None)


def test_saving_over_a_sharded_model_removes_its_old_shards(tmp_path):
    folder = tmp_path / "m"
    _sasrec(1).save_pretrained(folder, max_shard_size="1KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    _sasrec(2).save_pretrained(folder)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert torch.equal(SASRecModel.from_pretrained(folder).item_embeddings.weight, _sasrec(2).item_embeddings.weight)


# ---- catalogues ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [None, 1], ids=["first-write", "rewrite"])
def test_catalogue_killed_at_every_boundary_loads_the_previous_one(tmp_path, previous):
    path = tmp_path / "catalogue.safetensors"
    catalogues = {v: ([f"i{k}" for k in range(5)], torch.full((5, 3), float(v))) for v in (1, 2)}

    def setup():
        path.unlink(missing_ok=True)
        if previous is not None:
            save_catalogue_file(str(path), *catalogues[previous])

    def check(point):
        if previous is None:
            assert not path.exists(), point
        else:
            ids, embeddings = load_catalogue_file(str(path))
            assert ids == catalogues[previous][0] and torch.equal(embeddings, catalogues[previous][1]), point
        save_catalogue_file(str(path), *catalogues[2])
        assert torch.equal(load_catalogue_file(str(path))[1], catalogues[2][1])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["catalogue.safetensors"]

    hit = kill_at_every_boundary(setup, lambda: save_catalogue_file(str(path), *catalogues[2]), check)
    assert hit == ["file_tmp_written:1"]


# ---- training checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    from pmmrec_hf.data.collator import PMMRecCollator
    from pmmrec_hf.data.synthetic import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(num_items=20, num_users=24, seed=0, output_dir=folder, max_length=6, image_size=4)
    items, _ = load_items(folder, decode_images=False)
    collator = PMMRecCollator(items, modality="ids", max_length=6)
    return collator, [dict(r) for r in load_prepared(folder, split="train")]


def _train(collator, rows, output_dir, **kw):
    from pmmrec_hf.training import TrainingConfig, train

    torch.manual_seed(0)
    model = SASRecModel(SASRecConfig(num_items=len(collator.items), hidden_size=8, intermediate_size=16,
                                     max_position_embeddings=6, num_hidden_layers=1))
    values = dict(output_dir=str(output_dir), batch_size=8, learning_rate=1e-2, max_steps=4, eval_steps=0,
                  save_steps=2, report_to="none", logging_steps=1)
    config = TrainingConfig(**{**values, **kw})
    return train(model, rows, collator, config)


@pytest.mark.slow
def test_training_killed_at_every_boundary_resumes_from_the_newest_complete_checkpoint(training_data, tmp_path):
    from pmmrec_hf.training import latest_checkpoint

    collator, rows = training_data
    out = tmp_path / "run"

    def setup():
        shutil.rmtree(out, ignore_errors=True)

    def check(point):
        latest = latest_checkpoint(str(out))
        if latest is not None:  # complete: its state names its step, its weights load
            step = int(Path(latest).name.removeprefix("step_"))
            assert json.loads((Path(latest) / "trainer_state.json").read_text())["global_step"] == step, point
            assert all(torch.isfinite(t).all() for t in load_file(str(Path(latest) / "model.safetensors")).values())
        folders = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
        assert all(name in ("step_2", "step_4") or atomic_io.is_work_name(name) for name in folders), (point, folders)

    # every boundary of a run with one checkpoint (step_2) and the final model
    hit = kill_at_every_boundary(setup, lambda: _train(collator, rows, out, max_steps=2), check)
    assert sum(p.startswith("before_marker:") for p in hit) == 1  # the checkpoint (the final save is in place)
    assert sum(p.startswith("before_record_removed:") for p in hit) == 1  # the final model
    assert "file_tmp_written:2" in hit  # eval_history.json and trainer_state.json of the final model

    # killed while writing step_4: `latest` resumes from step_2 and the run completes
    setup()
    assert run_child(lambda: _train(collator, rows, out), "before_rename:2") is None  # killed
    assert latest_checkpoint(str(out)).endswith("step_2")
    summary = _train(collator, rows, out, resume_from_checkpoint="latest")
    assert summary["global_step"] == 4 and [e["step"] for e in summary["log_history"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_resuming_from_an_incomplete_checkpoint_folder_names_it(training_data, tmp_path):
    collator, rows = training_data
    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"step_2 is not a complete checkpoint: it has no completeness marker"):
        _train(collator, rows, tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoints" / "step_2"))


# ---- one writer at a time ---------------------------------------------------------------------------


HOLD_A_WRITE = """
import sys
from pmmrec_hf.atomic_io import AtomicFolder
writer = AtomicFolder(sys.argv[1])
(writer.begin() / "half-written.txt").write_text("not complete")
print("begun", flush=True)
sys.stdin.readline()
writer.commit()
print("committed", flush=True)
"""


@pytest.mark.slow
def test_a_second_prepare_while_another_process_writes_the_folder_fails_clearly_and_touches_nothing(tmp_path):
    """The user's path: `pmmrec-prepare --output out` while another process is in the middle of writing `out`
    (found when two transfer benchmarks prepared one folder at once: the second deleted the first's temporary
    folder and died on a FileNotFoundError)."""
    out = tmp_path / "out"
    cmd = _prepare_command(tmp_path, out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_WRITE, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "begun"
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 1, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"pmmrec-prepare: error: Another process is writing {out} right now (it holds "
            f"{atomic_io.lock_path(out)}); nothing was written. Wait for it to finish, or write to another path.")
        assert (atomic_io.tmp_path(out) / "half-written.txt").is_file()  # the first write is untouched
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0 and atomic_io.is_complete(out) and (out / "half-written.txt").is_file()
    assert not atomic_io.lock_path(out).exists()  # the lock goes with the write
    assert cli.main(cmd[3:] + ["--overwrite"]) == 0  # once the first write is done, writing it works as usual
    assert len(load_prepared(out, split="test", cache_dir=tmp_path / "c")) == 4 and _leftovers(out) == []


def test_a_write_lock_is_exclusive_across_processes_and_freed_when_its_holder_dies(tmp_path):
    target = tmp_path / "model"
    lock = atomic_io.WriteLock(target)
    lock.acquire()
    try:
        probe = ("import sys\nfrom pmmrec_hf.atomic_io import InPlaceWrite, ConcurrentWriteError\n"
                 "try:\n    InPlaceWrite(sys.argv[1]).begin()\nexcept ConcurrentWriteError as e:\n"
                 "    print('refused', e)\nelse:\n    print('began')\n")
        result = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True,
                                timeout=120)
        assert result.stdout.startswith(f"refused Another process is writing {target} right now"), result.stderr
        assert not atomic_io.tmp_path(target).exists()  # refused before touching anything
    finally:
        lock.release()
    assert not atomic_io.lock_path(target).exists()
    # a holder killed mid-write leaves its lock file, but not its lock: the next write proceeds and cleans up
    env = {**os.environ, atomic_io.KILL_ENV: "folder_begun"}
    killed = subprocess.run([sys.executable, "-c", HOLD_A_WRITE, str(target)], capture_output=True, text=True,
                            timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert killed.returncode == -signal.SIGKILL and atomic_io.lock_path(target).exists()
    with atomic_io.atomic_folder(target) as tmp:
        (tmp / "x.txt").write_text("complete")
    assert atomic_io.is_complete(target) and _leftovers(target) == []
