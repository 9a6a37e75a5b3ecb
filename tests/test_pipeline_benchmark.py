"""benchmarks/pipeline.py at the tiny size on CPU: it trains from a prepared folder through the collator and a
DataLoader with a worker, and its FAISS ranking agrees with the exact matmul (the GPU script's third part)."""

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_pipeline_benchmark_reports_end_to_end_training_and_ranking(tmp_path):
    pipeline = load_benchmark("pipeline.py", "pmmrec_pipeline_benchmark")
    report = pipeline.main(["--size", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--num-workers", "1",
                            "--num-items", "40", "--num-users", "24", "--eval-users", "16", "--eval-items", "500",
                            "--num-threads", "1", "--data-folder", str(tmp_path / "data"),
                            "--output", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["train"]["steps"] == 3
    train = report["train"]
    assert train["steps"] == 3 and 0 <= train["stalled_steps"] <= 3 and 0.0 <= train["wait_fraction"] <= 1.0
    assert train["median_step_s"] > 0 and train["median_wait_s"] >= 0
    evaluation = report["eval"]
    assert evaluation["users"] == 16 and evaluation["items"] == 500
    pytest.importorskip("faiss")
    assert evaluation["faiss"]["top_k_agreement_with_matmul"] == 1.0
