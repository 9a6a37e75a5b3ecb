"""benchmarks/throughput.py: runs every configuration at tiny size, and no switch changes the loss.

Tolerances (fp32 CPU, tiny model in eval mode unless said):
- dedup vs baseline (the same sequences, duplicates and padding each encoded as their own row): 1e-5;
- cache vs raw inputs: 1e-5; sdpa vs eager backbones: 1e-5; compile vs eager: 1e-4;
- bf16 autocast vs fp32: 2e-2 relative;
- fused (CUDA) / foreach (CPU) AdamW vs torch's default AdamW: parameters after one step within 1e-6.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


def _load():
    return load_benchmark("throughput.py", "pmmrec_throughput_benchmark")


tp = _load()
CPU = torch.device("cpu")
TINY = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--num-threads", "1"]


def test_every_configuration_runs_and_reports(tmp_path):
    out = tmp_path / "report.json"
    report = tp.main(TINY + ["--configs", ",".join(tp.CONFIGS), "--modes", "full-length,realistic",
                             "--compile-backend", "aot_eager", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"], default=str))
    for key in ("device_name", "versions", "protocol", "model", "flop_model", "modes", "results", "elapsed_s"):
        assert key in saved, key
    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["transformers"]
    assert saved["device"] == "cpu" and saved["device_name"].startswith("CPU")
    assert saved["peak_tflops"] is None and saved["reference"] is None  # CPU: no peak, no research reference
    assert "2*T*(4*h^2 + 2*h*f)" in saved["flop_model"]["formula"]
    assert saved["protocol"]["batch_size_users"] == 4 and saved["protocol"]["slots_per_user"] == 21
    assert set(saved["modes"]) == {"full-length", "realistic"}
    assert saved["modes"]["full-length"]["padding_fraction"] == 0.0
    assert saved["modes"]["full-length"]["mean_distinct_items_per_step"] == 84
    results = {(r["mode"], r["config"]): r for r in saved["results"]}
    assert len(results) == 2 * len(tp.CONFIGS)
    for (mode, config), r in results.items():
        assert r["status"] == "ok", (mode, config, r["status"])
        for key in ("median_step_s", "mean_step_s", "sequences_per_s", "peak_memory_gib", "peak_memory_kind",
                    "items_encoded_per_step", "achieved_tflops", "model_tflop_per_step", "loss_first", "steps"):
            assert r[key] is not None, (mode, config, key)
        assert r["steps"] == 2 and r["sequences_per_s"] == pytest.approx(4 / r["median_step_s"])
        assert r["fraction_of_peak"] is None and r["ratio_to_reference"] is None
        if config != "baseline":
            assert r["speedup_vs_baseline"] > 0
        if "cache" in r["switches"]:
            assert r["cache_items"] > 0 and r["cache_build_s"] > 0 and r["cache_gib"] > 0
    for mode in ("full-length", "realistic"):
        assert {"dedup", "cache"} <= set(results[(mode, "all")]["switches"])
        assert "switches_chosen_by" in results[(mode, "all")]
        assert results[(mode, "baseline")]["items_encoded_per_step"] == 84  # every slot, padding included
        assert results[(mode, "compile")]["compiled"] == ["fusion", "text_top_block", "user_encoder",
                                                         "vision_top_block"]
    # dedup encodes fewer items on realistic data, the same on full-length distinct sequences
    assert results[("realistic", "dedup")]["items_encoded_per_step"] < 84
    assert results[("full-length", "dedup")]["items_encoded_per_step"] == 84
    # the cache removes the frozen forward from the FLOPs of a step
    assert (results[("full-length", "cache")]["model_tflop_per_step"]
            < results[("full-length", "baseline")]["model_tflop_per_step"])
    table = tp.format_table(saved)
    assert table.count("\n") == 2 * len(tp.CONFIGS) + 1


def test_realistic_mode_without_the_data_uses_the_builtin_approximation(tmp_path, capsys):
    report = tp.main(TINY + ["--configs", "baseline,dedup+cache", "--modes", "realistic",
                             "--data-dir", str(tmp_path / "absent")])
    stats = report["modes"]["realistic"]
    assert stats["source"].startswith("built-in approximation of MovieLens-100K")
    assert stats["catalogue_items"] == tp.ML100K_NUM_ITEMS
    assert 0 < stats["repeat_fraction"] < 1 and stats["padding_fraction"] < 0.1
    assert [r["status"] for r in report["results"]] == ["ok", "ok"]
    assert report["results"][1]["switches"] == ["cache", "dedup"]
    assert "built-in approximation" in capsys.readouterr().out


def test_movielens_reader(tmp_path):
    lines = [f"1\t{item}\t5\t{t}" for t, item in enumerate([10, 11, 12, 13, 14])]
    lines += ["2\t10\t3\t5", "2\t20\t3\t1", "3\t99\t1\t1"]  # user 2 is time-ordered 20, 10; user 3 too short
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    rows, num_items = tp.read_movielens(tmp_path, max_length=2)
    # user 1: last L + 3 = 5 items, minus the last 2 -> 3 items; user 2: 2 items -> dropped (< 3)
    assert rows == [[0, 1, 2]] and num_items == 3


def test_out_of_memory_is_recorded_and_the_run_goes_on(monkeypatch):
    original = tp.train_step
    calls = {"n": 0}

    def failing(model, optimizer, batch, cache=None, bf16=False, *args, **kwargs):
        if bf16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        calls["n"] += 1
        return original(model, optimizer, batch, cache, bf16, *args, **kwargs)

    monkeypatch.setattr(tp, "train_step", failing)
    report = tp.main(TINY + ["--configs", "baseline,bf16,sdpa", "--modes", "full-length"])
    assert [r["status"] for r in report["results"]] == ["ok", "OOM", "ok"]
    assert calls["n"] == 6


def test_no_datasets_or_evaluate_import():
    code = (
        "import sys; sys.modules['datasets'] = None; sys.modules['evaluate'] = None\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['bench'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert 'datasets' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_flop_model_matches_performance_md_at_full_size():
    flops = tp.flop_model(tp.size_spec("full"))
    assert flops["forward_gflop_per_item"] == pytest.approx(19.0, rel=0.01)
    assert flops["backward_gflop_per_item"] == pytest.approx(8.6, rel=0.05)
    step = tp.step_flops(flops, 1344, 64, cached=False)
    assert step / 1e12 == pytest.approx(37.0, rel=0.02)
    assert tp.step_flops(flops, 1344, 64, cached=True) < 0.5 * step


# ------------------------------------------------------------------------------------------------
# each switch leaves the loss of a fixed batch unchanged
# ------------------------------------------------------------------------------------------------

SPEC = tp.size_spec("tiny")
SLOTS = SPEC.max_length + 1


@pytest.fixture(scope="module")
def fixed():
    """A realistic tiny batch (repeats across users, some padding) in both layouts, and an eval-mode model."""
    data = tp.make_mode_data("realistic", SPEC, 6, 1, Path("/nonexistent"), seed=5)
    sequences = data.sequences[0]
    sequences[0] = sequences[0][:7]  # some padding
    sequences[1] = sequences[1][:3]
    catalogue = tp.Catalogue(data.num_items, SPEC, CPU, data.log_q, seed=5)
    dedup = tp.make_batch(sequences, catalogue, SLOTS, dedup=True, raw=True)
    plain = tp.make_batch(sequences, catalogue, SLOTS, dedup=False, raw=True)
    real = sum(len(s) for s in sequences)
    assert dedup["item_ids"].numel() < real < plain["item_ids"].numel() == 6 * SLOTS  # repeats and padding
    model = tp.build_model(SPEC, "eager", seed=3).eval()
    return dict(model=model, dedup=dedup, plain=plain, catalogue=catalogue)


def _loss(model, batch, **kw):
    with torch.no_grad():
        return tp.compute_loss(model, batch, **kw).float()


def test_dedup_leaves_the_loss_unchanged(fixed):
    torch.testing.assert_close(_loss(fixed["model"], fixed["dedup"]), _loss(fixed["model"], fixed["plain"]),
                               atol=1e-5, rtol=1e-5)


def test_cache_leaves_the_loss_unchanged(fixed):
    model = copy.deepcopy(fixed["model"])
    cache = tp.build_cache(model, fixed["catalogue"], CPU, "float32", bf16=False, batch_size=64)
    for layout in ("dedup", "plain"):
        torch.testing.assert_close(_loss(model, fixed[layout], cache=cache), _loss(model, fixed[layout]),
                                   atol=1e-5, rtol=1e-5)


def test_bf16_autocast_keeps_the_loss_within_2_percent(fixed):
    reference = _loss(fixed["model"], fixed["dedup"])
    mixed = _loss(fixed["model"], fixed["dedup"], bf16=True)
    assert abs(mixed - reference) <= 2e-2 * abs(reference)


def test_sdpa_backbones_leave_the_loss_unchanged(fixed):
    sdpa = tp.set_backbone_attention(copy.deepcopy(fixed["model"]), "sdpa")
    assert sdpa.item_encoder.text_model.config._attn_implementation == "sdpa"
    assert fixed["model"].item_encoder.text_model.config._attn_implementation == "eager"
    torch.testing.assert_close(_loss(sdpa, fixed["dedup"]), _loss(fixed["model"], fixed["dedup"]),
                               atol=1e-5, rtol=1e-5)


def test_fused_adamw_gives_the_same_step(fixed):
    torch.manual_seed(0)
    model = tp.build_model(SPEC, "eager", seed=3, dropout=False).train()
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    for m, fused in zip(models, (False, True)):
        optimizer = tp.make_optimizer(m, fused, CPU, lr=1e-2)
        assert optimizer.defaults.get("foreach") is (True if fused else None)
        tp.train_step(m, optimizer, fixed["dedup"])
    moved = 0
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
        moved += int(a.requires_grad)
    assert moved > 0


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_leaves_the_loss_unchanged(fixed, backend):
    model = copy.deepcopy(fixed["model"])
    try:
        tp.apply_compile(model, backend)
        compiled = _loss(model, fixed["dedup"])
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"torch.compile({backend}) does not run on this machine: {type(error).__name__}: {error}")
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, _loss(fixed["model"], fixed["dedup"]), atol=1e-4, rtol=1e-4)


def test_configuration_parsing_and_time_budget():
    assert tp.parse_configs("baseline,dedup+cache,all,all+compile") == [
        ("baseline", set(), set()), ("dedup+cache", {"dedup", "cache"}, set()), ("all", None, set()),
        ("all+compile", None, {"compile"}),
    ]
    with pytest.raises(SystemExit, match="unknown configuration"):
        tp.parse_configs("baseline,turbo")
    report = tp.main(TINY + ["--configs", "baseline,all", "--modes", "full-length", "--time-budget-s", "0"])
    assert [r["status"] for r in report["results"]] == ["skipped (time budget)"] * 2


def test_all_is_resolved_from_the_results_before_it():
    ok = lambda config, seq: {"config": config, "status": "ok", "sequences_per_s": seq}  # noqa: E731
    here = [ok("baseline", 10.0), ok("bf16", 30.0), ok("sdpa", 10.05), ok("compile", 10.4)]
    chosen, why = tp.resolve_all(here, [], None)
    # sdpa +0.5%, compile +4%: not enough; packed removes work; static unmeasured: off
    assert chosen == {"dedup", "cache", "packed", "bf16", "fused_adamw"}
    assert "sdpa off (x1.01 here)" in why and "fused_adamw on (not measured: default)" in why
    assert "static off (not measured: default)" in why
    chosen, _ = tp.resolve_all(here + [ok("static", 11.0)], [], None)
    assert "static" in chosen
    other = [ok("baseline", 10.0), ok("sdpa", 12.0), ok("compile", 20.0), ok("fused_adamw", 9.0)]
    chosen, _ = tp.resolve_all([ok("baseline", 5.0)], other, None)
    assert chosen == {"dedup", "cache", "packed", "bf16", "sdpa"}  # compile counts only when measured in this mode
    assert tp.resolve_all([], [], "bf16,cache")[0] == {"bf16", "cache"}
