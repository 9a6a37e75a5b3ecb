"""`pmmrec-prepare --output`: a folder that is not a prepared dataset is never written over without
`--overwrite`, the source is never the output, and a re-import replaces the old dataset as a whole."""

from __future__ import annotations

import pytest

from pmmrec_hf.data import cli, read_metadata


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "inter.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + j) % 5},{j}\n" for u in range(6) for j in range(4)))
    (src / "items.csv").write_text("item_id,text\n" + "".join(f"i{k},item {k}\n" for k in range(5)))
    return src


def _run(source, output, *extra) -> int:
    return cli.main(["--interactions", str(source / "inter.csv"), "--items", str(source / "items.csv"),
                     "--output", str(output), "--no-progress", *extra])


def test_a_folder_that_is_not_a_prepared_dataset_is_not_overwritten_without_the_flag(source, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "test-results.txt").write_text("keep me")
    assert _run(source, mine) == 1
    err = capsys.readouterr().err
    assert f"--output {mine} exists and is not a prepared dataset" in err and "--overwrite" in err
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "test-results.txt"]
    assert (mine / "README.md").read_text() == "my notes"
    assert _run(source, mine, "--overwrite") == 0
    assert read_metadata(mine)["num_rows"]["test"] == 6
    assert (mine / "test-results.txt").read_text() == "keep me"  # not a name of ours: kept
    assert (mine / "README.md").read_text().startswith("---")  # ours: replaced by the dataset card


@pytest.mark.parametrize("where", ["the source folder", "around the source"])
def test_the_source_folder_is_never_the_output(source, capsys, where):
    output = source if where == "the source folder" else source.parent
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert _run(source, output, "--overwrite") == 1
    assert "holds the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_a_preset_refuses_its_source_as_output(source, capsys):
    assert cli.main(["--preset", "movielens-100k", "--source", str(source), "--output", str(source),
                     "--no-progress"]) == 1
    assert f"is the source folder {source} or holds it" in capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused_naming_it(source, tmp_path, capsys):
    (tmp_path / "out.txt").write_text("x")
    assert _run(source, tmp_path / "out.txt") == 1
    assert f"output folder (CLI --output) {tmp_path / 'out.txt'} is a file, not a folder" in capsys.readouterr().err


def test_a_reimport_replaces_the_old_dataset_as_a_whole_and_keeps_foreign_files(source, tmp_path):
    out = tmp_path / "out"
    assert _run(source, out, "--num-shards", "2") == 0
    (out / "notes.txt").write_text("mine")
    assert _run(source, out, "--num-shards", "1") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([".pmmrec-complete.json", "README.md", "items.parquet", "notes.txt", "pmmrec_dataset.json",
                            "test.parquet", "train.parquet", "validation.parquet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or aside folder left
