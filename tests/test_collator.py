import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pmmrec_hf.data.collator import (
    ItemInputEncoder,
    ItemTable,
    PMMRecCollator,
    PMMRecEvalCollator,
    encode_item_inputs,
)
from pmmrec_hf.data.synthetic import SYNTHETIC_VOCABULARY, make_synthetic_dataset, synthetic_tokenizer

IMAGE = 16


@pytest.fixture(scope="module")
def data():
    return make_synthetic_dataset(num_items=40, num_users=30, num_categories=4, seed=3, image_size=IMAGE)


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer()


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert_tok")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SYNTHETIC_VOCABULARY]) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def _vit_processor():
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(size={"height": 12, "width": 12}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])


def _png(colour, size=20):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(data, split="train", n=8):
    return [data.splits[split][i] for i in range(n)]


def _check_reconstruction(batch, rows, index, width):
    item_ids, item_index = batch["item_ids"], batch["item_index"]
    assert item_index.shape == (len(rows), width)
    assert len(set(item_ids.tolist())) == len(item_ids)  # every distinct item exactly once
    used = sorted(set(item_index[item_index >= 0].tolist()))
    assert used == list(range(len(item_ids)))
    for row, r in zip(item_index, rows):
        expected = [index[i] for i in r][-width:]
        pad = width - len(expected)
        assert row[:pad].tolist() == [-1] * pad
        assert item_ids[row[pad:]].tolist() == expected


def test_batch_structure_and_reconstruction(data, tokenizer):
    collator = PMMRecCollator(data.items, tokenizer, max_length=5, max_text_length=16, image_size=IMAGE)
    rows = _rows(data, n=10)
    batch = collator(rows)
    assert set(batch) == {"item_ids", "input_ids", "attention_mask", "pixel_values", "image_mask", "item_index",
                          "item_log_popularity"}
    _check_reconstruction(batch, [r["item_ids"] for r in rows], data.item_to_index, 6)
    n = len(batch["item_ids"])
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == n
    assert batch["input_ids"].shape[1] <= 16
    assert batch["pixel_values"].shape == (n, 3, IMAGE, IMAGE)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["item_index"].dtype == batch["item_ids"].dtype == torch.long
    counts = torch.tensor(data.items["train_count"], dtype=torch.float64)
    q = (counts + 1) / (counts + 1).sum()
    assert torch.allclose(batch["item_log_popularity"].double(), q.log()[batch["item_ids"]], atol=1e-6)
    assert collator.stats == {"images_missing": 0, "images_undecodable": 0}


def test_integer_ids_plain_rows_and_unknown_ids(data, tokenizer):
    collator = PMMRecCollator(data.items, tokenizer, max_length=4, image_size=IMAGE)
    a = collator([{"item_ids": ["item01", "item05", "item01"]}])
    b = collator([[1, 5, 1]])
    for key in a:
        assert torch.equal(a[key], b[key])
    assert a["item_ids"].tolist() == [1, 5] and a["item_index"].tolist() == [[-1, -1, 0, 1, 0]]
    with pytest.raises(KeyError, match="nope"):
        collator([{"item_ids": ["nope"]}])


@pytest.mark.parametrize("which", ["synthetic", "bert+vit"])
def test_item_encoding_equals_encoding_alone(data, tokenizer, bert_tokenizer, which):
    tok, proc = (tokenizer, None) if which == "synthetic" else (bert_tokenizer, _vit_processor())
    collator = PMMRecCollator(data.items, tok, proc, max_length=6, max_text_length=9, image_size=IMAGE)
    batch = collator(_rows(data, n=6))
    for j, item in enumerate(batch["item_ids"].tolist()):
        alone = encode_item_inputs(
            [data.items[item]["text"]], [data.items[item]["image"]], tok, proc, max_text_length=9, image_size=IMAGE
        )
        mask = batch["attention_mask"][j].bool()
        assert alone["attention_mask"][0].sum() == mask.sum()
        assert torch.equal(batch["input_ids"][j][mask], alone["input_ids"][0][alone["attention_mask"][0].bool()])
        assert torch.equal(batch["pixel_values"][j], alone["pixel_values"][0])


def test_default_transform_is_squash_and_half_normalisation():
    image = Image.new("RGB", (30, 10), (255, 0, 51))  # not square: squashed, no crop
    pixels = encode_item_inputs(None, [image], image_size=8)["pixel_values"]
    assert pixels.shape == (1, 3, 8, 8)
    expected = torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]).view(3, 1, 1).expand(3, 8, 8)
    assert torch.allclose(pixels[0], expected, atol=1e-6)
    grey = encode_item_inputs(None, [Image.new("L", (5, 5), 0)], image_size=4)["pixel_values"]  # converted to RGB
    assert torch.allclose(grey, torch.full((1, 3, 4, 4), -1.0))


def _broken_table():
    images = [
        _png((200, 10, 10)),                    # 0 ok (bytes)
        None,                                   # 1 missing
        b"not an image at all",                 # 2 undecodable
        {"bytes": None, "path": None},          # 3 missing (empty struct)
        {"bytes": _png((0, 0, 255)), "path": None},  # 4 ok (struct)
        "/definitely/not/here.png",             # 5 undecodable (path)
        Image.new("RGB", (9, 9), (0, 255, 0)),  # 6 ok (PIL)
    ]
    return ItemTable(
        [f"x{i}" for i in range(len(images))],
        texts=[f"red lamp {i}" for i in range(len(images))],
        images=images,
        train_counts=[1] * len(images),
    )


def test_missing_and_undecodable_images_placeholder_counts_and_log(tokenizer, caplog):
    table = _broken_table()
    collator = PMMRecCollator(table, tokenizer, max_length=8, image_size=IMAGE)
    assert collator.stats == {"images_missing": 0, "images_undecodable": 0}  # nothing decoded yet
    rows = [{"item_ids": ["x0", "x1", "x2", "x3"]}, {"item_ids": ["x4", "x5", "x6", "x2", "x1"]}]
    with caplog.at_level(logging.WARNING, logger="pmmrec_hf.data.collator"):
        batch = collator(rows)
        collator(rows)
    assert batch["item_ids"].tolist() == list(range(7))
    pixels = batch["pixel_values"]
    for placeholder in (1, 2, 3, 5):
        assert torch.equal(pixels[placeholder], torch.zeros(3, IMAGE, IMAGE))
    for real in (0, 4, 6):
        assert pixels[real].abs().sum() > 0
    assert batch["image_mask"].tolist() == [True, False, False, False, True, False, True]  # placeholders marked
    assert collator.stats == {"images_missing": 4, "images_undecodable": 4}  # 2 + 2 per batch, two batches
    messages = [r.getMessage() for r in caplog.records]
    assert sum("x2" in m for m in messages) == 1 and sum("x5" in m for m in messages) == 1
    assert len(messages) == 2
    collator.reset_stats()
    assert collator.stats == {"images_missing": 0, "images_undecodable": 0}


def test_placeholder_with_custom_processor_all_missing(tokenizer):
    table = ItemTable(["a", "b"], texts=["red", "blue"], images=[None, b"garbage"])
    collator = PMMRecCollator(table, tokenizer, _vit_processor(), max_length=2)
    batch = collator([["a", "b"]])
    assert torch.equal(batch["pixel_values"], torch.zeros(2, 3, 12, 12))
    assert "item_log_popularity" not in batch  # no train counts in this table
    assert collator.stats == {"images_missing": 1, "images_undecodable": 1}


def test_modality_switches(data, tokenizer):
    rows = _rows(data, n=4)
    text = PMMRecCollator(data.items, tokenizer, modality="text", max_length=5)(rows)
    assert "pixel_values" not in text and "input_ids" in text and "attention_mask" in text
    vision = PMMRecCollator(data.items, None, modality="vision", max_length=5, image_size=IMAGE)(rows)
    assert "input_ids" not in vision and "attention_mask" not in vision and "pixel_values" in vision
    assert torch.equal(text["item_index"], vision["item_index"])
    with pytest.raises(ValueError, match="tokenizer"):
        PMMRecCollator(data.items, None, modality="multimodal")
    with pytest.raises(ValueError, match="modality"):
        PMMRecCollator(data.items, tokenizer, modality="audio")
    with pytest.raises(ValueError, match="images"):
        PMMRecCollator(ItemTable(["a"], texts=["red"]), tokenizer, modality="multimodal")


def test_corruption_keys_seeded(data, tokenizer):
    rows = _rows(data, n=16)
    kwargs = dict(modality="text", max_length=6, replace_prob=0.3, shuffle_prob=0.5)
    a = PMMRecCollator(data.items, tokenizer, seed=11, **kwargs)(rows)
    b = PMMRecCollator(data.items, tokenizer, seed=11, **kwargs)(rows)
    c = PMMRecCollator(data.items, tokenizer, seed=12, **kwargs)(rows)
    inputs = a["item_index"][:, :-1]
    assert a["corrupted_index"].shape == a["noise_labels"].shape == inputs.shape == (16, 6)
    real = inputs >= 0
    assert torch.all(a["corrupted_index"][~real] == -1) and torch.all(a["noise_labels"][~real] == -100)
    assert torch.equal(a["noise_labels"][real], (a["corrupted_index"][real] != inputs[real]).long())
    assert a["corrupted_index"].max() < len(a["item_ids"])
    assert torch.equal(a["corrupted_index"], b["corrupted_index"]) and torch.equal(a["noise_labels"], b["noise_labels"])
    assert not torch.equal(a["corrupted_index"], c["corrupted_index"])
    clean = PMMRecCollator(data.items, tokenizer, modality="text", max_length=6)(rows)
    assert "corrupted_index" not in clean and "noise_labels" not in clean
    with pytest.raises(ValueError, match="replace_prob"):
        PMMRecCollator(data.items, tokenizer, replace_prob=2.0)


def test_eval_collator(data, tokenizer):
    rows = _rows(data, "test", n=6)
    index = data.item_to_index
    batch = PMMRecEvalCollator(data.items, tokenizer, max_length=4, image_size=IMAGE)(rows)
    assert batch["targets"].tolist() == [index[r["item_ids"][-1]] for r in rows]
    _check_reconstruction(batch, [r["item_ids"][:-1] for r in rows], index, 4)
    width = max(len(r["item_ids"]) - 1 for r in rows)
    assert batch["history"].shape == (len(rows), width)
    for hist, r in zip(batch["history"].tolist(), rows):
        seen = [index[i] for i in r["item_ids"][:-1]]
        assert hist == [-1] * (width - len(seen)) + seen
    assert "corrupted_index" not in batch and "item_log_popularity" not in batch
    with pytest.raises(ValueError, match="at least 2"):
        PMMRecEvalCollator(data.items, tokenizer)([{"user_id": "u", "item_ids": ["item01"]}])


def test_from_config(data, tokenizer):
    import sys

    sys.path.insert(0, "tests")
    from tiny_models import tiny_config

    config = tiny_config()
    collator = PMMRecCollator.from_config(config, data.items, tokenizer)
    assert collator.max_length == config.user_encoder_config.max_position_embeddings
    assert collator.encoder.transform.image_size == config.item_encoder_config.image_size
    assert collator.replace_prob == config.replace_prob
    eval_collator = PMMRecEvalCollator.from_config(config, data.items, tokenizer)
    assert not eval_collator.corruption


def test_dataloader_workers(data, tokenizer):
    images = list(data.items["image"])
    images[0], images[1] = None, b"broken"
    table = ItemTable(data.items["item_id"], data.items["text"], images, data.items["train_count"])
    collator = PMMRecCollator(table, tokenizer, max_length=5, image_size=IMAGE)
    rows = list(data.splits["train"])
    loader = torch.utils.data.DataLoader(rows, batch_size=7, num_workers=2, collate_fn=collator)
    batches = list(loader)
    expected = [collator(rows[i : i + 7]) for i in range(0, len(rows), 7)]
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    per_pass = {
        "images_missing": sum(0 in b["item_ids"].tolist() for b in expected),
        "images_undecodable": sum(1 in b["item_ids"].tolist() for b in expected),
    }
    assert per_pass["images_missing"] > 0
    # two passes counted: the workers' and the in-process one
    assert collator.stats == {k: 2 * v for k, v in per_pass.items()}


def test_item_table_from_dataset_does_not_decode(data):
    table = ItemTable.from_dataset(data.items)
    raw = table.get_images([0, 3])
    assert all(isinstance(r, dict) and r["bytes"] for r in raw)
    assert table.get_texts([2]) == [data.items[2]["text"]]
    assert torch.allclose(table.log_popularity.exp().sum(), torch.tensor(1.0))
    assert not math.isnan(float(table.log_popularity.sum()))
    encoder = ItemInputEncoder(None, modality="vision", image_size=IMAGE)
    assert torch.equal(encoder(images=raw)["pixel_values"], encoder(images=[data.items[0]["image"], data.items[3]["image"]])["pixel_values"])
    assert np.array_equal(table.train_counts.numpy(), np.asarray(data.items["train_count"]))


def test_item_table_from_reordered_dataset(data):
    shuffled = data.items.select([5, 2, 7])
    table = ItemTable.from_dataset(shuffled)
    assert table.item_ids == [data.items[i]["item_id"] for i in (5, 2, 7)]
    assert table.get_texts([0, 1, 2]) == [data.items[i]["text"] for i in (5, 2, 7)]
    assert table.get_images([1])[0]["bytes"] == ItemTable.from_dataset(data.items).get_images([2])[0]["bytes"]
