"""Pre-training on several platforms: prepared datasets mixed, ids kept apart, sampling policies, batches of one
platform (the two-process case is in tests/test_multiprocess.py)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from pmmrec_hf.data import PlatformBatchSampler, make_synthetic_dataset, mix_prepared, platform_probabilities

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("platforms")
    # two synthetic platforms whose raw ids collide ("item03", "user07" exist in both); the second is text-only
    make_synthetic_dataset(num_items=30, num_users=40, seed=0, output_dir=root / "shop")
    make_synthetic_dataset(num_items=20, num_users=10, seed=1, output_dir=root / "books", missing_image_rate=1.0)
    return root / "shop", root / "books"


def test_sampling_probabilities_by_hand():
    assert platform_probabilities([100, 25]) == pytest.approx([0.8, 0.2])
    assert platform_probabilities([100, 25], "uniform") == pytest.approx([0.5, 0.5])
    assert platform_probabilities([100, 25], "temperature", 2.0) == pytest.approx([10 / 15, 5 / 15])
    with pytest.raises(ValueError, match=r"--mixture-sampling\) must be one of"):
        platform_probabilities([1], "zipf")
    with pytest.raises(ValueError, match=r"--mixture-temperature\) must be positive"):
        platform_probabilities([1, 2], "temperature", 0.0)


def test_mixing_keeps_ids_apart_and_follows_the_policy(folders):
    shop, books = folders
    mixture = mix_prepared([shop, books])
    # both are named "synthetic" in their metadata: the folder names tell them apart
    assert mixture.names == ["shop", "books"] and mixture.sizes == [40, 10]
    ids = list(mixture.items["item_id"])
    assert len(ids) == len(set(ids)) == 50 and ids[0].startswith("shop:") and ids[-1].startswith("books:")
    assert mixture.item_platform == [0] * 30 + [1] * 20
    assert len(mixture.train) == 50  # proportional: every row once
    for row in mixture.train:
        name = mixture.names[row["platform"]]
        assert row["user_id"].startswith(name + ":") and all(i.startswith(name + ":") for i in row["item_ids"])
    assert {r["user_id"] for r in mixture.validation} == {r["user_id"] for r in mixture.train}
    uniform = mix_prepared([shop, books], sampling="uniform", seed=0)
    per_platform = Counter(uniform.train["platform"])
    # all_exhausted: drawn 1:1 until the larger platform's 40 rows are all out; the 10 books rows come again
    assert per_platform[0] == 40 and 35 <= per_platform[1] <= 45
    assert len(set(r["user_id"] for r in uniform.train if r["platform"] == 1)) == 10


def test_a_text_only_platform_mixes_with_a_multimodal_one(folders):
    from pmmrec_hf.data import PMMRecCollator
    from pmmrec_hf.data.synthetic import synthetic_tokenizer

    mixture = mix_prepared(list(folders))
    collator = PMMRecCollator(mixture.items, synthetic_tokenizer(), max_length=8, image_size=16)
    rows = [r for r in mixture.train.select(range(38, 42))]  # shop rows and books rows together
    batch = collator(rows)
    from_books = torch.tensor([mixture.item_platform[i] == 1 for i in batch["item_ids"].tolist()])
    assert from_books.any() and (~from_books).any()
    assert torch.equal(batch["image_mask"], ~from_books)  # books have no images: text path, not a placeholder


def test_platform_batches_hold_one_platform_and_runs_fill_a_step():
    row_platform = [0] * 10 + [1] * 3 + [2] * 7
    sampler = PlatformBatchSampler(row_platform, batch_size=2, probabilities=[0.5, 0.25, 0.25],
                                   generator=torch.Generator().manual_seed(0), group=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 + 2 + 4  # per platform: ceil(ceil(n / 2) / 2) * 2
    platforms = [{row_platform[i] for i in batch} for batch in batches]
    assert all(len(p) == 1 for p in platforms)
    assert all(platforms[k] == platforms[k + 1] for k in range(0, len(batches), 2))  # a step's two batches
    assert {i for batch in batches for i in batch} == set(range(20))
    again = PlatformBatchSampler(row_platform, 2, [0.5, 0.25, 0.25], torch.Generator().manual_seed(0), group=2)
    assert list(again) == batches


def test_pretraining_on_two_platforms_with_per_platform_batches(folders, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("example_pretrain_mix", ROOT / "examples" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    from pmmrec_hf import PMMRecModel

    seen = []
    original = PMMRecModel.forward

    def forward(self, *args, **kwargs):
        if self.training:
            seen.append(kwargs["item_ids"].tolist())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PMMRecModel, "forward", forward)
    summary = pretrain.main(["--dataset", str(folders[0]), str(folders[1]), "--mixture-batches", "per-platform",
                             "--hidden-size", "16", "--batch-size", "4", "--max-steps", "6", "--eval-steps", "0",
                             "--report-to", "none", "--image-size", "16", "--max-eval-users", "20",
                             "--output-dir", str(tmp_path)])
    assert summary["global_step"] == 6 and len(seen) == 6
    assert all(len({i >= 30 for i in batch}) == 1 for batch in seen)  # each batch: shop items or books items
    assert len({batch[0] >= 30 for batch in seen}) == 2  # both platforms were drawn
    assert summary["eval_history"][-1]["num_users"] == 20


def test_streaming_platforms_are_interleaved(folders):
    mixture = mix_prepared(list(folders), sampling="temperature", temperature=2.0, streaming=True, seed=0)
    total = 40**0.5 + 10**0.5
    assert mixture.row_platform is None and mixture.probabilities == pytest.approx([40**0.5 / total, 10**0.5 / total])
    rows = list(mixture.train)
    assert {r["platform"] for r in rows} == {0, 1}
    assert all(r["user_id"].startswith(mixture.names[r["platform"]] + ":") for r in rows)
    assert len({r["user_id"] for r in rows if r["platform"] == 0}) == 40  # all_exhausted: every row came
