import time
from collections import Counter

import numpy as np
import pytest

from pmmrec_hf.data.synthetic import (
    SYNTHETIC_VOCABULARY,
    make_synthetic_dataset,
    reference_hit_rates,
    synthetic_tokenizer,
)


@pytest.fixture(scope="module")
def default_data():
    start = time.perf_counter()
    data = make_synthetic_dataset(seed=0)
    data.generation_seconds = time.perf_counter() - start
    return data


def _small(seed=1, **kw):
    return make_synthetic_dataset(num_items=60, num_users=40, num_categories=5, seed=seed, image_size=16, **kw)


def _content(data):
    items = data.items.with_format(None)
    images = [img.tobytes() for img in items["image"]]
    splits = {name: data.splits[name].to_dict() for name in ("train", "validation", "test")}
    return items["item_id"], items["text"], images, items["train_count"], splits


def test_deterministic_for_a_seed():
    a, b, c = _small(seed=4), _small(seed=4), _small(seed=5)
    assert _content(a) == _content(b)
    assert np.array_equal(a.item_categories, b.item_categories)
    assert _content(a)[1] != _content(c)[1]
    assert _content(a)[4] != _content(c)[4]


def test_sizes_and_split_contract(default_data):
    data = default_data
    assert data.generation_seconds < 10
    assert len(data.items) == 500 and data.items.column_names == ["item_id", "text", "image", "train_count"]
    assert data.items[0]["image"].size == (32, 32)
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    assert len(train) == len(val) == len(test) == 2000
    assert len(set(data.item_categories.tolist())) == 10
    counts = Counter()
    for t, v, s in zip(train, val, test):
        assert t["user_id"] == v["user_id"] == s["user_id"]
        assert v["item_ids"][:-1] == t["item_ids"] and s["item_ids"][:-1] == v["item_ids"]
        assert v["timestamps"][:-1] == t["timestamps"] and s["timestamps"][:-1] == v["timestamps"]
        assert 3 <= len(s["item_ids"]) <= 20 + 3 and len(s["timestamps"]) == len(s["item_ids"])
        assert s["timestamps"] == sorted(s["timestamps"])
        counts.update(t["item_ids"])
    assert data.items["train_count"] == [counts[i] for i in data.items["item_id"]]
    assert data.metadata["counts"]["users"] == 2000
    assert data["items"] is data.items and data["validation"] is val


def test_learnable_from_content(default_data):
    rates = reference_hit_rates(default_data, "validation", k=10)
    # the category-aware predictor beats the most-popular baseline by a clear margin
    assert rates["category_oracle"] > rates["popularity"] + 0.15, rates
    assert rates["category_oracle"] > 1.5 * rates["popularity"], rates


def test_content_reflects_category(default_data):
    data = default_data
    cats = data.item_categories
    # images: a nearest-centroid classifier on crude colour features (background colour, shape colour,
    # shape coverage; the shape kind, which also differs per category, is not even used) recovers the category
    def features(image):
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        background = np.median(pixels, axis=0)
        shape = np.abs(pixels - background).sum(axis=1) > 60
        foreground = pixels[shape].mean(axis=0) if shape.any() else background
        return np.concatenate([background, foreground, [255 * shape.mean()]])

    x = np.stack([features(image) for image in data.items["image"]])
    centroids = np.stack([x[cats == c].mean(0) for c in range(10)])
    predicted = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == cats).mean() > 0.85
    # texts: the colour word is from the item's own category most of the time
    own = [set(data.category_words["colour"][c]) for c in cats]
    hits = [bool(own[i] & set(text.split())) for i, text in enumerate(data.items["text"])]
    assert np.mean(hits) > 0.8


def test_tokenizer_covers_vocabulary(default_data):
    tok = synthetic_tokenizer()
    assert len(tok) == len(SYNTHETIC_VOCABULARY) + 4
    assert [tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")] == [0, 1, 2, 3]
    encoded = tok(default_data.items["text"][:100])
    for ids in encoded["input_ids"]:
        assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
    assert tok("Red LAMP zzzz")["input_ids"] == [2, tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("lamp"), 1, 3]
    assert set(encoded.keys()) == {"input_ids", "attention_mask"}


def test_missing_images_and_prepared_folder(tmp_path):
    from pmmrec_hf.data.format import load_items, load_prepared

    data = _small(seed=2, missing_image_rate=0.3, output_dir=tmp_path / "syn")
    missing = sum(img is None for img in data.items["image"])
    assert missing == data.metadata["counts"]["images_missing"] > 0
    items, item_to_index = load_items(tmp_path / "syn")
    assert item_to_index == data.item_to_index
    assert items["text"] == data.items["text"] and items["train_count"] == data.items["train_count"]
    assert sum(img is None for img in items["image"]) == missing
    splits = load_prepared(tmp_path / "syn")
    for name in ("train", "validation", "test"):
        assert splits[name].to_dict() == data.splits[name].to_dict()
    assert data.folder == tmp_path / "syn"


def test_argument_validation():
    with pytest.raises(ValueError, match="num_categories"):
        make_synthetic_dataset(num_items=3, num_users=5, num_categories=4)
    with pytest.raises(ValueError, match="text_noise"):
        make_synthetic_dataset(num_items=10, num_users=5, num_categories=2, text_noise=1.5)
