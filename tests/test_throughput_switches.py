"""benchmarks/throughput.py's packed and static switches leave the loss unchanged, and static shapes compile
once per bucket. Tolerances (fp32 CPU, tiny eval-mode model): 1e-5 on the loss (packed: summation order of the
packed means; static: masked extra columns and summation order of the sync-free losses)."""

import copy
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark


def _load():
    return load_benchmark("throughput.py", "pmmrec_throughput_benchmark")


tp = _load()
CPU = torch.device("cpu")
SPEC = tp.size_spec("tiny")
SLOTS = SPEC.max_length + 1


@pytest.fixture(scope="module")
def setup():
    data = tp.make_mode_data("realistic", SPEC, 6, 3, Path("/nonexistent"), seed=5)
    assert data.text_lengths is not None and "built-in title token-length histogram" in data.text_source
    steps = [list(map(list, step)) for step in data.sequences]
    steps[0][0] = steps[0][0][:7]  # some padding
    steps[0][1] = steps[0][1][:3]
    catalogue = tp.Catalogue(data.num_items, SPEC, CPU, data.log_q, seed=5, text_lengths=data.text_lengths)
    assert int(catalogue.lengths.min()) >= 2 and int(catalogue.lengths.max()) <= SPEC.text_tokens
    assert (catalogue.lengths < SPEC.text_tokens).any()  # real lengths: some titles shorter than T
    model = tp.build_model(SPEC, "eager", seed=3).eval()
    return dict(model=model, steps=steps, catalogue=catalogue)


def _loss(model, batch, **kw):
    with torch.no_grad():
        return tp.compute_loss(model, batch, **kw).float()


def test_real_title_lengths_mask_the_padding(setup):
    catalogue = setup["catalogue"]
    inputs = catalogue.raw_inputs(torch.arange(5))
    assert torch.equal(inputs["attention_mask"].sum(1), catalogue.lengths[:5])
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == 1).all()  # pad id 1 after the title


def test_title_token_approximation():
    assert tp.approx_title_tokens("Toy Story (1995)") == 7
    assert tp.approx_title_tokens("") == 2


@pytest.mark.parametrize("dedup", [True, False])
def test_packed_and_static_leave_the_loss_unchanged(setup, dedup):
    model, catalogue, seqs = setup["model"], setup["catalogue"], setup["steps"][0]
    plain = _loss(model, tp.make_batch(seqs, catalogue, SLOTS, dedup=dedup, raw=True))
    packed = tp.make_batch(seqs, catalogue, SLOTS, dedup=dedup, raw=True, packed=True)
    assert packed["input_ids"].shape[1] < SPEC.text_tokens or SPEC.text_tokens <= 8  # cut to the longest title
    static = tp.make_batch(seqs, catalogue, SLOTS, dedup=dedup, raw=True, static=True)
    both = tp.make_batch(seqs, catalogue, SLOTS, dedup=dedup, raw=True, packed=True, static=True)
    if dedup:
        distinct = len({i for s in seqs for i in s})
        assert static["item_ids"].numel() == tp.bucket_size(distinct, tp.item_buckets(6 * SLOTS)) > distinct
    for batch in (packed, static, both):
        torch.testing.assert_close(_loss(model, batch), plain, atol=1e-5, rtol=1e-5)


def test_packed_static_with_the_cache_leaves_the_loss_unchanged(setup):
    model = copy.deepcopy(setup["model"])
    catalogue, seqs = setup["catalogue"], setup["steps"][1]
    cache = tp.build_cache(model, catalogue, CPU, "float32", bf16=False, batch_size=64)
    plain = _loss(model, tp.make_batch(seqs, catalogue, SLOTS, dedup=True, raw=True))
    batch = tp.make_batch(seqs, catalogue, SLOTS, dedup=True, raw=False, packed=True, static=True)
    torch.testing.assert_close(_loss(model, batch, cache=cache), plain, atol=1e-5, rtol=1e-5)
    bf16_cache = tp.build_cache(model, catalogue, CPU, "bfloat16", bf16=False, batch_size=64)
    assert bf16_cache.dtype == torch.bfloat16 and bf16_cache.nbytes < cache.nbytes
    torch.testing.assert_close(_loss(model, batch, cache=bf16_cache), plain, atol=2e-2, rtol=2e-2)


def _graphs(model, batches, cache) -> list[int]:
    """Dynamo's count of compiled graphs after each batch."""
    counts = []
    for batch in batches:
        _loss(model, batch, cache=cache)
        counts.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    return counts


def test_static_item_buckets_compile_once_per_bucket(setup):
    """Two steps with different numbers of distinct items in the same bucket: static (padded to the bucket)
    compiles nothing new for the second; without buckets (dynamic=False) it recompiles, showing the count works."""
    catalogue = setup["catalogue"]
    base = copy.deepcopy(setup["model"])
    cache = tp.build_cache(base, catalogue, CPU, "float32", bf16=False, batch_size=64)
    first = setup["steps"][2]
    second = [s[:-1] for s in first]  # fewer distinct items
    n1, n2 = (len({i for s in seqs for i in s}) for seqs in (first, second))
    buckets = tp.item_buckets(6 * SLOTS)
    if n1 == n2 or tp.bucket_size(n1, buckets) != tp.bucket_size(n2, buckets):
        pytest.skip(f"the two steps ({n1}, {n2} items) do not share a bucket")
    counts = {}
    for static in (True, False):
        model = copy.deepcopy(base)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        tp.apply_compile(model, "eager", dynamic=False)
        batches = [tp.make_batch(seqs, catalogue, SLOTS, dedup=True, raw=False, static=static)
                   for seqs in (first, second)]
        counts[static] = _graphs(model, batches, cache)
        torch._dynamo.reset()
    assert counts[True][0] > 0 and counts[True][1] == counts[True][0]
    assert counts[False][1] > counts[False][0]
