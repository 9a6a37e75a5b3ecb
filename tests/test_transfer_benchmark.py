"""Smoke test of benchmarks/transfer.py on synthetic stand-ins with tiny random backbones (no real data)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("transfer_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_benchmark_runs_every_row(tmp_path, capsys):
    bench = _load_script()
    output = tmp_path / "results.json"
    result = bench.main([
        "--quick", "--synthetic", "--tiny-backbones", "--work-dir", str(tmp_path / "work"), "--output", str(output),
        "--steps", "2", "--pretrain-steps", "2", "--seeds", "0", "--max-users", "40", "--batch-size", "8",
        "--hidden-size", "32", "--max-text-length", "16", "--image-size", "32",
    ])
    saved = json.loads(output.read_text())
    rows = [r for r in saved["rows"] if "test" in r]
    assert result["table"] == saved["table"]
    assert {(r["dataset"], r["setting"]) for r in rows if r["setting"] in bench.SETTINGS} == {
        (d, s) for d in bench.TARGETS for s in bench.SETTINGS
    }
    for row in rows:
        assert set(row["test"]) == set(bench.METRICS)
        assert all(0.0 <= v <= 1.0 for v in row["test"].values())
        assert row["train_seconds"] >= 0.0
        if row["setting"] in bench.SETTINGS:
            assert row["seed"] == 0 and row["lr"] == 1e-3 and row["steps"] == 2
            assert row["modality"] == ("ids" if row["setting"] == "sasrec" else
                                       "text" if row["dataset"] == "amazon-office" else "multimodal")
            assert set(row["validation"]) == set(bench.METRICS)
    pretrain = [r for r in rows if r["setting"] == "pretrain"]
    assert len(pretrain) == 1 and pretrain[0]["dataset"] == bench.SOURCE
    printed = capsys.readouterr().out
    assert "| dataset | setting | seeds | hr@10 | ndcg@10" in printed
    for dataset in bench.TARGETS:
        for setting in bench.SETTINGS:
            assert f"| {dataset} | {setting} | 1 |" in printed
    assert "±" in printed


def test_work_dir_inside_the_repository_is_refused():
    bench = _load_script()
    with pytest.raises(ValueError, match="inside the repository"):
        bench.main(["--quick", "--synthetic", "--tiny-backbones", "--work-dir", str(SCRIPT.parent / "tmp_work")])


def test_cached_catalogue_equals_recomputed(tmp_path):
    """`encode_catalogue(..., feature_cache=...)` (what every benchmark row uses) gives the item embeddings the
    towers compute from raw inputs."""
    import torch

    from pmmrec_hf.data.collator import PMMRecCollator
    from pmmrec_hf.training import encode_catalogue

    bench = _load_script()
    args = bench.parse_args(["--quick", "--synthetic", "--tiny-backbones", "--work-dir", str(tmp_path), "--max-users",
                             "20", "--hidden-size", "32", "--max-text-length", "16", "--image-size", "32"])
    folders = bench.prepare_data(args)
    data = bench.load_dataset(folders[bench.SOURCE])
    text_model, vision_model = bench.backbones(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    model = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.PRETRAIN_OBJECTIVE, seed=0).eval()
    cache, _ = bench.build_cache(args, bench.SOURCE, data, model.item_encoder, tokenizer)
    raw = PMMRecCollator.from_config(model.config, data["items"], tokenizer, None)
    ids = PMMRecCollator(data["items"], modality="ids", max_length=args.max_length)
    expected = encode_catalogue(model, raw, batch_size=16)
    cached = encode_catalogue(model, ids, batch_size=16, feature_cache=cache)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
