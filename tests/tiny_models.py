"""Tiny configurations and batches shared by the tests (hidden 32, 2-3 layers, 30x30 images)."""

from __future__ import annotations

import torch
from transformers import BertConfig, CLIPVisionConfig, ResNetConfig

from pmmrec_hf import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecUserEncoderConfig

VOCAB = 99
IMAGE = 30


def tiny_text_config(**kw) -> BertConfig:
    args = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, vocab_size=VOCAB,
                max_position_embeddings=64)
    args.update(kw)
    return BertConfig(**args)


def tiny_vision_config(kind: str = "clip", **kw):
    if kind == "clip":
        args = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                    image_size=IMAGE, patch_size=10)
        args.update(kw)
        return CLIPVisionConfig(**args)
    if kind == "resnet":
        args = dict(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], num_channels=3)
        args.update(kw)
        return ResNetConfig(**args)
    raise ValueError(kind)


def tiny_item_config(modality: str = "multimodal", vision: str = "clip", **kw) -> PMMRecItemEncoderConfig:
    args = dict(
        text_config=tiny_text_config() if modality != "vision" else None,
        vision_config=tiny_vision_config(vision) if modality != "text" else None,
        modality=modality,
        hidden_size=16,
        fusion_num_attention_heads=2,
        fusion_intermediate_size=24,
        image_size=IMAGE,
        max_text_length=8,
    )
    args.update(kw)
    return PMMRecItemEncoderConfig(**args)


def tiny_user_config(**kw) -> PMMRecUserEncoderConfig:
    args = dict(hidden_size=16, intermediate_size=32, max_position_embeddings=5)
    args.update(kw)
    return PMMRecUserEncoderConfig(**args)


def tiny_config(modality: str = "multimodal", vision: str = "clip", item_kw=None, **kw) -> PMMRecConfig:
    args = dict(
        item_encoder_config=tiny_item_config(modality, vision, **(item_kw or {})),
        user_encoder_config=tiny_user_config(),
        nicl_projection_size=8,
    )
    if modality != "multimodal":
        args["nicl_weight"] = 0.0
    args.update(kw)
    return PMMRecConfig(**args)


def item_inputs(num_items: int, seed: int = 0, text_len: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (num_items, text_len), generator=g)
    attention_mask = torch.ones(num_items, text_len, dtype=torch.long)
    for i in range(num_items):  # varied text lengths, at least 2 tokens
        attention_mask[i, 2 + i % (text_len - 2):] = 0
    input_ids = input_ids * attention_mask
    pixel_values = torch.randn(num_items, 3, IMAGE, IMAGE, generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def tiny_batch(seed: int = 0) -> dict:
    """3 users over 6 distinct items (ids 0, 3, ..., 15); item_index (3, 6) left-padded; with corruption."""
    num_items = 6
    batch = item_inputs(num_items, seed)
    batch.update(
        item_ids=torch.arange(num_items) * 3,
        item_index=torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 4, 5, 1, 2, 3], [-1, -1, -1, -1, 5, 4]]),
        item_log_popularity=torch.log(torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1])),
        corrupted_index=torch.tensor([[-1, -1, 0, 1, 5], [0, 4, 5, 2, 1], [-1, -1, -1, -1, 5]]),
        noise_labels=torch.tensor([[-100, -100, 0, 0, 1], [0, 0, 0, 1, 1], [-100, -100, -100, -100, 0]]),
    )
    return batch


def batch_from_sequences(sequences: list[list[int]], catalogue: dict, slots: int) -> dict:
    """A model batch for sequences of catalogue item ids: distinct items once, left-padded index (B, slots).

    catalogue: dict of per-item tensors indexed by item id (input_ids, attention_mask, pixel_values, log_q).
    """
    distinct = sorted({i for seq in sequences for i in seq})
    position = {item: n for n, item in enumerate(distinct)}
    index = torch.full((len(sequences), slots), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = seq[-slots:]
        index[row, slots - len(seq):] = torch.tensor([position[i] for i in seq])
    ids = torch.tensor(distinct)
    batch = {k: catalogue[k][ids] for k in ("input_ids", "attention_mask", "pixel_values")}
    batch.update(item_ids=ids, item_index=index, item_log_popularity=catalogue["log_q"][ids])
    return batch


def tiny_catalogue(num_items: int = 20, seed: int = 0) -> dict:
    catalogue = item_inputs(num_items, seed)
    g = torch.Generator().manual_seed(seed + 1)
    catalogue["log_q"] = torch.log_softmax(torch.randn(num_items, generator=g), 0)
    return catalogue
