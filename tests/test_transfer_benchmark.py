"""benchmarks/transfer.py (leave-one-platform-out protocol) on synthetic stand-ins with tiny random backbones."""

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer.py"
TINY = ["--synthetic", "--tiny-backbones", "--max-users", "24", "--batch-size", "8", "--hidden-size", "32",
        "--max-text-length", "16", "--image-size", "32", "--pretrain-steps", "2", "--min-eval-steps", "3"]


def _load_script():
    return load_benchmark("transfer.py", "transfer_benchmark")


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """One tiny run of the whole protocol: both targets, two fractions, every row, single source for H&M."""
    bench = _load_script()
    root = tmp_path_factory.mktemp("transfer")
    argv = ["--quick", *TINY, "--work-dir", str(root / "work"), "--output", str(root / "results.json"),
            "--fractions", "0.5", "1", "--seeds", "0", "--learning-rates", "1e-3", "3e-4", "--max-evaluations", "3", "--max-eval-steps", "4",
            "--patience", "1", "--single-source", "hm=movielens-1m", "--single-source-rows", "zero_shot", "full",
            "--settings", *bench.SETTINGS]
    result = bench.main(argv)
    return bench, root, argv, result


@pytest.mark.slow
def test_every_row_of_the_protocol_is_reported(protocol_run):
    bench, root, _, result = protocol_run
    saved = json.loads((root / "results.json").read_text())
    assert saved["finished"] is True and saved["table"] == result["table"]
    keys = {(r["dataset"], r["source"], r["setting"], r["fraction"]) for r in saved["rows"]}
    expected = set()
    for target in bench.TARGETS:
        expected.add((target, "others", "zero_shot", None))
        expected.add((target, None, "untrained", None))
        for fraction in (0.5, 1.0):
            expected |= {(target, None, s, fraction) for s in ("most_popular", "sasrec", "scratch")}
            expected |= {(target, "others", s, fraction) for s in ("full", "item_encoder", "user_encoder",
                                                                   "full_lora")}
    expected |= {("hm", "movielens-1m", "zero_shot", None), ("hm", "movielens-1m", "full", 0.5),
                 ("hm", "movielens-1m", "full", 1.0)}
    assert keys == expected
    for row in saved["rows"]:
        assert set(row["test"]) == set(bench.METRICS)
        assert all(0.0 <= v <= 1.0 for v in row["test"].values())
    # every target was left out of its own pre-training (the single source pre-trained on movielens-1m only)
    pretraining = saved["pretraining"]
    assert "hm" not in pretraining["hm|others"]["users"] and "amazon-office" in pretraining["hm|others"]["users"]
    assert "amazon-office" not in pretraining["amazon-office|others"]["users"]
    assert set(pretraining["hm|movielens-1m"]["users"]) == {"movielens-1m"}
    assert result["plot"] is not None and Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| hm | 0.5 | full | movielens-1m | 1 |" in result["table"]
    assert "| amazon-office | - | zero_shot | all others | - |" in result["table"]
    assert "| hm | - | untrained | - | 1 |" in result["table"]
    # the untrained row is exactly what scratch starts from: its step-0 evaluation, on validation and on test
    for target in bench.TARGETS:
        untrained = next(r for r in saved["rows"] if r["dataset"] == target and r["setting"] == "untrained")
        scratch = next(r for r in saved["rows"] if r["dataset"] == target and r["setting"] == "scratch")
        step0 = [curve[0] for curve in scratch["curves"].values()]
        assert all(point[0] == 0 for point in step0)
        # step 0 is never reported, so its test is not scored (only running-best trained points are)
        assert {(point[1], point[2]) for point in step0} == {(untrained["validation"]["ndcg@10"], None)}


@pytest.mark.slow
def test_the_reported_point_is_the_best_on_validation_and_patience_stops_runs(protocol_run):
    bench, _, _, result = protocol_run
    trained = [r for r in result["rows"] if r["setting"] in bench.TRAINED]
    assert trained
    for row in trained:
        points = [(float(lr), step, val) for lr, curve in row["curves"].items() for step, val, _, _ in curve
                  if step > 0]
        assert row["validation"]["ndcg@10"] == max(v for _, _, v in points)
        for curve in row["curves"].values():  # test scored exactly at the trained points that beat the run so far
            running = -1.0
            for step, val, test, _ in curve:
                assert (test is not None) == (step > 0 and val > running)
                running = max(running, val) if step > 0 else running
        assert (row["lr"], row["step"], row["validation"]["ndcg@10"]) in points
        assert set(row["curves"]) == {"0.001", "0.0003"}
        per_epoch = math.ceil(row["train_users"] / 8)
        every = per_epoch * math.ceil(3 / per_epoch) if per_epoch < 3 else min(per_epoch, 4)
        assert row["eval_every"] == every and row["steps_per_epoch"] == per_epoch
        for run in row["runs"]:
            curve = [v for step, v, _, _ in row["curves"][f"{run['lr']:g}"] if step > 0]
            steps = [step for step, *_ in row["curves"][f"{run['lr']:g}"]]
            assert steps == list(range(0, run["steps"] + 1, row["eval_every"]))
            if run["stopped_early"]:  # patience 1: the last evaluation was no better than the best before it
                assert run["steps"] < 3 * every and curve[-1] <= max(curve[:-1])
            else:
                assert run["steps"] == 3 * every
        best_run = next(r for r in row["runs"] if r["lr"] == row["lr"])
        assert row["best_at_cap"] == (row["step"] == best_run["steps"] and not best_run["stopped_early"])
        assert row["seconds_per_step"] > 0 and row["grid_steps"] == sum(r["steps"] for r in row["runs"])


@pytest.mark.slow
def test_a_run_resumes_where_it_stopped_and_refuses_other_options(protocol_run, capsys):
    bench, root, argv, result = protocol_run
    before = json.loads((root / "results.json").read_text())["rows"]
    again = bench.main(argv)  # everything is done: nothing is trained again
    assert again["rows"] == before
    assert again["timings_seconds"]["this_invocation"] < result["timings_seconds"]["this_invocation"]
    # drop some rows (as if the run had stopped there): only those are computed again
    saved = json.loads((root / "results.json").read_text())
    kept = [r for r in saved["rows"] if not (r["dataset"] == "amazon-office" and r["fraction"] == 1.0)]
    saved["rows"] = kept
    (root / "results.json").write_text(json.dumps(saved))
    resumed = bench.main(argv)
    assert [bench.row_key(r) for r in resumed["rows"][: len(kept)]] == [bench.row_key(r) for r in kept]
    assert {bench.row_key(r) for r in resumed["rows"]} == {bench.row_key(r) for r in before}
    with pytest.raises(SystemExit, match="different protocol .*learning_rates"):
        bench.main([a if a != "3e-4" else "1e-4" for a in argv])


def test_targets_of_ones_own_are_named_with_their_folder_and_modality(tmp_path):
    from pmmrec_hf.data import make_synthetic_dataset

    bench = _load_script()
    make_synthetic_dataset(num_items=10, num_users=6, seed=0, output_dir=tmp_path / "shop")
    args = bench.parse_args(["--target", f"shop={tmp_path / 'shop'}:text", "hm"])
    assert args.targets == {"shop": {"folder": str((tmp_path / "shop").resolve()), "modality": "text"},
                            "hm": {"folder": None, "modality": "multimodal"}}
    assert args.single_source == {"hm": ["movielens-1m"]}  # the default single source, for the built-in target
    assert bench.parse_args(["--target", f"shop={tmp_path / 'shop'}"]).targets["shop"]["modality"] is None
    for bad in ([f"shop={tmp_path / 'shop'}:audio"], [f"shop={tmp_path / 'nothing'}"], ["books"],
                [f"hm={tmp_path / 'shop'}"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--target", *bad])
    with pytest.raises(SystemExit):
        bench.parse_args(["--single-source", "hm=hm"])
    assert bench.parse_args(["--no-single-source"]).single_source == {}
    assert bench.parse_args(["--quick"]).single_source == {}


def test_the_per_source_user_cap_applies_to_sources_only_and_zero_lifts_it(tmp_path):
    bench = _load_script()
    from pmmrec_hf.data.format import load_prepared

    def users(folder):
        return len(load_prepared(folder)["train"])

    capped = bench.prepare_data(bench.parse_args(["--quick", *TINY, "--work-dir", str(tmp_path / "capped"),
                                                  "--target", "hm", "--max-users-per-source", "5"]))
    lifted = bench.prepare_data(bench.parse_args(["--quick", *TINY, "--work-dir", str(tmp_path / "lifted"),
                                                  "--target", "hm", "--max-users-per-source", "0"]))
    assert Path(capped["hm"]).name.endswith("-u24") and Path(capped["amazon-office"]).name.endswith("-u5")
    assert users(capped["hm"]) == 24 and users(capped["amazon-office"]) == 5
    assert all(Path(f).name.endswith("-u24") for f in lifted.values())  # 0: no cap beyond --max-users
    assert users(lifted["amazon-office"]) == 24
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--max-users-per-source", "-1"])


def test_every_source_user_is_one_pre_training_whether_asked_with_zero_or_by_the_full_protocol():
    bench = _load_script()
    sources = ["amazon-games", "movielens-1m"]
    full = bench.parse_args([])  # FULL: max_users_per_source None
    quick = bench.parse_args(["--quick", "--trainable-layers", "1", "--pretrain-steps", "3000"])
    assert full.max_users_per_source is None and quick.max_users_per_source == 250
    assert bench.pretrain_key(quick, sources) != bench.pretrain_key(full, sources)
    quick.max_users_per_source = 0
    assert bench.pretrain_key(quick, sources) == bench.pretrain_key(full, sources)
    quick.pretrain_steps = 1000  # any other pre-training option still makes another pre-training
    assert bench.pretrain_key(quick, sources) != bench.pretrain_key(full, sources)


def test_a_run_asked_for_every_source_user_with_zero_resumes_the_full_protocols_results(tmp_path):
    bench = _load_script()
    full = bench.parse_args([])
    zero = bench.parse_args(["--max-users-per-source", "0"])
    assert bench.protocol_options(zero) == bench.protocol_options(full)
    # a results JSON of the full protocol written before the normalisation stored 0: it resumes with either spelling
    path = tmp_path / "results.json"
    row = {"dataset": "hm", "fraction": 0.1, "setting": "scratch", "seed": 0, "source": "others"}
    older = {**bench.protocol_options(full), "max_users_per_source": 0}
    path.write_text(json.dumps({"protocol_options": older, "timings_seconds": {}, "pretraining": {}, "rows": [row]}))
    for args in (full, zero):
        results = bench.Results(str(path), bench.protocol_options(args), fresh=False)
        assert results.rows == [row] and results.has(**row)
    capped = bench.parse_args(["--max-users-per-source", "250"])
    with pytest.raises(SystemExit, match="different protocol .*options differing: max_users_per_source\\)"):
        bench.Results(str(path), bench.protocol_options(capped), fresh=False)


_KILLED_PRETRAINING = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import pmmrec_hf.training as training
from benchmark_scripts import load_benchmark

save = training._save_checkpoint
def save_then_die(accelerator, output_dir, step, state=None):
    path = save(accelerator, output_dir, step, state)
    if step == {kill_after}:  # killed right after the checkpoint of this step is complete
        os.kill(os.getpid(), signal.SIGKILL)
    return path
training._save_checkpoint = save_then_die
bench = load_benchmark("transfer.py", "transfer_benchmark")
args = bench.parse_args({argv!r})
platforms, cache, text_model, vision_model = bench.set_up(args, {{}})
bench.pretrain(args, platforms, {sources!r}, cache, text_model, vision_model, Path(args.work_dir))
"""


@pytest.mark.slow
def test_a_pre_training_killed_after_a_checkpoint_resumes_there_and_ends_as_an_uninterrupted_one(tmp_path):
    import signal
    import subprocess
    import sys

    bench = _load_script()
    argv = ["--quick", *TINY, "--pretrain-steps", "6", "--pretrain-save-steps", "2"]
    killed = [*argv, "--work-dir", str(tmp_path / "killed")]
    sources = bench.source_sets(bench.parse_args(killed), "hm")[0][1]
    script = _KILLED_PRETRAINING.format(tests=str(Path(__file__).parent), kill_after=4, argv=killed, sources=sources)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    folder = tmp_path / "killed" / "pretrained" / bench.pretrain_key(bench.parse_args(killed), sources)
    assert not (folder / "record.json").exists()  # not complete: a later run must not load it as pre-trained
    # killed before the older checkpoint was pruned: both are there, the newest is where the resume starts
    assert sorted(p.name for p in (folder / "run" / "checkpoints").iterdir()) == ["step_2", "step_4"]

    def pretrained(work_argv):
        args = bench.parse_args(work_argv)
        platforms, cache, text_model, vision_model = bench.set_up(args, {})
        return bench.pretrain(args, platforms, sources, cache, text_model, vision_model, Path(args.work_dir))

    resumed, record = pretrained(killed)
    assert record["resumed_from_step"] == 4 and record["steps"] == 6
    assert not (folder / "run" / "checkpoints").exists()  # the finished model replaces the checkpoints
    whole, whole_record = pretrained([*argv, "--work-dir", str(tmp_path / "whole")])
    assert whole_record["resumed_from_step"] == 0 and whole_record["steps"] == 6
    expected = whole.state_dict()
    # the killed process and this one may sum in other orders (thread counts): equal up to float rounding
    assert {k: torch.allclose(v, expected[k], rtol=1e-4, atol=1e-6) for k, v in resumed.state_dict().items()} == {
        k: True for k in expected}
    loaded, _ = pretrained(killed)  # complete now: loaded, not trained again
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_the_plot_title_states_the_pre_training_set():
    bench = _load_script()
    options = {"seeds": [0], "learning_rates": [1e-3], "patience": 3, "trainable_layers": 1, "pretrain_steps": 300}
    assert "pre-training 300 steps on the first 250 users of each source" in bench.plot_title(
        {**options, "max_users_per_source": 250})
    for lifted in (0, None):
        assert "pre-training 300 steps on every source user" in bench.plot_title(
            {**options, "max_users_per_source": lifted})


def test_a_target_is_never_its_own_source():
    bench = _load_script()
    args = bench.parse_args([])
    for target in bench.TARGETS:
        sets = bench.source_sets(args, target)
        assert sets[0][0] == "others" and target not in sets[0][1]
        assert sorted(sets[0][1]) == sorted(p for p in bench.PLATFORMS if p != target)
        assert sets[1][1] == list(bench.SINGLE_SOURCE[target])


def test_co_occurrence_auc_by_hand():
    bench = _load_script()
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    pairs = torch.tensor([[0, 1], [0, 2], [2, 3]])
    randoms = torch.tensor([3, 1, 2])
    # pair 1: cos(0,1) 0.995 > cos(0,3) -1 -> 1; pair 2: cos(0,2) 0 < cos(0,1) -> 0; pair 3: cos(2,3) 0 vs
    # cos(2,2) 1 -> 0
    assert bench.co_occurrence_auc(embeddings, pairs, randoms) == pytest.approx(1 / 3)
    assert bench.co_occurrence_auc(embeddings, pairs[:1], torch.tensor([1])) == 0.5  # a tie counts half
    rows = [{"item_ids": ["a", "b", "b", "c"]}, {"item_ids": ["c"]}]
    found, rand = bench.consecutive_pairs(rows, {"a": 0, "b": 1, "c": 2})
    assert found.tolist() == [[0, 1], [1, 2]] and rand.shape == (2,) and int(rand.max()) < 3


def test_work_dir_inside_the_repository_is_refused():
    bench = _load_script()
    with pytest.raises(ValueError, match="inside the repository"):
        bench.main(["--quick", "--synthetic", "--tiny-backbones", "--work-dir", str(SCRIPT.parent / "tmp_work")])


def _tiny_cache(bench, tmp_path, *extra):
    args = bench.parse_args(["--quick", *TINY, "--work-dir", str(tmp_path), *extra])
    folders = bench.prepare_data(args)
    platforms = bench.load_platforms(args, folders)
    text_model, vision_model = bench.backbones(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    model = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.pretrain_objective(args), 0).eval()
    cache, _ = bench.build_cache(args, "all", {"items": platforms.mixture.items}, model.item_encoder, tokenizer)
    return args, platforms, model, cache, tokenizer


def test_cached_catalogue_of_a_platform_equals_recomputed(tmp_path):
    """`encode_catalogue(..., feature_cache=CacheView)` (what every row uses: one platform's rows of the cache of
    every platform) gives the item embeddings the towers compute from that platform's raw inputs; on a text-only
    platform every item is embedded from its text through the fusion."""
    from pmmrec_hf.data.collator import PMMRecCollator
    from pmmrec_hf.training import encode_catalogue

    bench = _load_script()
    args, platforms, model, cache, tokenizer = _tiny_cache(bench, tmp_path)
    for name in ("hm", "amazon-office"):
        data = platforms.data[name]
        view = bench.CacheView(cache, platforms.offsets[name], len(data["items"]), platforms.modality[name])
        raw = PMMRecCollator.from_config(model.config, data["items"], tokenizer, None)
        ids = PMMRecCollator(data["items"], modality="ids", max_length=args.max_length)
        expected = encode_catalogue(model, raw, batch_size=16)
        cached = encode_catalogue(model, ids, batch_size=16, feature_cache=view)
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
        image_mask = view.lookup(torch.arange(len(data["items"])))["image_mask"]
        assert bool(image_mask.any()) == (name == "hm")


def test_any_backbone_checkpoint_can_be_named(tmp_path):
    """--text-model / --vision-model take any folder or Hub id, e.g. a CLIP dual encoder (as
    openai/clip-vit-base-patch32 is), whose own image normalisation is used."""
    from tiny_models import tiny_text_config, tiny_vision_config
    from transformers import BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel

    from pmmrec_hf.data.synthetic import synthetic_tokenizer

    bench = _load_script()
    tokenizer = synthetic_tokenizer()
    text_dir, vision_dir = tmp_path / "text", tmp_path / "clip"
    BertModel(tiny_text_config(vocab_size=len(tokenizer))).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    vision = tiny_vision_config("clip")
    clip = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "vocab_size": 99},
                      vision_config=vision.to_dict(), projection_dim=8)
    CLIPModel(clip).save_pretrained(vision_dir)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    CLIPImageProcessor(image_mean=mean, image_std=std).save_pretrained(vision_dir)
    args = bench.parse_args(["--quick", "--work-dir", str(tmp_path / "work"), "--text-model", str(text_dir),
                             "--vision-model", str(vision_dir), "--hidden-size", "16",
                             "--image-size", str(vision.image_size)])
    text_model, vision_model = bench.backbones(args)
    assert (text_model, vision_model) == (str(text_dir), str(vision_dir))
    model = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.pretrain_objective(args), seed=0)
    assert model.config.item_encoder_config.image_mean == mean
    assert model.config.item_encoder_config.image_std == std
    assert model.config.item_encoder_config.vision_config.model_type == "clip_vision_model"
    # without an image processor in the folder: the config default (EfficientNet-Lite's 0.5 / 0.5)
    assert bench.image_normalisation(str(text_dir)) == {}


def test_the_benchmark_cache_marks_items_without_an_image(tmp_path):
    import argparse

    from pmmrec_hf import PMMRecItemEncoder
    from pmmrec_hf.data import load_items, make_synthetic_dataset
    from pmmrec_hf.data.image_processing import is_missing_image
    from pmmrec_hf.data.synthetic import synthetic_tokenizer
    from tiny_models import tiny_item_config, tiny_text_config

    bench = _load_script()
    make_synthetic_dataset(num_items=12, num_users=20, seed=0, output_dir=tmp_path / "d", image_size=30,
                           missing_image_rate=0.5)
    items, _ = load_items(tmp_path / "d", decode_images=False)
    torch.manual_seed(0)
    tokenizer = synthetic_tokenizer()
    encoder = PMMRecItemEncoder(tiny_item_config(text_config=tiny_text_config(vocab_size=len(tokenizer)),
                                                 text_trainable_layers=1, vision_trainable_layers=1))
    cache, _ = bench.build_cache(argparse.Namespace(max_length=8), "d", {"items": items}, encoder, tokenizer)
    has_image = [not is_missing_image(v) for v in items["image"]]
    assert 0 < sum(has_image) < 12
    assert cache.lookup(torch.arange(12))["image_mask"].tolist() == has_image
    # a view with modality "text": no item has an image
    view = bench.CacheView(cache, 0, 12, "text")
    assert not view.lookup(torch.arange(12))["image_mask"].any()


def test_readme_table_is_the_committed_run():
    """The README's transfer table repeats, cell for cell, rows of the table that the committed run printed
    (benchmarks/transfer_quick.json holds the run's rows and its printed table)."""
    bench = _load_script()
    repo = SCRIPT.parents[1]
    saved = json.loads((repo / "benchmarks" / "transfer_quick.json").read_text())
    options = saved["protocol_options"]
    assert bench.markdown_table(saved["rows"], options["repeated_targets"]) == saved["table"]
    printed = {}
    for line in saved["table"].splitlines():
        if line.startswith("| ") and not line.startswith("| target"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            printed[(cells[0], cells[1], cells[2], cells[3])] = dict(zip(bench.METRICS, cells[5:5 + len(bench.METRICS)]))
    readme = (repo / "README.md").read_text().split("## Transfer on real data", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        target, fraction, setting, source = cells[0].strip("`"), cells[1], cells[2], cells[3]
        assert cells[4:] == [printed[(target, fraction, setting, source)]["ndcg@10"],
                             printed[(target, fraction, setting, source)]["hr@10"]], line
    assert (repo / "docs" / "transfer_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load_diagnosis():
    return load_benchmark("transfer_diagnosis.py", "transfer_diagnosis")


@pytest.mark.slow
def test_diagnosis_curves_start_from_the_untrained_model_and_a_frozen_item_encoder_keeps_its_embeddings(tmp_path):
    diagnosis = _load_diagnosis()
    common = [*TINY, "--quick", "--work-dir", str(tmp_path / "work"), "--target", "hm"]
    pre = diagnosis.main(["pretraining", "--steps", "4", "--every", "2", "--output", str(tmp_path / "p.json"),
                          *common])
    assert json.loads((tmp_path / "p.json").read_text()) == pre
    untrained, curve = pre[0], pre[1:]
    assert untrained["model"] == "untrained" and [r["step"] for r in curve] == [0, 2, 4]
    assert "hm" not in curve[0]["users"] and "amazon-office" in curve[0]["users"]
    # the pre-training starts from the same item and user encoders as the untrained reference
    assert curve[0]["validation"] == untrained["validation"] and curve[0]["test"] == untrained["test"]

    frozen = diagnosis.main(["finetuning", "--setting", "scratch", "--fraction", "1", "--lr", "1e-2", "--steps", "4",
                             "--every", "2", "--freeze-item-encoder", "--output", str(tmp_path / "f.json"), *common])
    assert [r["step"] for r in frozen[1:]] == [0, 2, 4]
    assert frozen[1]["validation"] == frozen[0]["validation"]  # scratch at step 0 is the untrained model
    assert len({r["co_occurrence_auc"] for r in frozen}) == 1  # item embeddings unchanged: only the user side trains
    trained = diagnosis.main(["finetuning", "--setting", "scratch", "--fraction", "1", "--lr", "1e-2", "--steps", "4",
                              "--every", "2", "--output", str(tmp_path / "t.json"), *common])
    assert len({r["co_occurrence_auc"] for r in trained}) > 1
    # a warmup longer than the run keeps the lr near zero: the model does not move from where it starts
    warm = diagnosis.main(["finetuning", "--setting", "scratch", "--fraction", "1", "--lr", "1e-2", "--steps", "4",
                           "--every", "2", "--output", str(tmp_path / "w.json"), *common, "--warmup-steps", "10000000"])
    assert {r["warmup_steps"] for r in warm[1:]} == {10000000}
    assert [r["validation"] for r in warm[1:]] == [trained[1]["validation"]] * 3
    assert len({r["co_occurrence_auc"] for r in warm}) == 1
    with pytest.raises(SystemExit, match="--warmup-steps is an option of finetuning"):
        diagnosis.main(["pretraining", "--steps", "2", "--every", "2", "--output", str(tmp_path / "x.json"), *common,
                        "--warmup-steps", "2"])


@pytest.mark.slow
def test_diagnosis_pretraining_on_chosen_sources_scores_every_measured_target_and_a_saved_step_restarts_exactly(
        tmp_path):
    diagnosis = _load_diagnosis()
    common = [*TINY, "--quick", "--work-dir", str(tmp_path / "work")]
    saved = tmp_path / "work" / "models"
    pre = diagnosis.main(["pretraining", "--target", "hm", "--measure", "hm", "amazon-office",
                          "--sources", "movielens-100k", "amazon-beauty", "--steps", "4", "--every", "2",
                          "--save-dir", str(saved), "--output", str(tmp_path / "p.json"), *common])
    curve = [r for r in pre if r["model"] == "pre-training"]
    assert [(r["step"], r["target"]) for r in curve] == [(s, t) for s in (0, 2, 4) for t in ("hm", "amazon-office")]
    assert set(curve[0]["users"]) == {"movielens-100k", "amazon-beauty"}
    assert all(r["saved"] == str(saved / f"step-{r['step']}") for r in curve)
    # the transferred row started from a saved step scores, before training, what the pre-training recorded there
    full = diagnosis.main(["finetuning", "--target", "amazon-office", "--setting", "full", "--start",
                           str(saved / "step-4"), "--fraction", "1", "--lr", "1e-2", "--steps", "2", "--every", "2",
                           "--output", str(tmp_path / "f.json"), *common])
    at_4 = next(r for r in curve if r["step"] == 4 and r["target"] == "amazon-office")
    assert full[1]["step"] == 0 and full[1]["validation"] == at_4["validation"] and full[1]["test"] == at_4["test"]
    sasrec = diagnosis.main(["finetuning", "--target", "hm", "--setting", "sasrec", "--fraction", "1", "--lr", "1e-2",
                             "--steps", "2", "--every", "2", "--output", str(tmp_path / "s.json"), *common])
    assert sasrec[1]["model"] == "sasrec" and [r["step"] for r in sasrec[1:]] == [0, 2]
    # bad requests are refused, naming the option
    with pytest.raises(SystemExit, match="--sources hm"):
        diagnosis.main(["pretraining", "--target", "hm", "--sources", "hm", "--steps", "2", "--every", "2",
                        "--output", str(tmp_path / "x.json"), *common])
    with pytest.raises(SystemExit):
        diagnosis.main(["pretraining", "--target", "hm", "--steps", "2", "--every", "2", "--save-dir",
                        str(diagnosis.HERE / "models"), "--output", str(tmp_path / "x.json"), *common])


@pytest.mark.slow
def test_diagnosis_components_swap_one_encoder_at_a_time(tmp_path, capsys):
    diagnosis = _load_diagnosis()
    common = [*TINY, "--quick", "--work-dir", str(tmp_path / "work")]
    saved = tmp_path / "work" / "models"
    pre = diagnosis.main(["pretraining", "--target", "hm", "--steps", "4", "--every", "4", "--save-dir", str(saved),
                          "--output", str(tmp_path / "p.json"), *common])
    parts = diagnosis.main(["components", "--target", "hm", "--start", str(saved / "step-4"),
                            "--output", str(tmp_path / "c.json"), *common])
    by = {r["model"]: r for r in parts}
    untrained, pretrained = by["untrained"], by["pre-trained"]
    item_only = by["pre-trained item encoder + untrained user encoder"]
    user_only = by["untrained item encoder + pre-trained user encoder"]
    at_4 = next(r for r in pre if r["model"] == "pre-training" and r["step"] == 4)
    assert pretrained["validation"] == at_4["validation"] and untrained["validation"] == pre[0]["validation"]
    # the co-occurrence AUC and the item cosine are the item encoder's: they follow it, not the user encoder
    assert item_only["co_occurrence_auc"] == pretrained["co_occurrence_auc"] != untrained["co_occurrence_auc"]
    assert user_only["co_occurrence_auc"] == untrained["co_occurrence_auc"]
    assert item_only["mean_item_cosine"] == pretrained["mean_item_cosine"]
    assert user_only["mean_item_cosine"] == untrained["mean_item_cosine"]
    assert -1.0 <= untrained["mean_item_cosine"] <= 1.0
    with pytest.raises(SystemExit):
        diagnosis.main(["finetuning", "--target", "hm", "--output", str(tmp_path / "x.json"), *common])  # no --steps

    # options that would be ignored are refused, before any work (argparse exits 2, naming the option)
    x = ["--output", str(tmp_path / "x.json"), *common]
    for argv, option in ((["finetuning", "--setting", "scratch", "--start", str(saved / "step-4")], "--start"),
                         (["finetuning", "--measure", "hm"], "--measure"),
                         (["components", "--save-dir", str(saved)], "--save-dir"),
                         (["finetuning", "--setting", "sasrec", "--freeze-item-encoder"], "--freeze-item-encoder")):
        with pytest.raises(SystemExit) as refused:
            diagnosis.main([*argv, "--target", "hm", "--steps", "2", "--every", "2", *x])
        assert refused.value.code == 2 and option in capsys.readouterr().err.splitlines()[-1], option
