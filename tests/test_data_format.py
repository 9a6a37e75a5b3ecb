"""The prepared folder: save_prepared / load_prepared / load_items / streaming / sharding."""

import io
import json

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from pmmrec_hf.data import (  # noqa: E402
    ITEMS_FILE,
    METADATA_FILE,
    load_items,
    load_prepared,
    read_metadata,
    save_prepared,
    shard_for_process,
)
from pmmrec_hf.atomic_io import MARKER, write_marker  # noqa: E402


def _jpeg(color=(200, 30, 30), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _sequences(n_users, n_items=7):
    """Deterministic toy splits: user k has the items k, k+1, ..., k+4 (mod n_items)."""
    splits = {s: [] for s in ("train", "validation", "test")}
    for k in range(n_users):
        s = [f"i{(k + j) % n_items}" for j in range(5)]
        t = [100 * k + j for j in range(5)]
        splits["train"].append({"user_id": f"u{k}", "item_ids": s[:-2], "timestamps": t[:-2]})
        splits["validation"].append({"user_id": f"u{k}", "item_ids": s[:-1], "timestamps": t[:-1]})
        splits["test"].append({"user_id": f"u{k}", "item_ids": s, "timestamps": t})
    return splits


def _items(tmp_path, n_items=7):
    path = tmp_path / "poster.png"
    Image.new("RGB", (5, 5), (0, 0, 255)).save(path)
    images = [_jpeg(), str(path), Image.new("RGB", (3, 3), (0, 255, 0)), lambda: _jpeg((1, 2, 3)), None]
    return [
        {"item_id": f"i{k}", "text": None if k == 6 else f"item {k}", "image": images[k] if k < len(images) else None}
        for k in range(n_items)
    ]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


@pytest.fixture(autouse=True)
def _no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after each full pass over a shuffled multi-shard parquet stream (a workaround
    for an Arrow thread-shutdown issue); tests need no such wait."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def test_round_trip(tmp_path, cache):
    folder = tmp_path / "prepared"
    meta = save_prepared(folder, _items(tmp_path), _sequences(4), {"name": "toy", "max_length": 20, "min_length": 3})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ITEMS_FILE, METADATA_FILE, "README.md", "train.parquet", "validation.parquet", "test.parquet", MARKER]
    )
    assert meta["files"]["train"] == ["train.parquet"]
    assert read_metadata(folder) == json.loads((folder / METADATA_FILE).read_text())
    assert read_metadata(folder)["name"] == "toy"
    assert read_metadata(folder)["num_rows"] == {"items": 7, "train": 4, "validation": 4, "test": 4}

    ds = load_prepared(folder, cache_dir=cache)
    assert set(ds) == {"train", "validation", "test"}
    assert ds["test"][1] == {"user_id": "u1", "item_ids": ["i1", "i2", "i3", "i4", "i5"],
                             "timestamps": [100, 101, 102, 103, 104]}
    assert ds["train"][1]["item_ids"] == ["i1", "i2", "i3"]
    assert load_prepared(folder, split="validation", cache_dir=cache)[3]["item_ids"] == ["i3", "i4", "i5", "i6"]

    items, index = load_items(folder, cache_dir=cache)
    assert index == {f"i{k}": k for k in range(7)}
    assert items.features["image"] == datasets.Image()
    assert items["text"] == [f"item {k}" for k in range(6)] + [""]
    # train_count: occurrences in train rows u0 [i0 i1 i2], u1 [i1 i2 i3], u2 [i2 i3 i4], u3 [i3 i4 i5]
    assert items["train_count"] == [1, 2, 3, 3, 2, 1, 0]
    assert items[0]["image"].size == (6, 4)  # JPEG bytes kept as given
    assert items[1]["image"].size == (5, 5)  # a path, read at write time
    assert items[2]["image"].getpixel((0, 0)) == (0, 255, 0)  # a PIL image, encoded
    assert items[3]["image"].size == (6, 4)  # a lazy loader
    assert items[4]["image"] is None and items[6]["image"] is None
    raw, _ = load_items(folder, decode_images=False, cache_dir=cache)
    assert raw[0]["image"]["bytes"] == _jpeg()
    assert raw[1]["image"]["path"] == "poster.png"


def test_plain_load_dataset_reads_the_card_configs(tmp_path, cache):
    """The README card lets datasets (and the Hub) read the folder without this package."""
    folder = tmp_path / "prepared"
    save_prepared(folder, _items(tmp_path), _sequences(3), {"name": "toy"})
    seqs = datasets.load_dataset(str(folder), cache_dir=str(cache))
    assert set(seqs) == {"train", "validation", "test"} and seqs["test"].num_rows == 3
    items = datasets.load_dataset(str(folder), "items", split="train", cache_dir=str(cache))
    assert items.num_rows == 7 and isinstance(items.features["image"], datasets.Image)


def test_sharded_files_streaming_equals_map_style(tmp_path, cache):
    folder = tmp_path / "prepared"
    meta = save_prepared(folder, _items(tmp_path), _sequences(23), max_rows_per_file=10)
    # ceil(23 / 10) = 3 files of nearly equal size, listed in order
    assert meta["files"]["train"] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    assert [datasets.Dataset.from_parquet(str(folder / f), cache_dir=str(cache)).num_rows
            for f in meta["files"]["train"]] == [7, 8, 8]
    mapped = load_prepared(folder, cache_dir=cache)
    streamed = load_prepared(folder, streaming=True, cache_dir=cache)
    for split in ("train", "validation", "test"):
        assert streamed[split].num_shards == 3
        assert list(streamed[split]) == list(mapped[split])
    assert [r["user_id"] for r in mapped["train"]] == [f"u{k}" for k in range(23)]


def test_rewrite_removes_old_shards(tmp_path):
    folder = tmp_path / "prepared"
    save_prepared(folder, _items(tmp_path), _sequences(5), num_shards=4)
    assert len(list(folder.glob("train-*.parquet"))) == 4
    save_prepared(folder, _items(tmp_path), _sequences(5))
    assert sorted(p.name for p in folder.glob("train*")) == ["train.parquet"]


@pytest.mark.parametrize("num_shards", [4, 3])  # 4: whole shards per process; 3: one row in two
@pytest.mark.parametrize("streaming", [True, False])
def test_two_processes_disjoint_and_complete(tmp_path, cache, num_shards, streaming):
    folder = tmp_path / "prepared"
    save_prepared(folder, _items(tmp_path), _sequences(30), num_shards=num_shards)
    split = load_prepared(folder, streaming=streaming, split="train", cache_dir=cache)
    parts = [[r["user_id"] for r in shard_for_process(split, rank, 2, seed=7, buffer_size=8)] for rank in (0, 1)]
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(f"u{k}" for k in range(30))
    if streaming and num_shards == 4:  # whole files: each process reads two of the four
        assert len(parts[0]) == len(parts[1]) == 15
    # the same seed gives the same order; another seed (shared by both processes) another split/order
    assert [r["user_id"] for r in shard_for_process(split, 0, 2, seed=7, buffer_size=8)] == parts[0]
    other = [[r["user_id"] for r in shard_for_process(split, rank, 2, seed=8, buffer_size=8)] for rank in (0, 1)]
    assert sorted(other[0] + other[1]) == sorted(parts[0] + parts[1]) and other[0] != parts[0]


def test_shard_for_process_checks_rank(tmp_path, cache):
    folder = tmp_path / "prepared"
    save_prepared(folder, _items(tmp_path), _sequences(2))
    with pytest.raises(ValueError, match="rank"):
        shard_for_process(load_prepared(folder, split="train", cache_dir=cache), 2, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda items, seqs: seqs["test"][0]["item_ids"].__setitem__(0, "nope"), "item 'nope' is not in the items"),
        (lambda items, seqs: items.append({"item_id": "i0", "text": "again"}), "item_id 'i0' occurs more than once"),
        (lambda items, seqs: seqs["train"][1]["timestamps"].pop(), "3 item_ids but 2 timestamps"),
        (lambda items, seqs: seqs.update(dev=[]), "unknown split names"),
    ],
)
def test_save_prepared_rejects_inconsistent_input(tmp_path, change, message):
    items, seqs = _items(tmp_path), _sequences(3)
    change(items, seqs)
    with pytest.raises(ValueError, match=message):
        save_prepared(tmp_path / "out", items, seqs)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared dataset folder"):
        load_prepared(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset folder"):
        read_metadata(tmp_path / "empty")


def test_folder_without_files_entry_is_read_by_name(tmp_path, cache):
    folder = tmp_path / "prepared"
    save_prepared(folder, _items(tmp_path), _sequences(6), num_shards=2)
    meta = json.loads((folder / METADATA_FILE).read_text())
    del meta["files"]
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    write_marker(folder)  # a folder edited by hand is marked complete again
    assert load_prepared(folder, split="test", cache_dir=cache).num_rows == 6


def test_hub_ids_resolve_to_hf_urls(monkeypatch):
    """A Hub id reads the metadata through huggingface_hub and the files through hf:// URLs."""
    from pmmrec_hf.data import format as fmt

    meta = {"files": {"items": ["items.parquet"], "train": ["train-00000-of-00002.parquet",
                                                             "train-00001-of-00002.parquet"]}}
    monkeypatch.setattr(fmt, "read_metadata", lambda repo, revision=None, token=None: meta)
    files, _ = fmt._data_files("me/toy", "refs/pr/1", None)
    assert files["train"] == [f"hf://datasets/me/toy@refs%2Fpr%2F1/train-0000{k}-of-00002.parquet" for k in (0, 1)]
    assert fmt._data_files("me/toy", None, None)[0]["items"] == ["hf://datasets/me/toy/items.parquet"]
    with pytest.raises(FileNotFoundError):
        fmt._is_local("./not/here")
