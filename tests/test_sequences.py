"""Interaction files that hold whole sequences: one line per user, and RecBole / UniSRec sequential rows."""

from __future__ import annotations

import json

import pytest

from pmmrec_hf.data import load_prepared, prepare_dataset
from pmmrec_hf.data.cli import main as prepare_cli
from pmmrec_hf.data.sequences import read_sequence_benchmark, read_user_sequences


def _rows(df):
    return [tuple(r) for r in df[["user_id", "item_id", "position"]].itertuples(index=False)]


def test_user_sequences_are_read_in_order_and_bad_lines_counted(tmp_path):
    path = tmp_path / "user_sequence.txt"
    path.write_text("u1 a b c\n\nu2\nu3   b  a\nu1 z z\n")  # blank, no item, a repeated user
    df = read_user_sequences(path)
    assert _rows(df) == [("u1", "a", 0), ("u1", "b", 1), ("u1", "c", 2), ("u3", "b", 0), ("u3", "a", 1)]
    assert df.attrs["source_counts"] == {"source_lines_read": 5, "source_lines_skipped": 3, "source_rows_merged": 0,
                                         "source_rows_conflicting": 0}
    comma = tmp_path / "seq.csv"
    comma.write_text("u1,a b,c\n")
    assert _rows(read_user_sequences(comma, separator=",")) == [("u1", "a b", 0), ("u1", "c", 1)]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"u1 a b\nu2 \xff c\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2, byte 4 of that line is not valid utf-8"):
        read_user_sequences(bad)
    assert _rows(read_user_sequences(bad, encoding="latin-1"))[-1] == ("u2", "c", 1)


HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def test_sequential_benchmark_rows_are_merged_per_user(tmp_path):
    valid, test = tmp_path / "d.valid.inter", tmp_path / "d.test.inter"
    valid.write_text(HEADER + "0\t1 2 3\t4\n"      # a prefix of the test row
                     "1\t9 10 11\t12\n"            # the test row's window shifted one item earlier (a length cap)
                     "2\t5 6\t7\n"                 # disagrees with the test row
                     "3\t\t\n")                    # no target
    test.write_text(HEADER + "0\t1 2 3 4\t5\n1\t10 11 12\t13\n2\t5 8\t9\n4\t\t6\n")
    df = read_sequence_benchmark([valid, test])
    by_user = {}
    for user, item, position in _rows(df):
        by_user.setdefault(user, []).append(item)
        assert position == len(by_user[user]) - 1
    assert by_user == {"0": ["1", "2", "3", "4", "5"], "1": ["9", "10", "11", "12", "13"], "2": ["5", "8", "9"],
                       "4": ["6"]}
    assert df.attrs["source_counts"] == {"source_lines_read": 8, "source_lines_skipped": 1, "source_rows_merged": 2,
                                         "source_rows_conflicting": 1}
    wrong = tmp_path / "w.inter"
    wrong.write_text("user_id:token\titems:token_seq\titem_id:token\n0\t1\t2\n")
    with pytest.raises(ValueError, match=r"w.inter: missing column 'item_id_list'"):
        read_sequence_benchmark(wrong)


def test_prepare_and_the_cli_take_the_sequence_formats(tmp_path):
    (tmp_path / "seq.txt").write_text("".join(f"u{u} " + " ".join(f"i{(u + k) % 7}" for k in range(5)) + "\n"
                                              for u in range(6)) + "lonely\n")
    (tmp_path / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"i{i}\t\"item\tnumber {i}\"\n" for i in range(7)))
    result = prepare_dataset(tmp_path / "seq.txt", tmp_path / "items.tsv", tmp_path / "out", text_cols=["title"],
                             interactions_format="user-sequences", items_quoted=True, progress=False, verbose=False)
    counts = result.counts
    assert (counts["source_lines_read"], counts["source_lines_skipped"], counts["interactions_read"]) == (7, 1, 30)
    assert counts["users"] == 6 and counts["items"] == 7
    test = {r["user_id"]: r["item_ids"] for r in load_prepared(tmp_path / "out", split="test")}
    assert test["u0"] == ["i0", "i1", "i2", "i3", "i4"]  # the line's order is the time order
    meta = json.loads((tmp_path / "out" / "pmmrec_dataset.json").read_text())
    assert meta["counts"]["source_lines_skipped"] == 1
    from pmmrec_hf.data import load_items

    items, _ = load_items(tmp_path / "out", decode_images=False)
    assert "item\tnumber 3" in list(items["text"])  # a quoted field keeps its tab
    code = prepare_cli(["--interactions", str(tmp_path / "seq.txt"), "--items", str(tmp_path / "items.tsv"),
                        "--interactions-format", "user-sequences", "--items-quoted", "--text-cols", "title",
                        "--output", str(tmp_path / "cli"), "--no-progress"])
    assert code == 0
    assert json.loads((tmp_path / "cli" / "pmmrec_dataset.json").read_text())["counts"] == meta["counts"]
    with pytest.raises(ValueError, match="interactions_format must be one of"):
        prepare_dataset(tmp_path / "seq.txt", tmp_path / "items.tsv", tmp_path / "x", interactions_format="lines")


def test_train_fraction_subsets_are_seeded_nested_and_exact():
    from datasets import Dataset

    from pmmrec_hf.data import subset_users

    rows = [{"user_id": f"u{u}", "item_ids": ["a", "b"]} for u in range(40)]
    ds = Dataset.from_list(rows)
    tenth, quarter, whole = (subset_users(ds, f, seed=3) for f in (0.1, 0.25, 1.0))
    assert whole is ds and len(tenth) == 4 and len(quarter) == 10  # ceil(f * users)
    assert set(tenth["user_id"]) < set(quarter["user_id"])  # nested
    assert set(subset_users(rows[::-1], 0.25, seed=3)[i]["user_id"] for i in range(10)) == set(quarter["user_id"])
    assert set(subset_users(ds, 0.25, seed=4)["user_id"]) != set(quarter["user_id"])  # the seed matters
    # streaming: a hash threshold, a prefix of the same seeded order (so nested with the exact subsets too)
    stream = {f: {r["user_id"] for r in subset_users(ds.to_iterable_dataset(), f, seed=3)} for f in (0.25, 0.5)}
    assert stream[0.25] <= stream[0.5] and 0 < len(stream[0.5]) < 40
    assert stream[0.5] <= set(quarter["user_id"]) or set(quarter["user_id"]) <= stream[0.5]
    with pytest.raises(ValueError, match=r"--train-fraction\) must be in \(0, 1\]"):
        subset_users(ds, 0.0)
