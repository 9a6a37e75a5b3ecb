"""Each objective against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from pmmrec_hf.losses import first_occurrence_index, next_item_loss, nicl_loss, nid_loss, rcl_loss


def _ce(positive: float, others: list[float]) -> float:
    """-log softmax of `positive` against itself and `others`."""
    return -positive + math.log(math.exp(positive) + sum(math.exp(o) for o in others))


# candidates e0 = (1, 0) id 10, e1 = (0, 1) id 11, e2 = (1, 1) id 12
CANDIDATES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
CANDIDATE_IDS = torch.tensor([10, 11, 12])
# user 0 saw [10, 11]: its state after item 10 is q0 = (2, 1), the positive is item 11 (candidate 1)
# user 1 saw [12, 10]: its state after item 12 is q1 = (0, 1), the positive is item 10 (candidate 0)
QUERY = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
TARGETS = torch.tensor([1, 0])
USERS = torch.tensor([0, 1])
USER_ITEM_IDS = torch.tensor([[10, 11], [12, 10]])


def test_next_item_loss_by_hand():
    loss = next_item_loss(QUERY, CANDIDATES, TARGETS, USERS, USER_ITEM_IDS, CANDIDATE_IDS)
    # q0 logits: e0 = 2 (masked: id 10 is in user 0's own sequence), e1 = 1 (positive), e2 = 3
    # q1 logits: e0 = 0 (positive), e1 = 1, e2 = 1 (masked: id 12 is in user 1's sequence)
    expected = (_ce(1.0, [3.0]) + _ce(0.0, [1.0])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((math.log(1 + math.e**2) + math.log(1 + math.e)) / 2)


def test_next_item_loss_with_log_popularity_correction():
    log_q = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    loss = next_item_loss(QUERY, CANDIDATES, TARGETS, USERS, USER_ITEM_IDS, CANDIDATE_IDS, candidate_log_q=log_q)
    l0, l1, l2 = math.log(0.2), math.log(0.5), math.log(0.3)
    expected = (_ce(1.0 - l1, [3.0 - l2]) + _ce(0.0 - l0, [1.0 - l1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_masking_removes_exactly_the_intended_candidates():
    query = QUERY.clone().requires_grad_(True)
    candidates = CANDIDATES.clone().requires_grad_(True)
    next_item_loss(query[:1], candidates, TARGETS[:1], USERS[:1], USER_ITEM_IDS, CANDIDATE_IDS).backward()
    # for user 0 only candidate 0 (id 10, seen, not the positive) is masked: it gets no gradient
    assert torch.equal(candidates.grad[0], torch.zeros(2))
    assert candidates.grad[1].abs().sum() > 0 and candidates.grad[2].abs().sum() > 0
    # padding ids (-1) in a sequence mask nothing; invalid (gather padding) candidates are masked
    padded_users = torch.tensor([[-1, -1, 10, 11], [-1, -1, 12, 10]])
    same = next_item_loss(QUERY, CANDIDATES, TARGETS, USERS, padded_users, CANDIDATE_IDS)
    assert same.item() == pytest.approx((_ce(1.0, [3.0]) + _ce(0.0, [1.0])) / 2, rel=1e-6)
    invalid = next_item_loss(QUERY, CANDIDATES, TARGETS, USERS, USER_ITEM_IDS, CANDIDATE_IDS,
                             candidate_valid=torch.tensor([True, True, False]))
    assert invalid.item() == pytest.approx((_ce(1.0, []) + _ce(0.0, [1.0])) / 2, rel=1e-6)


def test_duplicate_candidates_count_once():
    # a second copy of item 11 with another embedding: it must be ignored, and a positive that points at it
    # is mapped to the first copy
    candidates = torch.cat([CANDIDATES, torch.tensor([[0.0, 5.0]])])
    ids = torch.cat([CANDIDATE_IDS, torch.tensor([11])])
    loss = next_item_loss(QUERY, candidates, torch.tensor([3, 0]), USERS, USER_ITEM_IDS, ids)
    assert loss.item() == pytest.approx((_ce(1.0, [3.0]) + _ce(0.0, [1.0])) / 2, rel=1e-6)
    assert first_occurrence_index(torch.tensor([7, 3, 7, 3, 9])).tolist() == [0, 1, 0, 1, 4]


def _nicl_reference(t, v, anchors, tau):
    """anchors: list of (anchor item, [(modality, item) positives...], [(modality, item) negatives...])."""
    feats = {"t": t, "v": v}
    per_anchor = []
    for modality, item, positives, negatives in anchors:
        a = feats[modality][item]
        negs = [float(a @ feats[m][j]) / tau for m, j in negatives]
        per_anchor.append(sum(_ce(float(a @ feats[m][j]) / tau, negs) for m, j in positives) / len(positives))
    return per_anchor


def test_nicl_by_hand():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)  # items a, b, c (ids 1, 2, 3)
    v = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    a, b, c = 0, 1, 2
    item_index = torch.tensor([[a, b], [b, c]])  # user 0: a -> b; user 1: b -> c
    ids = torch.tensor([1, 2, 3])
    tau = 0.1
    loss = nicl_loss(t, v, item_index, ids, tau)
    # negatives: items of the *other* user whose id differs from every positive's id, both modalities
    text_dir = _nicl_reference(t, v, [
        ("t", a, [("v", a), ("t", b), ("v", b)], [("t", c), ("v", c)]),  # other user holds b, c; b is a positive
        ("t", b, [("v", b)], [("t", c), ("v", c)]),  # last item: no next-item positive; b excluded (own id)
        ("t", b, [("v", b), ("t", c), ("v", c)], [("t", a), ("v", a)]),
        ("t", c, [("v", c)], [("t", a), ("v", a), ("t", b), ("v", b)]),
    ], tau)
    vision_dir = _nicl_reference(t, v, [
        ("v", a, [("t", a), ("t", b), ("v", b)], [("t", c), ("v", c)]),
        ("v", b, [("t", b)], [("t", c), ("v", c)]),
        ("v", b, [("t", b), ("t", c), ("v", c)], [("t", a), ("v", a)]),
        ("v", c, [("t", c)], [("t", a), ("v", a), ("t", b), ("v", b)]),
    ], tau)
    expected = sum((x + y) / 2 for x, y in zip(text_dir, vision_dir)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    total = nicl_loss(t, v, item_index, ids, tau, reduction="sum")
    assert total.item() == pytest.approx(expected * 4, rel=1e-5)


def test_nicl_padding_and_duplicate_items():
    torch.manual_seed(1)
    t = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    ids = torch.tensor([5, 6, 7, 6])  # row 3 is a second copy of id 6
    base = nicl_loss(t[:3], v[:3], torch.tensor([[-1, 0, 1], [-1, -1, 2]]), ids[:3])
    # the same sequences where user 1 also holds the duplicate copy: negatives count each id once
    t2, v2 = t.clone(), v.clone()
    t2[3], v2[3] = t[1], v[1]
    dup = nicl_loss(t2, v2, torch.tensor([[-1, 0, 1], [-1, -1, 2]]), ids)
    assert dup.item() == pytest.approx(base.item(), rel=1e-6)


def test_nid_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    labels = torch.tensor([[1, 0], [-100, 1]])

    def bce(x, y):
        return math.log(1 + math.exp(x)) - y * x

    expected = (bce(0.0, 1) + bce(2.0, 0) + bce(0.5, 1)) / 3
    assert nid_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert nid_loss(logits, labels, reduction="sum").item() == pytest.approx(expected * 3, rel=1e-6)


def test_rcl_by_hand():
    clean = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corrupted = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalised: (0.6, 0.8), (0, 1)
    loss = rcl_loss(clean, corrupted, temperature=0.5)
    # clean -> corrupted similarities / 0.5: [[1.2, 0], [1.6, 2]]; corrupted -> clean: [[1.2, 1.6], [0, 2]]
    forward = (_ce(1.2, [0.0]) + _ce(2.0, [1.6])) / 2
    backward = (_ce(1.2, [1.6]) + _ce(2.0, [0.0])) / 2
    assert loss.item() == pytest.approx((forward + backward) / 2, rel=1e-6)


def test_reduction_must_be_known():
    with pytest.raises(ValueError, match="reduction"):
        nid_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.long), reduction="max")


def test_padding_rows_of_a_gather_never_shadow_a_real_item():
    # the gathered pool of 2 processes, 2 rows each: process 0 has one item (id 5) and a padding row (zeros,
    # id 0); process 1 holds the real item 0 and item 7. A process-1 user whose next item is item 0.
    candidates = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ids = torch.tensor([5, 0, 0, 7])
    valid = torch.tensor([True, False, True, True])
    query = torch.tensor([[0.5, 2.0]])
    user_ids = torch.tensor([[7, 0]])  # saw item 7, then item 0 (the target)
    loss = next_item_loss(query, candidates, torch.tensor([2]), torch.tensor([0]), user_ids, ids,
                          candidate_valid=valid)
    # candidates that count: item 5 (logit 0.5) and item 0 (the positive, logit 2.0); item 7 is masked (own
    # sequence), the padding row is not a candidate
    assert loss.item() == pytest.approx(_ce(2.0, [0.5]), rel=1e-6)
    # the same without the padding row
    compact = next_item_loss(query, candidates[[0, 2, 3]], torch.tensor([1]), torch.tensor([0]), user_ids,
                             ids[[0, 2, 3]])
    assert loss.item() == pytest.approx(compact.item(), rel=1e-6)


def test_contrastive_logits_stay_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    query, candidates = torch.randn(6, 16, generator=g), torch.randn(9, 16, generator=g)
    targets, users = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 1, 1, 2, 2])
    ids = torch.arange(9) + 100
    user_ids = torch.tensor([[100, 101], [102, 103], [104, 105]])
    log_q = torch.log_softmax(torch.randn(9, generator=g), 0) * 3
    kwargs = dict(candidate_log_q=log_q, temperature=0.07)
    plain = next_item_loss(query, candidates, targets, users, user_ids, ids, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = next_item_loss(query, candidates, targets, users, user_ids, ids, **kwargs)
        rcl_mixed = rcl_loss(query, query.flip(0), 0.1)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    assert torch.equal(rcl_mixed, rcl_loss(query, query.flip(0), 0.1))


def test_rcl_leaves_out_users_without_a_representation():
    clean = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    noisy = torch.tensor([[0.9, 0.1], [0.2, 0.8], [1.0, 1.0]])
    valid = torch.tensor([True, True, False])  # user 2 has no real input position
    with_mask = rcl_loss(clean, noisy, 0.5, valid=valid, reduction="sum")
    without_user = rcl_loss(clean[:2], noisy[:2], 0.5, reduction="sum")
    assert with_mask.item() == pytest.approx(without_user.item(), rel=1e-6)


def test_rows_of_ids_finds_the_first_valid_copy_and_names_missing_ids():
    from pmmrec_hf.losses import rows_of_ids

    pool = torch.tensor([4, 0, 9, 0, 4])
    valid = torch.tensor([True, False, True, True, True])
    rows = rows_of_ids(torch.tensor([[-1, 0, 4], [9, 9, -1]]), pool, valid)
    assert rows.tolist() == [[-1, 3, 0], [2, 2, -1]]
    with pytest.raises(ValueError, match=r"ids \[7\] are not among the batch's items"):
        rows_of_ids(torch.tensor([7, 4]), pool, valid)
