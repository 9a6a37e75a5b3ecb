"""The inference API (pmmrec_hf.recommend): catalogue, exact and FAISS recommendation, cold-start items."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pmmrec_hf import PMMRecModel
from pmmrec_hf.recommend import FaissCatalogueIndex, Recommender, UnknownItemError, load_catalogue_file
from tiny_models import tiny_config

NUM_ITEMS = 24
WORDS = "red blue green black white shoe shirt hat bag lamp chair table new old big small soft hard".split()
HAS_COLLATOR = importlib.util.find_spec("pmmrec_hf.data.collator") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS  # ids < tiny VOCAB (99)
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


def _raw_items(count: int, seed: int = 0, prefix: str = "item"):
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i}" for i in range(count)]
    ids[0] = f"{prefix}-é€-0"  # non-ASCII ids survive the catalogue file's JSON metadata
    texts = [" ".join(rng.choice(WORDS, size=1 + i % 5)) for i in range(count)]
    images = [Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)) for _ in range(count)]
    return ids, texts, images


class _StandInProcessor:
    """Used only while pmmrec_hf.data.collator is missing: tokenise + the package's image transform."""

    def __init__(self, tokenizer, config):
        from pmmrec_hf.data.image_processing import PMMRecImageTransform

        self.tokenizer = tokenizer
        self.transform = PMMRecImageTransform(config.image_size, config.image_mean, config.image_std)
        self.max_length = config.max_text_length

    def __call__(self, texts, images):
        out = self.tokenizer([t.lower() for t in texts], padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
                "pixel_values": self.transform(images)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PMMRecModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def raw():
    return _raw_items(NUM_ITEMS)


def _recommender(model, **kwargs) -> Recommender:
    if HAS_COLLATOR:
        return Recommender(model, tokenizer=_tokenizer(), **kwargs)
    return Recommender(model, processor=_StandInProcessor(_tokenizer(), model.config.item_encoder_config), **kwargs)


@pytest.fixture(scope="module")
def rec(model, raw):
    recommender = _recommender(model, batch_size=7)  # 7 does not divide 24: a short last batch
    ids, texts, images = raw
    recommender.encode_catalogue(ids, texts=texts, images=images)
    return recommender


def _fresh_embeddings(model, processor, texts, images) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_items(**processor(texts, images)).float()


def _user_states(model, matrix: torch.Tensor, histories_rows) -> torch.Tensor:
    """Brute force: left-pad the last L rows of every history, run the user encoder on the whole matrix."""
    length = model.config.user_encoder_config.max_position_embeddings
    index = torch.full((len(histories_rows), length), -1, dtype=torch.long)
    for b, rows in enumerate(histories_rows):
        rows = rows[-length:]
        index[b, length - len(rows):] = torch.tensor(rows)
    with torch.no_grad():
        return model.encode_users(matrix, index).user_embeddings


def _check_topk(result, item_ids, scores_row: torch.Tensor, excluded: set[int], k: int) -> None:
    """`result` is a top-k of `scores_row` (the full brute-force score row) with `excluded` rows left out."""
    allowed = [j for j in range(len(item_ids)) if j not in excluded]
    expected = torch.sort(scores_row[allowed], descending=True).values[:k]
    assert len(result) == min(k, len(allowed))
    returned_ids = [item for item, _ in result]
    assert len(set(returned_ids)) == len(returned_ids)
    rows = [item_ids.index(item) for item in returned_ids]
    assert not set(rows) & excluded
    returned = torch.tensor([score for _, score in result])
    torch.testing.assert_close(returned, scores_row[rows], atol=1e-5, rtol=1e-5)  # each score is the item's own
    torch.testing.assert_close(returned, expected, atol=1e-5, rtol=1e-5)  # ... and they are the k best
    assert torch.all(returned[:-1] >= returned[1:])


HISTORIES = [
    ["item-3"],
    ["item-5", "item-1", "item-5"],  # a repeated item
    [f"item-{i}" for i in (9, 2, 7, 11, 4, 13, 6, 20)],  # longer than L = 5: only the last 5 are read
    ["item-é€-0", "item-23"],
]


def test_encode_catalogue_embeds_every_item_once_in_batches(model, raw, rec):
    ids, texts, images = raw
    assert rec.item_ids == ids and len(rec) == NUM_ITEMS and rec.item_embeddings.shape == (NUM_ITEMS, 16)
    assert rec.item_embeddings.dtype == torch.float32 and not rec.item_embeddings.is_inference()
    fresh = _fresh_embeddings(model, rec.processor, texts, images)  # one batch
    torch.testing.assert_close(rec.item_embeddings, fresh, atol=1e-5, rtol=1e-5)
    # pre-encoded inputs: one mapping (sliced) or an iterable of batches; raw items as a (texts, images) tuple
    other = _recommender(model, batch_size=5)
    inputs = rec.processor(texts, images)
    emb_mapping = other.encode_catalogue(ids, inputs).clone()
    emb_batches = other.encode_catalogue(ids, [rec.processor(texts[i:i + 10], images[i:i + 10]) for i in (0, 10, 20)])
    emb_tuple = other.encode_catalogue(ids, (texts, images), batch_size=NUM_ITEMS)
    for emb in (emb_mapping, emb_batches, emb_tuple):
        torch.testing.assert_close(emb, fresh, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="duplicate"):
        other.encode_catalogue(["a", "a"], texts=texts[:2], images=images[:2])
    with pytest.raises(ValueError, match="texts for"):
        other.encode_catalogue(ids[:3], texts=texts[:2], images=images[:3])
    assert model.training is False


def test_catalogue_save_load_round_trip_is_exact(model, rec, tmp_path):
    path = tmp_path / "catalogue.safetensors"
    rec.save_catalogue(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["item_ids"]) == rec.item_ids
        assert list(handle.keys()) == ["item_embeddings"]
    loaded = _recommender(model)
    loaded.load_catalogue(str(path))
    assert loaded.item_ids == rec.item_ids
    assert loaded.item_embeddings.dtype == rec.item_embeddings.dtype
    assert torch.equal(loaded.item_embeddings, rec.item_embeddings)
    ids, matrix = load_catalogue_file(str(path))
    assert ids == rec.item_ids and torch.equal(matrix, rec.item_embeddings)
    assert loaded.recommend_batch(HISTORIES, k=5) == rec.recommend_batch(HISTORIES, k=5)
    # a foreign safetensors file is refused
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2, 16)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a PMMRec catalogue"):
        loaded.load_catalogue(str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("k", [1, 5, NUM_ITEMS])
def test_recommend_is_the_brute_force_top_k_without_seen_items(model, rec, k):
    matrix = rec.item_embeddings
    rows = [[rec.item_ids.index(item) for item in history] for history in HISTORIES]
    scores = _user_states(model, matrix, rows) @ matrix.T  # (B, I) full score matrix
    batch = rec.recommend_batch(HISTORIES, k=k)
    for b, history in enumerate(HISTORIES):
        single = rec.recommend(history, k=k)
        assert [i for i, _ in single] == [i for i, _ in batch[b]]
        _check_topk(single, rec.item_ids, scores[b], set(rows[b]), k)
    # without exclusion the history items compete too
    for b, history in enumerate(HISTORIES):
        _check_topk(rec.recommend(history, k=k, exclude_seen=False), rec.item_ids, scores[b], set(), k)


def test_only_the_last_max_length_items_are_read(rec):
    long_history = HISTORIES[2]
    assert rec.recommend(long_history[-5:], k=4, exclude_seen=False) == rec.recommend(long_history, k=4,
                                                                                       exclude_seen=False)


def test_unknown_and_invalid_histories_raise(rec):
    with pytest.raises(UnknownItemError) as info:
        rec.recommend(["item-1", "nope", "item-2", "missing"])
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "'nope'" in str(info.value) and "'missing'" in str(info.value)
    assert info.value.item_ids == ["nope", "missing"]
    with pytest.raises(KeyError, match="ghost"):
        rec.recommend_batch([["item-1"], ["ghost"]])
    with pytest.raises(ValueError, match="empty"):
        rec.recommend([])
    with pytest.raises(ValueError, match="single string"):
        rec.recommend("item-1")
    with pytest.raises(ValueError, match="positive"):
        rec.recommend(["item-1"], k=0)


def test_add_items_makes_new_items_recommendable_without_retraining(model, raw):
    ids, texts, images = raw
    rec = _recommender(model, batch_size=8)
    rec.encode_catalogue(ids, texts=texts, images=images)
    history = ["item-4", "item-17"]
    top_id, top_score = rec.recommend(history, k=1)[0]
    top = ids.index(top_id)
    # new items: fresh content, plus a copy of the current top-1 item's content under a new id
    new_ids, new_texts, new_images = _raw_items(3, seed=7, prefix="new")
    new_ids, new_texts, new_images = new_ids + ["clone"], new_texts + [texts[top]], new_images + [images[top]]
    before = rec.item_embeddings.clone()
    rec.add_items(new_ids, new_texts, new_images)
    assert rec.item_ids == ids + new_ids and torch.equal(rec.item_embeddings[:NUM_ITEMS], before)
    fresh = _fresh_embeddings(model, rec.processor, new_texts, new_images)
    torch.testing.assert_close(rec.item_embeddings[NUM_ITEMS:], fresh, atol=1e-5, rtol=1e-5)

    user = rec.encode_histories([history])[0]
    everything = dict(rec.recommend(history, k=len(rec)))  # k = catalogue size: every unseen item
    assert len(everything) == len(rec) - len(history)
    for item, emb in zip(new_ids, fresh):
        assert item in everything
        assert everything[item] == pytest.approx(float(user @ emb), abs=1e-5)
    # the clone has the top item's content, hence its score
    assert everything["clone"] == pytest.approx(top_score, abs=1e-5)
    ranked = [item for item, _ in rec.recommend(history, k=len(rec))]
    first = min(ranked.index(top_id), ranked.index("clone"))
    assert {ranked[first], ranked[first + 1]} == {top_id, "clone"}  # adjacent (equal scores) ...
    assert set(ranked[:first]) <= set(new_ids)  # ... and only fresh new items can beat the old top-1
    # new items work in histories at once
    assert len(rec.recommend(["item-4", "new-2"], k=3)) == 3

    # re-adding an existing id replaces its row in place
    rec.add_items(["item-2"], [texts[5]], [images[5]])
    assert rec.item_ids == ids + new_ids
    torch.testing.assert_close(rec.item_embedding("item-2"), rec.item_embedding("item-5"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="duplicate"):
        rec.add_items(["x", "x"], texts[:2], images[:2])


def test_faiss_flat_index_gives_the_exact_top_k(rec):
    pytest.importorskip("faiss", reason="faiss-cpu not installed (optional extra `faiss`)")
    flat = rec.to_faiss_index("flat_ip")
    assert isinstance(flat, FaissCatalogueIndex) and flat.index.ntotal == NUM_ITEMS and flat.item_ids == rec.item_ids
    hnsw = rec.to_faiss_index("hnsw", hnsw_m=8, ef_search=64)
    for k in (1, 5, 10):
        exact = rec.recommend_batch(HISTORIES, k=k)
        via_flat = rec.recommend_batch(HISTORIES, k=k, index=flat)
        via_bare = rec.recommend_batch(HISTORIES, k=k, index=flat.index)
        via_hnsw = rec.recommend_batch(HISTORIES, k=k, index=hnsw)  # ef_search >= catalogue: exhaustive here
        for e, f, bare, h in zip(exact, via_flat, via_bare, via_hnsw):
            assert [i for i, _ in f] == [i for i, _ in e] == [i for i, _ in bare]
            assert {i for i, _ in h} == {i for i, _ in e}
            np.testing.assert_allclose([s for _, s in f], [s for _, s in e], atol=1e-5)
    # exclusion: asking for every unseen item through the index returns exactly the unseen items
    history = HISTORIES[1]
    got = rec.recommend(history, k=NUM_ITEMS, index=flat)
    assert {i for i, _ in got} == set(rec.item_ids) - set(history)
    with pytest.raises(ValueError, match="kind"):
        rec.to_faiss_index("ivf")


def test_faiss_index_goes_stale_after_add_items(model, raw):
    pytest.importorskip("faiss", reason="faiss-cpu not installed (optional extra `faiss`)")
    ids, texts, images = raw
    rec = _recommender(model)
    rec.encode_catalogue(ids[:10], texts=texts[:10], images=images[:10])
    index = rec.to_faiss_index()
    rec.add_items(ids[10:12], texts[10:12], images[10:12])
    with pytest.warns(UserWarning, match="re-export|Re-export"):
        rec.recommend(["item-1"], k=3, index=index)
    with pytest.raises(ValueError, match="bare FAISS index"):
        rec.recommend(["item-1"], k=3, index=index.index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.recommend(["item-1"], k=3, index=rec.to_faiss_index())


def test_sasrec_catalogue_from_item_ids():
    from pmmrec_hf.sasrec import SASRecConfig, SASRecModel

    torch.manual_seed(0)
    sasrec = SASRecModel(SASRecConfig(num_items=12, hidden_size=16, intermediate_size=32, max_position_embeddings=5))
    rec = Recommender(sasrec, batch_size=5)
    assert rec.processor is None
    ids = [f"s{i}" for i in range(12)]
    rec.encode_catalogue(ids, {"item_ids": torch.arange(12)})
    assert torch.equal(rec.item_embeddings, sasrec.all_item_embeddings().detach())
    history = ["s3", "s7", "s1"]
    scores = _user_states(sasrec.eval(), rec.item_embeddings, [[3, 7, 1]])[0] @ rec.item_embeddings.T
    _check_topk(rec.recommend(history, k=4), ids, scores, {1, 3, 7}, 4)
    with pytest.raises(ValueError, match="processor"):
        rec.add_items(["s12"], texts=["a new title"])
