"""Tests for pmmrec_hf.metrics and the bundled evaluate module (expected numbers worked out by hand)."""

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmmrec_hf import metrics as M
from pmmrec_hf.metrics import (
    RANKING_METRIC_PATH,
    evaluate_full_ranking,
    ranking_metrics_from_ranks,
    target_ranks,
    topk_items,
)


# --------------------------------------------------------------------------------------------------
# metrics from ranks
# --------------------------------------------------------------------------------------------------
def test_metrics_from_ranks_by_hand():
    out = ranking_metrics_from_ranks([1, 3, 11, 60])
    # rank 1: 1/log2(2) = 1, rank 3: 1/log2(4) = 1/2, rank 11: 1/log2(12), rank 60: outside every K
    expected = {
        "hr@10": 2 / 4,
        "ndcg@10": (1 + 1 / 2) / 4,
        "mrr@10": (1 + 1 / 3) / 4,
        "hr@20": 3 / 4,
        "ndcg@20": (1 + 1 / 2 + 1 / math.log2(12)) / 4,
        "mrr@20": (1 + 1 / 3 + 1 / 11) / 4,
        "hr@50": 3 / 4,
        "ndcg@50": (1 + 1 / 2 + 1 / math.log2(12)) / 4,
        "mrr@50": (1 + 1 / 3 + 1 / 11) / 4,
        "num_users": 4,
    }
    assert list(out) == list(expected)  # key order: per K ascending, then num_users
    assert out["hr@10"] == 0.5 and out["ndcg@10"] == 0.375  # exact
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-12, abs=0), key
    assert isinstance(out["num_users"], int) and all(isinstance(v, float) for k, v in out.items() if k != "num_users")


def test_metrics_from_ranks_inputs_and_ks():
    expected = ranking_metrics_from_ranks([1, 3, 11, 60], ks=(10, 60))
    assert ranking_metrics_from_ranks(torch.tensor([1, 3, 11, 60]), ks=[60, 10, 10]) == expected
    assert ranking_metrics_from_ranks(np.array([1.0, 3.0, 11.0, 60.0]), ks=(10, 60)) == expected
    assert expected["hr@60"] == 1.0 and expected["mrr@60"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 60) / 4)
    single = ranking_metrics_from_ranks([2], ks=1)
    assert single == {"hr@1": 0.0, "ndcg@1": 0.0, "mrr@1": 0.0, "num_users": 1}


# --------------------------------------------------------------------------------------------------
# hand-built example
# --------------------------------------------------------------------------------------------------
# items (row = item id)           user 0 = (1, 0)   user 1 = (0, 1)   user 2 = (0, 0)
ITEMS = torch.tensor(
    [
        [1.0, 0.0],  # 0   score  1                  0                 0
        [0.0, 1.0],  # 1          0                  1 (history)       0
        [1.0, 1.0],  # 2          1 (tie w/ target)  1                 0  <- target of user 2
        [2.0, 0.0],  # 3          2 (history)        0 (tie)           0
        [-1.0, 0.0],  # 4        -1                  0 <- target       0
        [0.0, 2.0],  # 5          0                  2                 0
    ]
)
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
TARGETS = torch.tensor([0, 4, 2])
# user 0: item 3 masked; target 0 is also in the history and is still ranked
HISTORY = torch.tensor([[3, 0], [-1, 1], [-1, -1]])
# user 0: 0 higher (3 masked) + 1 tie (item 2)               -> rank 2
# user 1: 2 higher (5, 2; 1 masked) + 2 ties (items 0, 3)    -> rank 5
# user 2: all 6 scores are 0: 5 ties, counted pessimistically -> rank 6
HAND_RANKS = [2, 5, 6]


def test_hand_example_ranks():
    for history in (HISTORY, [[3, 0], [1], []]):
        for chunk in (1, 2, 4, 6, 100):
            got = target_ranks(USERS, ITEMS, TARGETS, history, chunk_size=chunk, user_batch_size=2)
            assert got.tolist() == HAND_RANKS, (history, chunk)
    # without masking: user 0 also loses to item 3 (score 2); user 1 also loses to item 1 (score 1)
    assert target_ranks(USERS, ITEMS, TARGETS, None).tolist() == [3, 6, 6]


def test_hand_example_metrics():
    out = evaluate_full_ranking(USERS, ITEMS, TARGETS, HISTORY, ks=(1, 3, 5), chunk_size=4)
    expected = {
        "hr@1": 0.0,
        "ndcg@1": 0.0,
        "mrr@1": 0.0,
        "hr@3": 1 / 3,  # only user 0 (rank 2); user 1 (rank 5) is outside the top 3
        "ndcg@3": (1 / math.log2(3)) / 3,
        "mrr@3": (1 / 2) / 3,
        "hr@5": 2 / 3,
        "ndcg@5": (1 / math.log2(3) + 1 / math.log2(6)) / 3,
        "mrr@5": (1 / 2 + 1 / 5) / 3,
        "num_users": 3,
    }
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_hand_example_topk():
    scores, idx = topk_items(USERS[:2], ITEMS, 2, HISTORY[:2], chunk_size=4)
    assert idx[1].tolist() == [5, 2]  # user 1 without item 1: item 5 (score 2), item 2 (score 1)
    # user 0 without items 3 and 0: item 2 (score 1) first, then a tie at 0 between items 1 and 5
    assert idx[0, 0].item() == 2 and idx[0, 1].item() in (1, 5)
    assert scores.tolist() == [[1.0, 0.0], [2.0, 1.0]]


# --------------------------------------------------------------------------------------------------
# chunked == unchunked on random data
# --------------------------------------------------------------------------------------------------
def _reference_ranks(users, items, targets, history):
    """Brute force: every score as a correctly rounded exact sum (math.fsum), pessimistic ties."""
    u, v = users.double().tolist(), items.double().tolist()
    ranks = []
    for b, t in enumerate(targets.tolist()):
        score = [math.fsum(x * y for x, y in zip(u[b], v[j])) for j in range(len(v))]
        excluded = {j for j in history[b].tolist() if j >= 0} | {t}
        ranks.append(1 + sum(score[j] >= score[t] for j in range(len(v)) if j not in excluded))
    return torch.tensor(ranks)


def _random_case(seed, integer_valued):
    g = torch.Generator().manual_seed(seed)
    num_users, num_items, dim = 9, 23, 4
    if integer_valued:  # exact dot products, many ties
        users = torch.randint(-2, 3, (num_users, dim), generator=g).float()
        items = torch.randint(-2, 3, (num_items, dim), generator=g).float()
    else:
        users = torch.randn(num_users, dim, generator=g)
        items = torch.randn(num_items, dim, generator=g)
        items[7] = items[3]  # duplicated embeddings tie exactly
        items[15] = items[3]
    targets = torch.randint(0, num_items, (num_users,), generator=g)
    targets[0] = 3
    history = torch.randint(-1, num_items, (num_users, 6), generator=g)
    history[1, 2] = targets[1]  # target also in the history
    history[2, :3] = history[2, 3]  # duplicates in the history
    return users, items, targets, history


@pytest.mark.parametrize("integer_valued", [False, True])
def test_chunked_equals_unchunked(integer_valued):
    users, items, targets, history = _random_case(0, integer_valued)
    expected = _reference_ranks(users, items, targets, history)
    full = target_ranks(users, items, targets, history, chunk_size=10**6, user_batch_size=None)
    assert torch.equal(full, expected)
    for chunk in (1, 2, 5, 7, 23, 64):
        for ub in (1, 4, None):
            got = target_ranks(users, items, targets, history, chunk_size=chunk, user_batch_size=ub)
            assert torch.equal(got, expected), (chunk, ub)
    if not integer_valued:  # user 0's target 3 has two exact copies (7, 15): both count as ties
        no_copies = items.clone()
        no_copies[7] += 10.0 * torch.sign(users[0])
        no_copies[15] -= 10.0 * torch.sign(users[0])
        r0 = target_ranks(users[:1], items, targets[:1], None, chunk_size=5)
        r1 = target_ranks(users[:1], no_copies, targets[:1], None, chunk_size=5)
        assert r0.item() == r1.item() + 1  # 7 tied (now higher), 15 tied (now lower)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_duplicated_items_tie_exactly_wherever_they_sit(dtype):
    # 160 items made of 16 distinct rows: every target has 9 exact copies spread over many chunks and
    # matmul column positions; they must all count as ties, whatever the chunking
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 32, generator=g)
    items = base[torch.arange(160) % 16][torch.randperm(160, generator=g)].to(dtype)
    users = torch.randn(12, 32, generator=g).to(dtype)
    targets = torch.randint(0, 160, (12,), generator=g)
    history = torch.randint(-1, 160, (12, 8), generator=g)
    expected = _reference_ranks(users, items, targets, history)
    for chunk in (7, 64, 160):
        for ub in (5, None):
            got = target_ranks(users, items, targets, history, chunk_size=chunk, user_batch_size=ub)
            assert torch.equal(got, expected), (chunk, ub)


def test_degenerate_scores_rank_last():
    # all items identical (a collapsed model), and a zero user: everything ties -> worst rank
    items = torch.tensor([[0.3, -1.7, 2.0]]).repeat(50, 1)
    users = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    history = [[4, 5, 5, 7], [1]]  # user 0: 3 distinct history items, target 7 among them
    got = target_ranks(users, items, torch.tensor([7, 9]), history, chunk_size=8)
    assert got.tolist() == [1 + (50 - 1 - 2), 1 + (50 - 1 - 1)]
    zero_user = target_ranks(users[1:], torch.randn(50, 3), torch.tensor([9]), None, chunk_size=8)
    assert zero_user.tolist() == [50]


def test_topk_equals_full_topk():
    users, items, targets, history = _random_case(1, integer_valued=False)
    items[7] = items[7] + 0.5  # undo the duplicate rows: all scores distinct
    items[15] = items[15] - 0.5
    full = users @ items.T
    masked = full.clone()
    for b, row in enumerate(history.tolist()):
        for j in row:
            if j >= 0:
                masked[b, j] = float("-inf")
    for k in (1, 5, 10, 23):
        ref_s, ref_i = torch.topk(masked, k, dim=1)
        for chunk in (1, 3, 7, 23, 100):  # chunk 3 and 7 are smaller than k = 5, 10 and don't divide 23
            for ub in (2, None):
                s, i = topk_items(users, items, k, history, chunk_size=chunk, user_batch_size=ub)
                assert s.shape == (users.shape[0], k) and i.shape == (users.shape[0], k)
                torch.testing.assert_close(s, ref_s)
                finite = torch.isfinite(ref_s)  # -inf (masked) entries come in any order
                assert torch.equal(i[finite], ref_i[finite]), (k, chunk, ub)
    # without history
    s, i = topk_items(users, items, 4, chunk_size=6)
    torch.testing.assert_close(s, torch.topk(full, 4).values)
    assert torch.equal(i, torch.topk(full, 4).indices)


def test_topk_with_ties_returns_consistent_items():
    users, items, _, history = _random_case(2, integer_valued=True)
    full = users @ items.T
    for b, row in enumerate(history.tolist()):
        for j in row:
            if j >= 0:
                full[b, j] = float("-inf")
    ref_s = torch.topk(full, 8).values
    s, i = topk_items(users, items, 8, history, chunk_size=3)
    assert torch.equal(s, ref_s)  # same scores, exact (integer-valued)
    assert torch.equal(torch.gather(full, 1, i), s)  # the returned items really have these scores
    assert all(len(set(row)) == 8 for row in i.tolist())  # no duplicates


# --------------------------------------------------------------------------------------------------
# evaluate module
# --------------------------------------------------------------------------------------------------
def test_evaluate_module_matches():
    import evaluate

    metric = evaluate.load(RANKING_METRIC_PATH, keep_in_memory=True)
    assert type(metric).__name__ == "PmmrecRanking"
    ranks = [1, 3, 11, 60]
    assert metric.compute(predictions=ranks) == ranking_metrics_from_ranks(ranks)
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 200, size=57).tolist()
    for ks in ([10, 20, 50], [1, 5, 100], 7, [50, 5, 5]):
        assert metric.compute(predictions=ranks, ks=ks) == ranking_metrics_from_ranks(ranks, ks=ks)
    # add_batch accumulation, via the package helper
    metric2 = M.load_ranking_metric(keep_in_memory=True)
    metric2.add_batch(predictions=ranks[:20])
    metric2.add_batch(predictions=ranks[20:])
    assert metric2.compute(ks=[3, 30]) == ranking_metrics_from_ranks(ranks, ks=[3, 30])
    for bad in ([], [0], [5, -1]):
        with pytest.raises(ValueError, match="ks"):
            metric.compute(predictions=ranks, ks=bad)
    with pytest.raises(ValueError, match="predictions"):
        metric.compute(predictions=[0, 2])


def test_evaluate_module_is_self_contained():
    script = Path(RANKING_METRIC_PATH) / "pmmrec_ranking.py"
    assert (Path(RANKING_METRIC_PATH) / "README.md").is_file()
    tree = ast.parse(script.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"numbers", "datasets", "evaluate", "numpy"}


def test_metrics_module_top_level_imports():
    tree = ast.parse(Path(M.__file__).read_text())
    top = set()
    for node in tree.body:  # module level only; evaluate is imported lazily inside a function
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    assert "evaluate" not in top and "datasets" not in top
    assert top - set(sys.stdlib_module_names) <= {"numpy", "torch"}


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error():
    users, items, targets = USERS, ITEMS, TARGETS
    bad_targets_cases = ([0, 6, 1], [-1, 0, 1], [0, 1], [0.0, 1.0, 2.0])  # out of range, wrong length, floats
    for bad_targets in map(torch.tensor, bad_targets_cases):
        with pytest.raises(ValueError, match="targets"):
            target_ranks(users, items, bad_targets, None)
    with pytest.raises(ValueError, match="user_embeddings and item_embeddings"):
        target_ranks(users, torch.zeros(6, 3), targets, None)
    with pytest.raises(ValueError, match="user_embeddings and item_embeddings"):
        topk_items(users, torch.zeros(6, 3), 2)
    with pytest.raises(ValueError, match="item_embeddings"):
        target_ranks(users, torch.zeros(6), targets, None)
    with pytest.raises(ValueError, match="user_embeddings"):
        target_ranks(torch.full((3, 2), float("nan")), items, targets, None)
    for bad_ks in ([], (), [0], [10, -1], [2.5], "10", [True]):
        with pytest.raises(ValueError, match="ks"):
            ranking_metrics_from_ranks([1, 2], ks=bad_ks)
        with pytest.raises(ValueError, match="ks"):
            evaluate_full_ranking(users, items, targets, HISTORY, ks=bad_ks)
    for bad_ranks in ([], [0, 1], [1.5], [[1, 2]]):
        with pytest.raises(ValueError, match="ranks"):
            ranking_metrics_from_ranks(bad_ranks)
    with pytest.raises(ValueError, match="history"):
        target_ranks(users, items, targets, torch.tensor([[6], [0], [0]]))
    with pytest.raises(ValueError, match="history"):
        target_ranks(users, items, targets, [[0], [1]])
    with pytest.raises(ValueError, match="chunk_size"):
        target_ranks(users, items, targets, None, chunk_size=0)
    with pytest.raises(ValueError, match="user_batch_size"):
        target_ranks(users, items, targets, None, user_batch_size=0)
    with pytest.raises(ValueError, match="k must be"):
        topk_items(users, items, 7)
    with pytest.raises(ValueError, match="k must be"):
        topk_items(users, items, 0)


def test_repeated_targets_are_ranked_or_counted_as_misses():
    from pmmrec_hf.metrics import target_ranks

    items = torch.tensor([[3.0], [2.0], [1.0], [0.5]])  # scores for a user embedding (1,): 3, 2, 1, 0.5
    users = torch.tensor([[1.0], [1.0]])
    targets = torch.tensor([1, 2])
    history = torch.tensor([[1, 0], [3, -1]])  # user 0's target (item 1) is also in its history
    ranked = target_ranks(users, items, targets, history)
    # user 0: item 0 masked (history), the target itself is not: rank 1; user 1: items 0, 1 above: rank 3
    assert ranked.tolist() == [1, 3]
    missed = target_ranks(users, items, targets, history, repeated_targets="miss")
    assert missed.tolist() == [5, 3]  # I + 1: beyond every cut-off
    metrics = evaluate_full_ranking(users, items, targets, history, ks=(1,), repeated_targets="miss")
    assert metrics["hr@1"] == 0.0
    assert evaluate_full_ranking(users, items, targets, history, ks=(1,))["hr@1"] == 0.5
    with pytest.raises(ValueError, match="repeated_targets"):
        target_ranks(users, items, targets, history, repeated_targets="drop")
