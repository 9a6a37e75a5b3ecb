"""FeatureCache: cached frozen-part features give the same training step as recomputing from raw inputs.

Tolerances (fp32, CPU). The cached step runs the same kernels on the same hidden states as the step that
recomputes from raw inputs:
- cache built from the batch's own items in one chunk: the frozen features are bit-identical, and loss and
  every trainable gradient agree to atol 1e-6 (in practice exactly);
- cache built over the whole catalogue in chunks of other sizes and order: the frozen forward's matmuls are
  blocked differently, so features differ by ~1 ulp (1e-7); loss agrees to atol 1e-6 / rtol 1e-5 and each
  gradient tensor g to |delta| <= 1e-6 + 1e-5 * max|g| (the tiny random model's NICL heads have gradients of
  ~1e3, which amplify the ulp differences in absolute terms).
"""

import copy

import pytest
import torch

from pmmrec_hf import PMMRecModel
from pmmrec_hf.feature_cache import FeatureCache, FeatureCacheMismatchError, compute_fingerprint, prime_item_encoder
from tiny_models import item_inputs, tiny_config

ATOL, RTOL = 1e-6, 1e-5
NUM_ITEMS = 20
TEXT_LEN = 8  # = tiny_item_config's max_text_length


def _no_dropout_config(**item_kw):
    from tiny_models import tiny_text_config, tiny_user_config

    config = tiny_config(item_kw=dict(fusion_dropout=0.0, text_config=tiny_text_config(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), **item_kw))
    config.user_encoder_config = tiny_user_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return config


def _model(config=None, seed=0):
    torch.manual_seed(seed)
    return PMMRecModel(config or _no_dropout_config())


def _catalogue(num_items=NUM_ITEMS, text_len=TEXT_LEN, seed=1):
    items = item_inputs(num_items, seed=seed, text_len=text_len)
    items["item_ids"] = torch.arange(num_items)
    return items


def _batch(catalogue, item_ids=(4, 11, 2, 17, 9, 0, 13)):
    """3 users over the given distinct items (indices into them), with corruption for NID/RCL."""
    ids = torch.tensor(item_ids)
    batch = {k: v[ids] for k, v in catalogue.items() if k != "item_ids"}
    batch.update(
        item_ids=ids,
        item_index=torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 4, 5, 1, 2, 3], [-1, -1, -1, 6, 5, 4]]),
        item_log_popularity=torch.log(torch.linspace(0.05, 0.3, len(item_ids))),
        corrupted_index=torch.tensor([[-1, -1, 0, 1, 5], [0, 4, 5, 2, 1], [-1, -1, -1, 6, 5]]),
        noise_labels=torch.tensor([[-100, -100, 0, 0, 1], [0, 0, 0, 1, 1], [-100, -100, -100, 0, 0]]),
    )
    return batch


def _built_cache(encoder, catalogue, **kw):
    cache = FeatureCache.create(encoder, catalogue["item_ids"].numel(), **kw)
    # other chunk sizes and another order than any training batch
    order = torch.randperm(catalogue["item_ids"].numel(), generator=torch.Generator().manual_seed(3))
    return cache.build(encoder, {k: v[order] for k, v in catalogue.items()}, batch_size=6)


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _cached_inputs(batch, cache):
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    inputs.update(cache.lookup(batch["item_ids"]))
    return inputs


@pytest.mark.parametrize("built_from", ["batch", "catalogue"])
@pytest.mark.parametrize("mode", ["train_no_dropout", "eval"])
def test_cached_step_equals_recomputed_step(mode, built_from):
    model = _model()
    model.train(mode != "eval")
    catalogue = _catalogue()
    batch = _batch(catalogue)
    raw_out, raw_grads = _step(model, batch)
    if built_from == "batch":
        cache = FeatureCache.create(model.item_encoder, NUM_ITEMS).build(model.item_encoder, batch)
    else:
        cache = _built_cache(model.item_encoder, catalogue)
    cached_model = copy.deepcopy(model)
    cached_out, cached_grads = _step(cached_model, _cached_inputs(batch, cache))
    for name in ("loss", "next_item_loss", "nicl_loss", "nid_loss", "rcl_loss"):
        torch.testing.assert_close(cached_out[name], raw_out[name], atol=ATOL, rtol=RTOL)
    assert raw_grads.keys() == cached_grads.keys() and len(raw_grads) > 0
    # every trainable parameter: top tower blocks, projections, fusion, user encoder, heads
    assert any(".encoder.layer.2." in n for n in raw_grads) and any(".encoder.layers.2." in n for n in raw_grads)
    for name, grad in raw_grads.items():
        if built_from == "batch":
            torch.testing.assert_close(cached_grads[name], grad, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        else:
            worst = (cached_grads[name] - grad).abs().max().item()
            assert worst <= ATOL + RTOL * grad.abs().max().item(), (name, worst, grad.abs().max().item())
    if built_from != "batch":
        return  # Adam's first step is ~sign(grad): ulp-level differences on ~0 gradients are not comparable
    # and the same parameters after an optimiser step
    for m in (model, cached_model):
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    for (name, p), q in zip(model.named_parameters(), cached_model.parameters()):
        torch.testing.assert_close(q, p, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_text_padding_in_the_cache_is_irrelevant():
    model = _model().eval()
    encoder = model.item_encoder
    short = _catalogue(text_len=5)  # tokenised to 5 tokens (some of them padding), cache pads to 8
    cache = _built_cache(encoder, short)
    assert cache.lookup([0])["text_features"].shape == (1, TEXT_LEN, 32)
    ids = torch.tensor([3, 7, 1, 3])
    features = cache.lookup(ids)
    assert torch.equal(features["attention_mask"][:, 5:], torch.zeros(4, 3, dtype=torch.long))
    torch.testing.assert_close(cache.text_lengths(ids), short["attention_mask"][ids].sum(1))
    reference = encoder(input_ids=short["input_ids"][ids], attention_mask=short["attention_mask"][ids],
                        pixel_values=short["pixel_values"][ids]).item_embeddings
    cached = encoder(**features).item_embeddings
    torch.testing.assert_close(cached, reference, atol=1e-6, rtol=1e-5)
    # garbage at every padded position changes nothing
    noisy = dict(features)
    pad = features["attention_mask"] == 0
    noisy["text_features"] = torch.where(pad[..., None], torch.randn_like(features["text_features"]) * 100,
                                         features["text_features"])
    torch.testing.assert_close(encoder(**noisy).item_embeddings, cached, atol=1e-6, rtol=1e-5)
    # trimming the all-padding tail is exact too
    trimmed = cache.lookup(ids, trim=True)
    assert trimmed["text_features"].shape[1] == int(features["attention_mask"].sum(1).max())
    torch.testing.assert_close(encoder(**trimmed).item_embeddings, cached, atol=1e-6, rtol=1e-5)


def test_memmap_cache_equals_in_memory_cache(tmp_path):
    model = _model().eval()
    catalogue = _catalogue()
    memory = _built_cache(model.item_encoder, catalogue)
    mapped = _built_cache(model.item_encoder, catalogue, path=tmp_path / "fp32")
    ids = torch.tensor([5, 0, 19, 5])
    a, b = memory.lookup(ids), mapped.lookup(ids)
    assert a.keys() == b.keys() == {"text_features", "attention_mask", "vision_features", "image_mask"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # reopened from disk into a fresh model (another process would do this): same embeddings, no raw forward
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    # a tower that has not yet run on raw inputs finds its stem from a dummy input when features come first
    fresh.item_encoder.text_tower._stem_names = fresh.item_encoder.vision_tower._stem_names = None
    reopened = FeatureCache.load(tmp_path / "fp32", fresh.item_encoder)
    assert len(reopened) == NUM_ITEMS and repr(reopened).startswith("FeatureCache(")
    torch.testing.assert_close(fresh.item_encoder(**reopened.lookup(ids)).item_embeddings,
                               model.item_encoder(**a).item_embeddings, atol=0, rtol=0)
    assert torch.equal(reopened.to_memory().lookup(ids)["vision_features"], a["vision_features"])
    saved = memory.save(tmp_path / "saved")
    assert torch.equal(saved.lookup(ids)["text_features"], a["text_features"])
    # half-precision storage: half the bytes, values rounded to bf16 / fp16, memmap == memory
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        half_memory = _built_cache(model.item_encoder, catalogue, dtype=dtype)
        half_mapped = _built_cache(model.item_encoder, catalogue, dtype=dtype, path=tmp_path / str(dtype))
        assert half_memory.nbytes < 0.55 * memory.nbytes
        x, y = half_memory.lookup(ids, dtype=None), half_mapped.lookup(ids, dtype=None)
        assert x["text_features"].dtype == y["text_features"].dtype == dtype
        for key in x:
            assert torch.equal(x[key], y[key]), (dtype, key)
        torch.testing.assert_close(half_memory.lookup(ids)["text_features"], a["text_features"], atol=tol * 10,
                                   rtol=tol)
        reloaded = FeatureCache.load(tmp_path / str(dtype), model.item_encoder)
        assert reloaded.dtype == dtype and torch.equal(reloaded.lookup(ids, dtype=None)["vision_features"],
                                                       x["vision_features"])


def test_invalidation_by_frozen_depth_frozen_weights_and_preprocessing(tmp_path):
    model = _model().eval()
    encoder = model.item_encoder
    catalogue = _catalogue()
    cache = _built_cache(encoder, catalogue, path=tmp_path / "cache")
    assert cache.is_valid_for(encoder)
    # a trainable weight (top block) changing does not invalidate
    with torch.no_grad():
        encoder.text_model.encoder.layer[2].output.dense.weight.add_(0.1)
        encoder.fusion[0].intermediate.weight.add_(0.1)
    assert cache.is_valid_for(encoder)
    # a frozen weight changing does
    changed = copy.deepcopy(encoder)
    with torch.no_grad():
        changed.text_model.embeddings.word_embeddings.weight[3, 0] += 1e-4
    assert not cache.is_valid_for(changed)
    with pytest.raises(FeatureCacheMismatchError, match="text_frozen_hash"):
        FeatureCache.load(tmp_path / "cache", changed)
    with pytest.raises(FeatureCacheMismatchError, match="text_frozen_hash"):
        cache.check_valid_for(changed)
    vision_changed = copy.deepcopy(encoder)
    with torch.no_grad():
        vision_changed.vision_model.encoder.layers[0].mlp.fc1.bias[0] += 1e-4
    assert not cache.is_valid_for(vision_changed)
    # the frozen depth changing does (same weights)
    deeper = _model(_no_dropout_config(text_trainable_layers=1)).item_encoder
    deeper.load_state_dict(encoder.state_dict())
    assert not cache.is_valid_for(deeper)
    with pytest.raises(FeatureCacheMismatchError, match="text_first_trainable"):
        FeatureCache.load(tmp_path / "cache", deeper)
    # so does the text length or the image normalisation
    for kw in (dict(max_text_length=6), dict(image_mean=[0.4, 0.5, 0.5])):
        other = _model(_no_dropout_config(**kw)).item_encoder
        other.load_state_dict(encoder.state_dict())
        assert not cache.is_valid_for(other), kw
    # building with a stale cache raises
    with pytest.raises(FeatureCacheMismatchError):
        cache.build(changed, catalogue)
    # extra values (e.g. the tokenizer) are part of the fingerprint
    tagged = FeatureCache.create(encoder, NUM_ITEMS, extra={"tokenizer": "a"})
    assert tagged.is_valid_for(encoder) and not tagged.is_valid_for(encoder, extra={"tokenizer": "b"})
    FeatureCache.create(encoder, NUM_ITEMS, path=tmp_path / "tagged", extra={"tokenizer": "a"})
    assert FeatureCache.load(tmp_path / "tagged", encoder).fingerprint["extra"] == {"tokenizer": "a"}
    with pytest.raises(FeatureCacheMismatchError, match="extra"):
        FeatureCache.load(tmp_path / "tagged", encoder, extra={"tokenizer": "b"})
    assert compute_fingerprint(encoder)["digest"] == cache.fingerprint["digest"]
    # reset / rebuild on request
    reset = FeatureCache.load(tmp_path / "cache", changed, on_mismatch="reset")
    assert len(reset) == 0 and reset.is_valid_for(changed)
    rebuilt = FeatureCache.load_or_build(tmp_path / "cache", deeper, catalogue, NUM_ITEMS, rebuild=True)
    assert len(rebuilt) == NUM_ITEMS and rebuilt.is_valid_for(deeper)
    expected = deeper.text_frozen_features(catalogue["input_ids"][:3], catalogue["attention_mask"][:3])
    torch.testing.assert_close(rebuilt.lookup([0, 1, 2])["text_features"], expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(FeatureCacheMismatchError, match="text_first_trainable"):
        FeatureCache.load_or_build(tmp_path / "cache", encoder, catalogue, NUM_ITEMS)
    with pytest.raises(FileExistsError):
        FeatureCache.create(deeper, NUM_ITEMS, path=tmp_path / "cache")


def test_item_looked_up_twice_in_one_batch():
    model = _model().eval()
    catalogue = _catalogue()
    cache = _built_cache(model.item_encoder, catalogue)
    features = cache.lookup([6, 2, 6, 6])
    assert torch.equal(features["text_features"][0], features["text_features"][2])
    assert torch.equal(features["vision_features"][0], features["vision_features"][3])
    # a batch whose rows repeat items (each occurrence its own row, as without deduplication)
    batch = _batch(catalogue, item_ids=(4, 11, 2, 17, 9, 0, 13))
    slots = batch["item_index"][batch["item_index"] >= 0]
    expanded_index = torch.full_like(batch["item_index"], -1)
    expanded_index[batch["item_index"] >= 0] = torch.arange(slots.numel())
    expanded = dict(item_ids=batch["item_ids"][slots], item_index=expanded_index,
                    item_log_popularity=batch["item_log_popularity"][slots])
    raw = dict(expanded, input_ids=batch["input_ids"][slots], attention_mask=batch["attention_mask"][slots],
               pixel_values=batch["pixel_values"][slots])
    assert expanded["item_ids"].unique().numel() < expanded["item_ids"].numel()
    with torch.no_grad():
        a = model(**raw)
        b = model(**dict(expanded, **cache.lookup(expanded["item_ids"])))
        c = model(**_cached_inputs({k: v for k, v in batch.items() if k not in ("corrupted_index", "noise_labels")},
                                   cache))
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c.loss, a.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_single_modality_cache(modality, tmp_path):
    torch.manual_seed(0)
    model = PMMRecModel(tiny_config(modality)).eval()
    catalogue = _catalogue()
    cache = _built_cache(model.item_encoder, catalogue, path=tmp_path)
    features = cache.lookup([1, 2])
    assert set(features) == ({"text_features", "attention_mask"} if modality == "text" else {"vision_features"})
    raw = {k: v[[1, 2]] for k, v in catalogue.items() if k != "item_ids"}
    torch.testing.assert_close(model.item_encoder(**features).item_embeddings,
                               model.item_encoder(**raw).item_embeddings, atol=1e-6, rtol=1e-5)


def test_errors_are_clear():
    model = _model().eval()
    encoder = model.item_encoder
    catalogue = _catalogue()
    cache = FeatureCache.create(encoder, NUM_ITEMS)
    cache.build(encoder, {k: v[:5] for k, v in catalogue.items()})
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.lookup([1, 7])
    with pytest.raises(IndexError):
        cache.lookup([NUM_ITEMS])
    long_text = _catalogue(text_len=TEXT_LEN + 2)
    with pytest.raises(ValueError, match="max_length=8"):
        cache.build(encoder, long_text)
    # extra columns that are only padding are fine
    padded = {k: v for k, v in catalogue.items()}
    padded["input_ids"] = torch.nn.functional.pad(catalogue["input_ids"], (0, 3))
    padded["attention_mask"] = torch.nn.functional.pad(catalogue["attention_mask"], (0, 3))
    cache.build(encoder, padded, skip_filled=True)
    assert len(cache) == NUM_ITEMS
    with pytest.raises(ValueError, match="fully trainable"):
        FeatureCache.create(PMMRecModel(tiny_config(item_kw=dict(text_trainable_layers=-1))).item_encoder, 3)
    with pytest.raises(ValueError, match="dtype"):
        FeatureCache.create(encoder, 3, dtype="int8")
    # features given to a fresh model that never ran on raw inputs: it primes itself (discovers its stems)
    fresh = _model().item_encoder.eval()
    primed = _model().item_encoder.eval()
    fresh.text_tower._stem_names = fresh.vision_tower._stem_names = None  # as if it never ran
    prime_item_encoder(primed)
    assert torch.equal(fresh(**cache.lookup([0])).item_embeddings, primed(**cache.lookup([0])).item_embeddings)
    assert fresh.text_tower._stem_names == primed.text_tower._stem_names


def test_the_cache_keeps_which_images_are_placeholders(tmp_path):
    model = _model().eval()
    catalogue = _catalogue()
    with_mask = dict(catalogue, image_mask=torch.arange(NUM_ITEMS) % 3 != 0)  # every third item: no image
    for path in (None, tmp_path / "mapped"):
        cache = FeatureCache.create(model.item_encoder, NUM_ITEMS, path=path)
        cache.build(model.item_encoder, with_mask, batch_size=7)
        if path is not None:
            cache = FeatureCache.load(path, model.item_encoder)
        ids = torch.tensor([0, 1, 3, 4])
        looked_up = cache.lookup(ids)
        assert looked_up["image_mask"].tolist() == [False, True, False, True]
        # the cached path embeds a placeholder item from its text, exactly as the raw path does
        raw = {k: v[ids] for k, v in with_mask.items() if k != "item_ids"}
        torch.testing.assert_close(model.item_encoder(**looked_up).item_embeddings,
                                   model.item_encoder(**raw).item_embeddings, atol=1e-6, rtol=1e-5)
