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
        "--epochs", "hm=2", "amazon-office=1", "--pretrain-steps", "2", "--seeds", "0", "--max-users", "40",
        "--batch-size", "8", "--learning-rates", "1e-3", "1e-4",
        "--hidden-size", "32", "--max-text-length", "16", "--image-size", "32",
    ])
    saved = json.loads(output.read_text())
    rows = [r for r in saved["rows"] if "test" in r]
    assert result["table"] == saved["table"]
    assert saved["table"].startswith("Repeated targets: rank: a test target already in the user's history is ranked")
    assert {(r["dataset"], r["setting"]) for r in rows if r["setting"] in bench.SETTINGS} == {
        (d, s) for d in bench.TARGETS for s in bench.SETTINGS
    }
    for row in rows:
        assert set(row["test"]) == set(bench.METRICS)
        assert all(0.0 <= v <= 1.0 for v in row["test"].values())
        assert row["train_seconds"] >= 0.0
        if row["setting"] in bench.SETTINGS:
            # the chosen grid point is the best on validation among lr {1e-3, 1e-4} x epochs {1, .., E}
            per_epoch = 5  # 40 users, batch 8
            max_epochs = 2 if row["dataset"] == "hm" else 1
            assert row["seed"] == 0 and row["lr"] in (1e-3, 1e-4) and row["epochs"] in range(1, max_epochs + 1)
            assert row["steps"] == row["epochs"] * per_epoch
            points = [(float(lr), e, v) for lr, curve in row["curves"].items() for e, v, _ in curve if e > 0]
            assert len(points) == 2 * max_epochs
            assert row["validation"]["ndcg@10"] == max(v for _, _, v in points)
            assert (row["lr"], row["epochs"], row["validation"]["ndcg@10"]) in points
            assert [e for e, _, _ in row["curves"]["0.001"]] == list(range(max_epochs + 1))
            assert row["grid_train_seconds"] >= row["train_seconds"]
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
    assert result["plot"] is not None and Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --render re-prints the same table from the JSON and re-draws the plot, training nothing
    rendered = bench.main(["--render", str(output), "--plot", str(tmp_path / "again.png")])
    assert rendered["table"] == saved["table"]
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epochs_per_target_parsing():
    bench = _load_script()
    assert bench.parse_args(["--epochs", "4"]).epochs == {t: 4 for t in bench.TARGETS}
    assert bench.parse_args(["--epochs", "4", "hm=7"]).epochs == {"hm": 7, "amazon-office": 4}
    for bad in (["hm=3"], ["movies=3", "2"], ["0"], ["x"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--epochs", *bad])


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
    model = bench.new_pmmrec(args, text_model, vision_model, "multimodal", bench.PRETRAIN_OBJECTIVE, seed=0)
    assert model.config.item_encoder_config.image_mean == mean
    assert model.config.item_encoder_config.image_std == std
    assert model.config.item_encoder_config.vision_config.model_type == "clip_vision_model"
    # without an image processor in the folder: the config default (EfficientNet-Lite's 0.5 / 0.5)
    assert bench.image_normalisation(str(text_dir)) == {}


def test_readme_table_is_the_committed_run():
    """The README's transfer table repeats, cell for cell, the table that the committed run printed
    (benchmarks/transfer_quick.json holds the run's rows and its printed table)."""
    bench = _load_script()
    repo = SCRIPT.parents[1]
    saved = json.loads((repo / "benchmarks" / "transfer_quick.json").read_text())
    assert bench.markdown_table(saved["rows"], saved["args"].get("repeated_targets")) == saved["table"]
    printed = {}
    for line in saved["table"].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        printed[(cells[0], cells[1])] = dict(zip(bench.METRICS, cells[3:3 + len(bench.METRICS)]))
    readme = (repo / "README.md").read_text().split("## Transfer on real data", 1)[1]
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 + len(bench.SETTINGS)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        setting = cells[0].strip("`")
        assert cells[1:] == [printed[("hm", setting)]["hr@10"], printed[("hm", setting)]["ndcg@10"],
                             printed[("amazon-office", setting)]["hr@10"],
                             printed[("amazon-office", setting)]["ndcg@10"]]
    assert (repo / "docs" / "transfer_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_benchmark_cache_marks_items_without_an_image(tmp_path):
    import argparse

    import torch

    from pmmrec_hf import PMMRecItemEncoder
    from pmmrec_hf.data import load_items, make_synthetic_dataset
    from pmmrec_hf.data.image_processing import is_missing_image
    from pmmrec_hf.data.synthetic import synthetic_tokenizer
    from tiny_models import tiny_item_config

    bench = _load_script()
    make_synthetic_dataset(num_items=12, num_users=20, seed=0, output_dir=tmp_path / "d", image_size=30,
                           missing_image_rate=0.5)
    items, _ = load_items(tmp_path / "d", decode_images=False)
    from tiny_models import tiny_text_config

    torch.manual_seed(0)
    tokenizer = synthetic_tokenizer()
    encoder = PMMRecItemEncoder(tiny_item_config(text_config=tiny_text_config(vocab_size=len(tokenizer)),
                                                 text_trainable_layers=1, vision_trainable_layers=1))
    cache, _ = bench.build_cache(argparse.Namespace(max_length=8), "d", {"items": items}, encoder, tokenizer)
    has_image = [not is_missing_image(v) for v in items["image"]]
    assert 0 < sum(has_image) < 12
    assert cache.lookup(torch.arange(12))["image_mask"].tolist() == has_image
