import pytest
import torch

from pmmrec_hf.data.corruption import corrupt_sequences


def _batch(batch=64, length=12, num_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, num_items, (batch, length), generator=g)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[0], lengths[1], lengths[2] = length, 1, 0  # full row, single item, empty row
    pad = torch.arange(length).unsqueeze(0) < (length - lengths).unsqueeze(1)
    return index.masked_fill(pad, -1), num_items


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_labels_mark_exactly_changed_positions_and_padding_kept():
    index, n = _batch()
    corrupted, labels = corrupt_sequences(index, n, 0.3, 0.5, _gen(1))
    real = index >= 0
    assert corrupted.shape == labels.shape == index.shape
    assert corrupted.dtype == labels.dtype == torch.long
    assert torch.equal(corrupted[~real], torch.full_like(corrupted[~real], -1))
    assert torch.all(labels[~real] == -100)
    assert torch.equal(labels[real], (corrupted[real] != index[real]).long())
    assert bool((corrupted[real] >= 0).all()) and bool((corrupted[real] < n).all())
    assert labels[real].sum() > 0


def test_zero_probabilities_are_identity():
    index, n = _batch()
    corrupted, labels = corrupt_sequences(index, n, 0.0, 0.0, _gen(0))
    assert torch.equal(corrupted, index)
    assert torch.all(labels[index >= 0] == 0)
    assert torch.all(labels[index < 0] == -100)


def test_replace_all_changes_every_real_position():
    index, n = _batch()
    corrupted, labels = corrupt_sequences(index, n, 1.0, 0.0, _gen(0))
    real = index >= 0
    assert torch.all(corrupted[real] != index[real])
    assert torch.all(labels[real] == 1)
    # a single distinct item cannot be replaced
    one = torch.tensor([[-1, 0, 0], [0, 0, 0]])
    corrupted, labels = corrupt_sequences(one, 1, 1.0, 0.0, _gen(0))
    assert torch.equal(corrupted, one)
    assert torch.equal(labels, torch.tensor([[-100, 0, 0], [0, 0, 0]]))


def test_shuffle_keeps_multiset_and_moves_a_span():
    batch, length = 200, 10
    index = torch.arange(batch * length).view(batch, length) % 1000  # distinct items within a row
    index[:, :3] = -1
    corrupted, labels = corrupt_sequences(index, 1000, 0.0, 1.0, _gen(3))
    assert torch.all(corrupted[:, :3] == -1)
    for row in range(batch):
        assert sorted(corrupted[row, 3:].tolist()) == sorted(index[row, 3:].tolist())
        changed = labels[row, 3:].nonzero().flatten()
        assert len(changed) >= 2  # a non-identity permutation of distinct items moves at least two
        # the changed positions lie within one contiguous span
        assert changed.max() - changed.min() + 1 <= length - 3
    # sequences with fewer than 2 real items are left alone
    short = torch.tensor([[-1, -1, 5], [-1, -1, -1]])
    corrupted, labels = corrupt_sequences(short, 10, 0.0, 1.0, _gen(0))
    assert torch.equal(corrupted, short)


def test_seeded_determinism():
    index, n = _batch(batch=128)
    a = corrupt_sequences(index, n, 0.2, 0.3, _gen(7))
    b = corrupt_sequences(index, n, 0.2, 0.3, _gen(7))
    c = corrupt_sequences(index, n, 0.2, 0.3, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_replacement_rate_roughly_matches():
    index, n = _batch(batch=512, length=20, num_items=100)
    _, labels = corrupt_sequences(index, n, 0.25, 0.0, _gen(0))
    rate = labels[index >= 0].float().mean().item()
    assert 0.2 < rate < 0.3


@pytest.mark.parametrize("name,args", [("replace_prob", (1.5, 0.0)), ("shuffle_prob", (0.0, -0.1))])
def test_probability_validation(name, args):
    index, n = _batch(batch=4)
    with pytest.raises(ValueError, match=name):
        corrupt_sequences(index, n, *args)


def test_empty_batch():
    empty = torch.zeros((0, 5), dtype=torch.long)
    corrupted, labels = corrupt_sequences(empty, 0, 0.5, 0.5)
    assert corrupted.shape == labels.shape == (0, 5)
