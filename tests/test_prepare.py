"""The importer on small tables written here: the split, every bad-input case with exact counts, the
clear errors, the table formats, presets on hand-made layouts, the CLI."""

import io
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pmmrec_hf.data import (
    COUNT_NAMES,
    build_splits,
    leave_one_out,
    load_items,
    load_prepared,
    prepare_dataset,
    prepare_preset,
    read_metadata,
)
from pmmrec_hf.data import cli

# ---- the split ------------------------------------------------------------------------------------


def test_leave_one_out_by_hand():
    assert leave_one_out(["a", "b"]) is None
    assert leave_one_out(["a", "b", "c"]) == (["a"], ["a", "b"], ["a", "b", "c"])
    seq = [f"x{k}" for k in range(30)]
    train, valid, test = leave_one_out(seq, max_length=20)
    assert test == seq[7:]  # the last L + 3 = 23
    assert valid == seq[7:29] and valid[-1] == "x28"  # validation target s[-2]
    assert train == seq[7:28] and len(train) == 21  # L + 1: every position a target
    assert leave_one_out(seq, max_length=2) == (["x25", "x26", "x27"], ["x25", "x26", "x27", "x28"], seq[25:])
    with pytest.raises(ValueError, match="min_length"):
        leave_one_out(seq, min_length=2)


def test_build_splits_counts():
    splits, counts = build_splits(
        [("u1", ["a", "b"], [1, 2]), ("u2", list("abcdef"), [1, 2, 3, 4, 5, 6])], max_length=1
    )
    assert splits["test"] == {"user_id": ["u2"], "item_ids": [list("cdef")], "timestamps": [[3, 4, 5, 6]]}
    assert splits["train"]["item_ids"] == [["c", "d"]]
    assert counts == dict(users=1, interactions=4, users_too_short=1, interactions_too_short_users=2,
                          interactions_truncated=2)


# ---- a small dataset with every kind of bad input -------------------------------------------------


def _jpeg(color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


ITEMS = pd.DataFrame(
    {
        "item_id": ["i1", "i2", "i3", "i4", "i5", "i6", "i1", None, "i8", "i9"],
        "title": ["Alpha", "Beta", None, "Delta", "Eps", "Zeta", "Alpha dup", "NoId", "Eta", "Theta"],
        "genres": ["Drama", None, None, "Comedy", "X", "Y", "Z", "W", "V", "U"],
    }
)
INTERACTIONS = pd.DataFrame(
    [
        ("u1", "i1", "10"), ("u2", "i6", "5"), ("u1", "i2", "20"), ("u1", "i3", "20"), ("u2", "i1", "5"),
        ("u1", "i1", "10"),  # exact duplicate
        ("u3", "i9", "1"), ("u1", "i4", "30"), ("u2", "i2", "1"), ("u4", "i1", "1"),
        (None, "i1", "3"),  # missing user
        ("u4", "i2", "2"),
        ("u4", "i99", "3"),  # unknown item
        ("u1", "i5", "40"), ("u3", "i1", "2"), ("u4", "i3", "4"),
        ("u2", "i2", "notatime"),  # bad time
        ("u5", "i1", "1"), ("u5", "i2", "2"), ("u5", "i3", "3"), ("u5", "i4", "4"), ("u5", "i5", "5"),
        ("u5", "i6", "6"), ("u5", "i1", "7"),
    ],
    columns=["user_id", "item_id", "timestamp"],
)


def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for item in ("i1", "i2", "i3", "i8", "i9"):
        (folder / f"{item}.jpg").write_bytes(_jpeg())
    (folder / "i5.jpg").write_bytes(b"this is not an image")
    (folder / "i6.jpg").write_bytes(_jpeg()[:-200])  # truncated: header fine, data cut
    # i4.jpg is missing


def _write(df, path):
    kind = path.suffix
    if kind == ".csv":
        df.to_csv(path, index=False)
    elif kind == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif kind == ".parquet":
        df.to_parquet(path, index=False)
    elif kind == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    return path


@pytest.fixture
def toy(tmp_path):
    _write_images(tmp_path / "img")
    return tmp_path


def _prepare(folder, ext=".csv", **kwargs):
    options = dict(text_cols=["title", "genres"], text_separator=". ", image_pattern="img/{item_id}.jpg",
                   max_length=2, progress=False, verbose=False)
    options.update(kwargs)
    return prepare_dataset(
        _write(INTERACTIONS, folder / f"interactions{ext}"), _write(ITEMS, folder / f"items{ext}"),
        folder / f"out{ext}", **options,
    )


def _sequences(folder):
    ds = load_prepared(folder, cache_dir=folder.parent / "hf-cache")
    return {split: {r["user_id"]: r["item_ids"] for r in ds[split]} for split in ds}


BASE_COUNTS = dict(
    items_read=10, items_missing_id=1, items_duplicate=1, interactions_read=24, users_read=5,
    interactions_outside_user_slice=0,
    interactions_missing_field=1, interactions_bad_time=1, interactions_duplicate=1, interactions_unknown_item=1,
    items_added_from_interactions=0, items_without_interactions=1, texts_missing=1, images_missing=1,
    images_undecodable=2, items_dropped_no_text=0, items_dropped_no_image=0, interactions_dropped_item=0,
    users_all_interactions_dropped=0, users_too_short=1, interactions_too_short_users=2, interactions_truncated=2,
    items_unused=1, users=4, items=6, interactions=16, items_with_text=5, items_with_image=3,
)


def test_every_bad_input_counted(toy):
    result = _prepare(toy)
    assert list(result.counts) == list(COUNT_NAMES)
    assert result.counts == BASE_COUNTS
    assert read_metadata(result.folder)["counts"] == BASE_COUNTS
    seqs = _sequences(result.folder)
    # equal times keep the file order (u1: i2 then i3 at 20; u2: i6 then i1 at 5); u5 truncated to L+3 = 5
    assert seqs["test"] == {"u1": ["i1", "i2", "i3", "i4", "i5"], "u2": ["i2", "i6", "i1"], "u4": ["i1", "i2", "i3"],
                            "u5": ["i3", "i4", "i5", "i6", "i1"]}
    assert seqs["validation"]["u1"] == ["i1", "i2", "i3", "i4"] and seqs["validation"]["u2"] == ["i2", "i6"]
    assert seqs["train"] == {"u1": ["i1", "i2", "i3"], "u2": ["i2"], "u4": ["i1"], "u5": ["i3", "i4", "i5"]}
    ds = load_prepared(result.folder, split="test", cache_dir=toy / "hf-cache")
    assert ds[0]["timestamps"] == [10, 20, 20, 30, 40]

    items, index = load_items(result.folder, cache_dir=toy / "hf-cache")
    assert index == {"i1": 0, "i2": 1, "i3": 2, "i4": 3, "i5": 4, "i6": 5}  # items-table order
    assert items["text"] == ["Alpha. Drama", "Beta", "", "Delta. Comedy", "Eps. X", "Zeta. Y"]
    assert [im is not None for im in items["image"]] == [True, True, True, False, False, False]
    assert items["train_count"] == [2, 2, 2, 1, 1, 0]


def test_require_images(toy):
    result = _prepare(toy, require_images=True)
    assert result.counts == {
        **BASE_COUNTS, "items_dropped_no_image": 3, "interactions_dropped_item": 6, "users_too_short": 2,
        "interactions_too_short_users": 4, "interactions_truncated": 0, "items_unused": 1, "users": 3, "items": 3,
        "interactions": 10, "items_with_text": 2, "items_with_image": 3,
    }
    assert _sequences(result.folder)["test"] == {"u1": ["i1", "i2", "i3"], "u4": ["i1", "i2", "i3"],
                                                  "u5": ["i1", "i2", "i3", "i1"]}


def test_require_text(toy):
    result = _prepare(toy, require_text=True)
    assert result.counts == {
        **BASE_COUNTS, "items_dropped_no_text": 1, "interactions_dropped_item": 3, "users_too_short": 2,
        "interactions_too_short_users": 4, "interactions_truncated": 1, "items_unused": 1, "users": 3, "items": 5,
        "interactions": 12, "items_with_text": 5, "items_with_image": 2,
    }
    assert _sequences(result.folder)["test"]["u5"] == ["i2", "i4", "i5", "i6", "i1"]


def test_unknown_items_kept(toy):
    result = _prepare(toy, unknown_items="keep")
    assert result.counts == {
        **BASE_COUNTS, "interactions_unknown_item": 0, "items_added_from_interactions": 1, "texts_missing": 2,
        "images_missing": 2, "items": 7, "interactions": 17,
    }
    assert _sequences(result.folder)["test"]["u4"] == ["i1", "i2", "i99", "i3"]
    items, index = load_items(result.folder, cache_dir=toy / "hf-cache")
    assert index["i99"] == 6 and items[6]["text"] == "" and items[6]["image"] is None


def test_user_whose_interactions_all_go_is_counted(tmp_path):
    inter = pd.DataFrame({"user_id": ["a", "a", "a", "b", "b", "c"], "item_id": ["x", "y", "z", "q", "q", "x"],
                          "timestamp": [1, 2, 3, 1, 2, 1]})
    items = pd.DataFrame({"item_id": ["x", "y", "z"], "text": ["X", "Y", "Z"]})
    c = prepare_dataset(inter, items, tmp_path / "out", progress=False, verbose=False).counts
    assert (c["users_read"], c["users_all_interactions_dropped"], c["users_too_short"], c["users"]) == (3, 1, 1, 1)
    assert c["interactions_unknown_item"] == 2 and c["interactions_too_short_users"] == 1


def test_max_users_keeps_the_first_users_in_file_order(toy):
    result = _prepare(toy, max_users=2)  # u1 and u2 (the missing-user row is still counted as such)
    assert result.counts["interactions_outside_user_slice"] == 13 and result.counts["users_read"] == 2
    assert result.counts["interactions_missing_field"] == 1
    assert result.counts["users"] == 2 and result.counts["interactions"] == 8
    assert set(_sequences(result.folder)["test"]) == {"u1", "u2"}


@pytest.mark.parametrize("ext", [".tsv", ".parquet", ".jsonl"])
def test_every_table_format_gives_the_same_result(toy, ext):
    reference = _prepare(toy, ".csv")
    result = _prepare(toy, ext)
    assert result.counts == reference.counts
    assert _sequences(result.folder) == _sequences(reference.folder)


def test_text_template_and_image_column(tmp_path):
    """Images as bytes in a Parquet column; date times; a text template with a format spec."""
    items = pd.DataFrame({"sku": ["a1", "b2", "c3"], "name": ["Cup", "Pen", None], "kind": ["Mug", "Ink", None],
                          "photo": [_jpeg(), None, b"garbage"]})
    inter = pd.DataFrame({"who": ["x"] * 3 + ["y"] * 3, "sku": ["a1", "b2", "c3", "c3", "b2", "a1"],
                          "when": ["2020-01-02", "2020-01-01", "2020-01-03", "2021-05-05", "2021-05-04", "2021-05-06"]})
    items.to_parquet(tmp_path / "items.parquet")
    result = prepare_dataset(
        _write(inter, tmp_path / "inter.csv"), tmp_path / "items.parquet", tmp_path / "out",
        user_col="who", item_col="sku", time_col="when", text_template="{name} ({kind}) #{item_id:.1}",
        image_col="photo", progress=False, verbose=False,
    )
    c = result.counts
    assert (c["images_missing"], c["images_undecodable"], c["items_with_image"], c["texts_missing"]) == (1, 1, 1, 1)
    seqs = load_prepared(result.folder, split="test", cache_dir=tmp_path / "hf-cache")
    assert seqs[0] == {"user_id": "x", "item_ids": ["b2", "a1", "c3"],
                       "timestamps": [1577836800, 1577923200, 1578009600]}  # 2020-01-01..03 UTC
    items_ds, _ = load_items(result.folder, cache_dir=tmp_path / "hf-cache")
    assert items_ds["text"] == ["Cup (Mug) #a", "Pen (Ink) #b", ""]


def test_headerless_file_without_time(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\n1\t11\n1\t12\n2\t10\n")
    (tmp_path / "items.tsv").write_text("item\ttitle\n10\tTen\n11\tEleven\n12\tTwelve\n")
    result = prepare_dataset(
        tmp_path / "u.data", tmp_path / "items.tsv", tmp_path / "out", interactions_columns=["user", "item"],
        user_col="user", item_col="item", time_col=None, text_cols=["title"], progress=False, verbose=False,
    )
    assert result.counts["users"] == 1 and result.counts["users_too_short"] == 1
    row = load_prepared(result.folder, split="test", cache_dir=tmp_path / "hf-cache")[0]
    assert row == {"user_id": "1", "item_ids": ["10", "11", "12"], "timestamps": [0, 1, 2]}  # row numbers


# ---- clear errors ---------------------------------------------------------------------------------


def test_non_utf8_text_names_file_and_line(toy):
    path = toy / "items.csv"
    path.write_bytes("item_id,title,genres\ni1,Alpha,Drama\ni2,Beta,X\ni3,Caf\xe9,Y\n".encode("latin-1"))
    _write(INTERACTIONS, toy / "interactions.csv")
    with pytest.raises(ValueError, match=r"items\.csv: line 4, byte 7 of that line is not valid utf-8") as err:
        prepare_dataset(toy / "interactions.csv", path, toy / "out", text_cols=["title"], verbose=False)
    assert str(path) in str(err.value) and "latin-1" in str(err.value)
    result = prepare_dataset(toy / "interactions.csv", path, toy / "out", text_cols=["title"], encoding="latin-1",
                             max_length=2, progress=False, verbose=False)
    items, index = load_items(result.folder, cache_dir=toy / "hf-cache")
    assert items[index["i3"]]["text"] == "Café"


@pytest.mark.parametrize(
    "kwargs, table, column",
    [
        (dict(text_cols=["title", "year"]), "items.csv", "year"),
        (dict(text_template="{title} {plot}"), "items.csv", "plot"),
        (dict(text_cols=["title"], time_col="ts"), "interactions.csv", "ts"),
        (dict(text_cols=["title"], user_col="customer"), "interactions.csv", "customer"),
        (dict(text_cols=["title"], image_col="poster"), "items.csv", "poster"),
        (dict(text_cols=["title"], image_pattern="{folder}/{item_id}.jpg"), "items.csv", "folder"),
    ],
)
def test_missing_column_names_file_and_column(toy, kwargs, table, column):
    _write(INTERACTIONS, toy / "interactions.csv")
    _write(ITEMS, toy / "items.csv")
    with pytest.raises(ValueError, match=rf"{table}: missing column '{column}'") as err:
        prepare_dataset(toy / "interactions.csv", toy / "items.csv", toy / "out", verbose=False, **kwargs)
    assert str(toy / table) in str(err.value)


def test_invalid_options(toy):
    with pytest.raises(ValueError, match="image source"):
        _prepare(toy, image_pattern=None, require_images=True)
    with pytest.raises(ValueError, match="unknown_items"):
        _prepare(toy, unknown_items="ignore")
    with pytest.raises(ValueError, match="not both"):
        _prepare(toy, text_template="{title}")


# ---- presets on hand-made layouts -----------------------------------------------------------------


class PixelRecord:
    """Like the research code's LMDB record: raw pixels plus their shape."""

    def __init__(self, array):
        self.image, self.size, self.channels = array.tobytes(), array.shape[:2], array.shape[2]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pmmrec_preset_with_lmdb(tmp_path, monkeypatch):
    lmdb = pytest.importorskip("lmdb", reason="the pmmrec preset's LMDB images need the optional 'lmdb' package")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.tsv").write_text("u1\t1 2 3 4\nu2\t5 1 2\nu3\t3 4\n")
    (tmp_path / "items_texts.tsv").write_text("1\tone\n2\ttwo\n3\tthree\n4\tfour\n5\tfive\n")
    pixels = np.full((4, 6, 3), 77, dtype=np.uint8)
    env = lmdb.open(str(tmp_path / "images.lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"1", pickle.dumps(np.frombuffer(_jpeg(), dtype=np.uint8)))  # an encoded file as uint8
        txn.put(b"2", pickle.dumps(pixels))  # raw pixels
        txn.put(b"3", pickle.dumps(PixelRecord(pixels)))  # a research-code style record
        txn.put(b"4", pickle.dumps(Evil()))  # never executed: counted as undecodable
        # 5: absent
    env.close()
    result = prepare_preset("pmmrec", tmp_path, tmp_path / "out", progress=False, verbose=False)
    assert not (tmp_path / "pwned").exists()
    c = result.counts
    assert (c["users"], c["users_too_short"], c["items"], c["interactions"]) == (2, 1, 5, 7)
    assert (c["items_with_image"], c["images_missing"], c["images_undecodable"]) == (3, 1, 1)
    seqs = load_prepared(result.folder, split="test", cache_dir=tmp_path / "hf-cache")
    assert seqs[0] == {"user_id": "u1", "item_ids": ["1", "2", "3", "4"], "timestamps": [0, 1, 2, 3]}
    items, index = load_items(result.folder, cache_dir=tmp_path / "hf-cache")
    assert items[index["2"]]["image"].size == (6, 4) and items[index["3"]]["image"].getpixel((0, 0)) == (77, 77, 77)
    assert items[index["5"]]["text"] == "five"


def test_recbole_preset(tmp_path):
    (tmp_path / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "a\tm1\t5\t3\na\tm2\t4\t1\na\tm3\t3\t2\nb\tm1\t1\t1\n"
    )
    (tmp_path / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:float\tgenre:token_seq\n"
        'm1\t"Quoted" Title\t1999\tDrama\nm2\tOther\t2001\tComedy Drama\nm3\tThird\t2002\t\n'
    )
    result = prepare_preset("recbole", tmp_path, tmp_path / "out", progress=False, verbose=False)
    assert result.metadata["name"] == "toy"
    row = load_prepared(result.folder, split="test", cache_dir=tmp_path / "hf-cache")[0]
    assert row["item_ids"] == ["m2", "m3", "m1"]
    items, index = load_items(result.folder, cache_dir=tmp_path / "hf-cache")
    assert items[index["m1"]]["text"] == '"Quoted" Title. Drama'  # tab files are not quoted
    assert items[index["m3"]]["text"] == "Third"


def test_unknown_preset_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        prepare_preset("nope", tmp_path, tmp_path / "out")
    with pytest.raises(TypeError, match="no option"):
        from pmmrec_hf.data import preset_kwargs

        preset_kwargs("hm", tmp_path, lmdb_path="x")


# ---- push to hub (a thin call, checked against a stand-in for HfApi) ------------------------------


def test_push_to_hub_calls_upload_folder(toy, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://hub.example/datasets/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = _prepare(toy, push_to_hub="me/toy", token="tok", private=True)
    assert result.hub_url == "https://hub.example/datasets/me/toy"
    assert calls[0] == ("init", "tok")
    assert calls[1] == ("create_repo", "me/toy", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls[2][1]["folder_path"] == str(result.folder) and calls[2][1]["repo_type"] == "dataset"


# ---- the CLI --------------------------------------------------------------------------------------


def test_cli_generic(toy, capsys):
    _write(INTERACTIONS, toy / "interactions.csv")
    _write(ITEMS, toy / "items.csv")
    rc = cli.main([
        "--interactions", str(toy / "interactions.csv"), "--items", str(toy / "items.csv"),
        "--output", str(toy / "out"), "--text-cols", "title", "genres", "--text-separator", ". ",
        "--image-pattern", "img/{item_id}.jpg", "--max-length", "2", "--name", "toy", "--no-progress",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Prepared toy" in out and "users 4 | items 6 | interactions 16" in out
    assert "images found 3 of 6 items" in out and "interactions_duplicate" in out
    meta = json.loads((toy / "out" / "pmmrec_dataset.json").read_text())
    assert meta["counts"] == BASE_COUNTS


def test_cli_errors(toy, capsys):
    _write(INTERACTIONS, toy / "interactions.csv")
    _write(ITEMS, toy / "items.csv")
    rc = cli.main(["--interactions", str(toy / "interactions.csv"), "--items", str(toy / "items.csv"),
                   "--output", str(toy / "out"), "--text-cols", "plot"])
    assert rc == 1 and "missing column 'plot'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--preset", "hm", "--output", str(toy / "out")])  # no --source
    with pytest.raises(SystemExit):
        cli.main(["--preset", "hm", "--source", str(toy), "--lmdb", "x", "--output", str(toy / "out")])
