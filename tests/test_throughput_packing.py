"""Packed tokens (pmmrec_hf.packing) and the sync-free losses equal the padded / default path.

Tolerances (tiny configs, CPU): fp32 1e-5 absolute on embeddings and losses, 1e-4 on gradients; bf16 autocast
0.05 absolute on embeddings of norm ~1 (bf16 keeps 8 mantissa bits: the two paths round differently).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput as bench  # noqa: E402

from pmmrec_hf.losses import (  # noqa: E402
    first_occurrence_index,
    first_occurrence_index_sorted,
    next_item_loss,
    nicl_loss,
)
from pmmrec_hf.packing import TokenPacking, bucket_size, geometric_buckets  # noqa: E402

SPEC = bench.size_spec("tiny")
V = (SPEC.vision["image_size"] // SPEC.vision["patch_size"]) ** 2 + 1


def _model(seed=0):
    return bench.build_model(SPEC, "eager", seed=seed, dropout=False).eval()


def _items(n, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    T = SPEC.text_tokens
    if lengths is None:
        lengths = torch.randint(1, T + 1, (n,), generator=g)
    ids = torch.randint(5, SPEC.text["vocab_size"], (n, T), generator=g)
    positions = torch.arange(T)[None]
    mask = (positions < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))  # pad id 1 after the real tokens
    size = SPEC.image_size
    pixels = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    has_image = torch.rand(n, generator=g) > 0.25
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_mask": has_image}, lengths


@pytest.mark.parametrize("attention", ["grid", "nested"])
@pytest.mark.parametrize("buckets", [None, (64, 128, 256)])
def test_packed_item_encoder_equals_padded_fp32(attention, buckets):
    model = _model()
    inputs, lengths = _items(11)
    encoder = model.item_encoder
    padded = encoder(**inputs)
    plan = TokenPacking.build(lengths, SPEC.text_tokens, V, has_image=inputs["image_mask"], token_buckets=buckets,
                              attention=attention)
    if buckets:
        assert plan.packed_text_tokens == bucket_size(int(lengths.sum()), buckets) > int(lengths.sum())
    packed = encoder(**inputs, token_packing=plan)
    for name in ("item_embeddings", "text_embeddings", "vision_embeddings"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=1e-5)
    assert packed.last_hidden_state is None


def test_packed_gradients_equal_padded():
    inputs, lengths = _items(9, seed=3)
    grads = []
    for packing in (None, TokenPacking.build(lengths, SPEC.text_tokens, V, has_image=inputs["image_mask"],
                                             token_buckets=(128,))):
        model = _model()
        out = model.item_encoder(**inputs, token_packing=packing)
        (out.item_embeddings.square().sum() + out.text_embeddings.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)


def test_packed_equals_padded_bf16_autocast():
    model = _model()
    inputs, lengths = _items(10, seed=5)
    plan = TokenPacking.build(lengths, SPEC.text_tokens, V, has_image=inputs["image_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = model.item_encoder(**inputs).item_embeddings.float()
        packed = model.item_encoder(**inputs, token_packing=plan).item_embeddings.float()
    assert padded.abs().max() > 0.1
    torch.testing.assert_close(packed, padded, atol=0.05, rtol=0.05)


def test_packed_from_cached_features_and_full_model_loss():
    model = _model()
    inputs, lengths = _items(8, seed=7)
    encoder = model.item_encoder
    features = {
        "text_features": encoder.text_frozen_features(inputs["input_ids"], inputs["attention_mask"]),
        "attention_mask": inputs["attention_mask"],
        "vision_features": encoder.vision_frozen_features(inputs["pixel_values"]),
        "image_mask": inputs["image_mask"],
    }
    index = torch.tensor([[-1, 0, 1, 2, 3], [4, 5, 1, 6, 7], [-1, -1, 2, 0, 5]])
    batch = dict(item_ids=torch.arange(8) * 3, item_index=index, **features)
    plan = TokenPacking.build(lengths, SPEC.text_tokens, V, has_image=inputs["image_mask"], token_buckets=(96,))
    plain = model(**batch)
    packed = model(**batch, token_packing=plan, sync_free=True)
    torch.testing.assert_close(packed.item_embeddings, plain.item_embeddings, atol=1e-5, rtol=1e-5)
    for name in ("loss", "next_item_loss", "nicl_loss"):
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), atol=1e-5, rtol=1e-5)


def test_packing_plan_errors_name_the_option():
    with pytest.raises(ValueError, match="token_packing"):
        TokenPacking.build([0, 3], 8, V)
    with pytest.raises(ValueError, match="token_packing attention"):
        TokenPacking.build([2, 3], 8, V, attention="flash")
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_size(300, (64, 128))
    model = _model()
    inputs, lengths = _items(4)
    plan = TokenPacking.build(lengths[:3], SPEC.text_tokens, V)
    with pytest.raises(ValueError, match="planned for 3 items"):
        model.item_encoder(**inputs, token_packing=plan)


def test_geometric_buckets():
    sizes = geometric_buckets(64, 1000)
    assert sizes[0] == 64 and sizes[-1] >= 1000
    assert all(b > a and b % 8 == 0 and b / a <= 1.25 for a, b in zip(sizes, sizes[1:]))


# ------------------------------------------------------------------ sync-free losses


def test_first_occurrence_sorted_equals_unique_based():
    g = torch.Generator().manual_seed(0)
    for size in (0, 1, 7, 100):
        ids = torch.randint(-3, 12, (size,), generator=g)
        assert torch.equal(first_occurrence_index_sorted(ids), first_occurrence_index(ids))


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, b, s, d = 12, 4, 6, 8
    index = torch.randint(0, n, (b, s), generator=g)
    index[0, :2] = -1
    index[2, :4] = -1
    ids = torch.randint(0, 9, (n,), generator=g)  # repeats: duplicate candidates
    text = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    vision = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    has_image = torch.rand(n, generator=g) > 0.2
    return index, ids, text, vision, has_image


def test_nicl_sync_free_equals_default():
    index, ids, text, vision, has_image = _loss_inputs()
    for reduction in ("mean", "sum"):
        plain, count = nicl_loss(text, vision, index, ids, reduction=reduction, item_has_image=has_image,
                                 return_count=True)
        free, free_count = nicl_loss(text, vision, index, ids, reduction=reduction, item_has_image=has_image,
                                     return_count=True, sync_free=True)
        torch.testing.assert_close(free, plain, atol=1e-6, rtol=1e-6)
        assert int(free_count) == int(count)


def test_next_item_sync_free_equals_default():
    index, ids, text, _, _ = _loss_inputs(1)
    g = torch.Generator().manual_seed(2)
    p = 10
    query = torch.randn(p, text.shape[1], generator=g)
    targets = torch.randint(0, text.shape[0], (p,), generator=g)
    users = torch.randint(0, index.shape[0], (p,), generator=g)
    user_ids = torch.where(index >= 0, ids[index.clamp(min=0)], -1)
    plain = next_item_loss(query, text, targets, users, user_ids, ids, reduction="none")
    free = next_item_loss(query, text, targets, users, user_ids, ids, reduction="none", sync_free=True)
    assert torch.equal(free, plain)


def _compiles_fullgraph(fn) -> bool:
    torch._dynamo.reset()
    try:
        torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)()
        return True
    except Exception:  # graph break (data-dependent shape: nonzero, unique, .item())
        return False
    finally:
        torch._dynamo.reset()


def test_sync_free_losses_trace_as_one_graph_and_default_does_not():
    """fullgraph=True fails on any data-dependent op (nonzero, unique, .item(), bool()): the sync-free losses
    must trace whole, and the default ones must not (which shows the check can fail)."""
    index, ids, text, vision, has_image = _loss_inputs(3)

    def nicl(sync_free):
        return lambda: nicl_loss(text, vision, index, ids, item_has_image=has_image, sync_free=sync_free)

    assert _compiles_fullgraph(nicl(True))
    assert not _compiles_fullgraph(nicl(False))
