"""PMMRecProcessor (one image path with the collator), encode() APIs, the custom pipelines in the package, and the
transformers conventions of the models (_no_split_modules, attn_implementation, return_dict, docstrings,
main_input_name, dummy_inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, pipeline

from pmmrec_hf import (
    PMMRecImageProcessor,
    PMMRecItemEncoder,
    PMMRecModel,
    PMMRecProcessor,
    PMMRecUserEncoder,
)
from pmmrec_hf.data.collator import ItemInputEncoder
from pmmrec_hf.recommend import Recommender
from pmmrec_hf.training import save_pmmrec_outputs
from test_model_card import tiny_tokenizer
from tiny_models import IMAGE, tiny_config, tiny_item_config

TEXTS = ["Red Cotton T-SHIRT with a very long description that is cut", "blue jeans", "A Lamp", "green mug"]


def _images() -> list:
    return [
        Image.linear_gradient("L").resize((40, 28)),  # greyscale
        Image.linear_gradient("L").resize((20, 50)).convert("P"),  # palette
        Image.new("RGBA", (33, 33), (200, 30, 60, 90)),  # with alpha
        Image.new("RGB", (50, 40), "orange"),
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = PMMRecModel(tiny_config()).eval()
    paths = save_pmmrec_outputs(model, str(tmp_path_factory.mktemp("saved")), tiny_tokenizer())
    return model, paths


# --------------------------------------------------------------------------------------------------
# processor
# --------------------------------------------------------------------------------------------------


def test_collator_and_published_processor_give_identical_pixels(saved):
    model, paths = saved
    images = _images()
    collator = ItemInputEncoder(tiny_tokenizer(), modality="multimodal", max_text_length=8, image_size=IMAGE)
    published = AutoProcessor.from_pretrained(paths["item_encoder"])
    assert type(published) is PMMRecProcessor and type(AutoImageProcessor.from_pretrained(paths["model"])) is \
        PMMRecImageProcessor
    texts = TEXTS + ["an item without an image"]
    from_collator = collator(texts=texts, images=images + [None])
    from_processor = published(text=texts, images=images + [None])
    assert from_processor["pixel_values"].shape == (5, 3, IMAGE, IMAGE)
    assert torch.equal(from_collator["pixel_values"], from_processor["pixel_values"])
    assert torch.equal(from_collator["image_mask"], from_processor["image_mask"])
    assert from_processor["image_mask"].tolist() == [True, True, True, True, False]
    assert torch.equal(from_processor["pixel_values"][4], torch.zeros(3, IMAGE, IMAGE))  # the placeholder
    # the same numbers as the direct transform: RGB, bilinear squash, (x / 255 - 0.5) / 0.5
    rgb = np.asarray(images[0].convert("RGB").resize((IMAGE, IMAGE), Image.BILINEAR), dtype=np.float32)
    expected = torch.from_numpy((rgb / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.allclose(from_processor["pixel_values"][0], expected, atol=1e-6)


def test_processor_lowercases_truncates_and_keeps_the_trained_settings(saved):
    model, paths = saved
    processor = PMMRecProcessor.from_pretrained(paths["model"])
    item = model.config.item_encoder_config
    assert (processor.max_text_length, processor.do_lower_case, processor.modality) == (8, True, "multimodal")
    assert processor.image_processor.image_size == item.image_size
    assert processor.image_processor.image_mean == item.image_mean
    got = processor(text=TEXTS)
    want = tiny_tokenizer()([t.lower() for t in TEXTS], padding="longest", truncation=True, max_length=8,
                            return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and got["input_ids"].shape[1] == 8
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        processor(text=TEXTS[:2], images=_images()[:1])


def test_single_modality_processors_round_trip(tmp_path):
    vision = PMMRecProcessor.from_item_config(tiny_item_config("vision"))
    vision.save_pretrained(tmp_path / "vision")
    loaded = AutoProcessor.from_pretrained(tmp_path / "vision")
    assert loaded.tokenizer is None and loaded.modality == "vision"
    assert torch.equal(loaded(images=_images())["pixel_values"], vision(images=_images())["pixel_values"])
    with pytest.raises(ValueError, match="reads no text"):
        loaded(text=["a"])
    text = PMMRecProcessor.from_item_config(tiny_item_config("text"), tiny_tokenizer())
    text.save_pretrained(tmp_path / "text")
    loaded = PMMRecProcessor.from_pretrained(tmp_path / "text")
    assert loaded.image_processor is None and not (tmp_path / "text" / "preprocessor_config.json").exists()
    with pytest.raises(ValueError, match="tokenizer is required"):
        PMMRecProcessor.from_item_config(tiny_item_config("text"))


# --------------------------------------------------------------------------------------------------
# encode()
# --------------------------------------------------------------------------------------------------


def test_item_encode_matches_forward_and_restores_the_mode(saved):
    model, paths = saved
    item = PMMRecItemEncoder.from_pretrained(paths["item_encoder"]).train()
    processor = item.get_processor()
    with torch.no_grad():
        item.eval()
        want = torch.cat([item(**processor(text=TEXTS[i:i + 2], images=_images()[i:i + 2])).item_embeddings
                          for i in (0, 2)])
        item.train()
    got = item.encode(TEXTS, _images(), batch_size=2)
    assert isinstance(got, np.ndarray) and got.shape == (4, 16) and got.dtype == np.float32
    assert torch.equal(torch.from_numpy(got), want)
    assert item.training  # restored
    normalised = item.encode(TEXTS, _images(), batch_size=2, normalize=True, convert_to_tensor=True)
    assert isinstance(normalised, torch.Tensor)
    assert torch.allclose(normalised.norm(dim=-1), torch.ones(4), atol=1e-6)
    # texts only: every item is embedded from its text (no image), as an item without an image in training
    text_only = item.encode(TEXTS[:2], convert_to_tensor=True)
    with torch.no_grad():
        inputs = processor(text=TEXTS[:2], images=[None, None])
        assert torch.equal(text_only, item.eval()(**inputs).item_embeddings)
    with pytest.raises(ValueError, match="single string"):
        item.encode("a text")
    fresh = PMMRecItemEncoder(tiny_item_config())
    with pytest.raises(ValueError, match="No PMMRec processor"):
        fresh.encode(TEXTS)


def test_user_encode_and_encode_users_from_raw_items(saved):
    model, paths = saved
    full = PMMRecModel.from_pretrained(paths["model"]).eval()
    items = full.encode(TEXTS, _images(), convert_to_tensor=True)  # (4, d)
    window = full.config.user_encoder_config.max_position_embeddings  # 5
    history = [0, 1, 2, 3, 0, 1, 2]  # longer than the window: its last 5 items are read
    with torch.no_grad():
        want = full.encode_users(items, torch.tensor([history[-window:]])).user_embeddings
    from_embeddings = full.encode_users(histories=[items[history]], convert_to_tensor=True)
    assert torch.allclose(from_embeddings, want, atol=1e-6)
    raw = [{"text": TEXTS[i], "image": _images()[i]} for i in history]
    from_raw = full.encode_users(histories=[raw], convert_to_tensor=True)
    assert torch.allclose(from_raw, want, atol=1e-5)
    user = PMMRecUserEncoder.from_pretrained(paths["user_encoder"]).eval()
    two = user.encode([items[[0, 1]], items[[2]]], convert_to_tensor=True)
    with torch.no_grad():
        padded = torch.stack([items[[0, 1]], torch.cat([torch.zeros(1, 16), items[[2]]])])
        ref = user(padded, torch.tensor([[1, 1], [0, 1]])).user_embeddings
    assert torch.allclose(two, ref, atol=1e-6)
    with pytest.raises(ValueError, match="history 1 is empty"):
        user.encode([items[[0]], items[:0]])
    with pytest.raises(ValueError, match="not both"):
        full.encode_users(items, histories=[raw])


def test_recommender_uses_the_saved_processor_and_agrees_with_the_pipeline(saved):
    model, paths = saved
    full = PMMRecModel.from_pretrained(paths["model"]).eval()
    rec = Recommender(full)  # no tokenizer: the checkpoint's PMMRecProcessor
    assert isinstance(rec.processor, PMMRecProcessor)
    ids = ["a", "b", "c", "d"]
    rec.encode_catalogue(ids, texts=TEXTS, images=_images())
    # the Recommender embeds raw items through PMMRecItemEncoder.encode: the very same numbers
    assert torch.equal(rec.item_embeddings, full.encode(TEXTS, _images(), convert_to_tensor=True))
    expected = rec.recommend(["a", "c"], k=2)
    recommend = pipeline("pmmrec-recommendation", model=paths["model"], trust_remote_code=True)
    catalogue = {i: {"text": t, "image": im} for i, t, im in zip(ids, TEXTS, _images())}
    got = recommend(["a", "c"], catalogue=catalogue, top_k=2)
    assert [r["item_id"] for r in got] == [i for i, _ in expected]
    assert np.allclose([r["score"] for r in got], [s for _, s in expected], atol=1e-5)
    embed = pipeline("pmmrec-item-embedding", model=paths["item_encoder"], trust_remote_code=True)
    vector = embed({"text": TEXTS[1], "image": _images()[1]}, return_tensors=True)
    assert torch.allclose(vector, torch.from_numpy(full.item_encoder.encode(TEXTS[1:2], _images()[1:2]))[0], atol=1e-6)
    assert len(embed([TEXTS[0], TEXTS[1]])) == 2  # a list in, one embedding each


# --------------------------------------------------------------------------------------------------
# transformers conventions
# --------------------------------------------------------------------------------------------------


def test_no_split_modules_collect_the_backbones():
    model = PMMRecModel(tiny_config())
    for module in (model, model.item_encoder):
        assert {"PMMRecTransformerLayer", "BertLayer", "CLIPEncoderLayer"} <= set(module._no_split_modules)
    assert set(model.user_encoder._no_split_modules) == {"PMMRecTransformerLayer"}
    resnet = PMMRecItemEncoder(tiny_item_config(vision="resnet"))
    assert "ResNetConvLayer" in resnet._no_split_modules or "ResNetEmbeddings" in resnet._no_split_modules


def test_attn_implementation_is_honoured_or_refused(saved):
    model, paths = saved
    batch = {**model.dummy_inputs}
    eager = PMMRecModel.from_pretrained(paths["model"], attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    assert eager.item_encoder.text_model.config._attn_implementation == "eager"
    assert eager.item_encoder.vision_model.config._attn_implementation == "eager"
    assert eager.user_encoder.config._attn_implementation == "eager"
    sdpa = PMMRecModel.from_pretrained(paths["model"], attn_implementation="sdpa").eval()
    assert sdpa.item_encoder.text_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a, b = eager(**batch), sdpa(**batch)
    assert torch.allclose(a.item_embeddings, b.item_embeddings, atol=1e-5)
    assert torch.allclose(a.user_states, b.user_states, atol=1e-5)
    with pytest.raises((ValueError, ImportError), match="(?i)flash"):
        PMMRecModel.from_pretrained(paths["model"], attn_implementation="flash_attention_2")


def test_return_dict_false_main_input_name_dummy_inputs_and_docstrings():
    torch.manual_seed(0)
    model = PMMRecModel(tiny_config()).eval()
    vision_only = PMMRecItemEncoder(tiny_item_config("vision")).eval()
    assert (model.main_input_name, model.item_encoder.main_input_name, model.user_encoder.main_input_name,
            vision_only.main_input_name) == ("item_index", "input_ids", "inputs_embeds", "pixel_values")
    with torch.no_grad():
        for module in (model, model.item_encoder, model.user_encoder, vision_only):
            inputs = module.dummy_inputs
            assert module.main_input_name in inputs
            as_dict = module(**inputs)
            as_tuple = module(**inputs, return_dict=False)
            assert isinstance(as_tuple, tuple)
            values = [v for v in as_dict.values() if v is not None]
            assert len(as_tuple) == len(values) and all(torch.equal(x, y) for x, y in zip(as_tuple, values))
        assert model(**model.dummy_inputs).loss is not None
    for cls in (PMMRecModel, PMMRecItemEncoder, PMMRecUserEncoder):
        doc = cls.forward.__doc__
        assert "Args:" in doc and "Returns:" in doc, cls.__name__
        for name in ("return_dict",):
            assert name in doc
