"""The ID-based SASRec baseline (pmmrec_hf.sasrec)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel

from pmmrec_hf import PMMRecModelOutput, PMMRecUserEncoder, PMMRecUserEncoderConfig
from pmmrec_hf.losses import _user_item_ids, next_item_loss
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel

NUM_ITEMS = 20
L = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kw) -> SASRecConfig:
    args = dict(num_items=NUM_ITEMS, hidden_size=16, intermediate_size=32, max_position_embeddings=L)
    args.update(kw)
    return SASRecConfig(**args)


def _model(seed: int = 0, **kw) -> SASRecModel:
    torch.manual_seed(seed)
    return SASRecModel(_config(**kw))


def _batch() -> dict:
    """3 users over 6 distinct items; item_index (3, L + 1) left-padded; plus keys an ID model ignores."""
    item_ids = torch.tensor([4, 0, 17, 9, 12, 3])
    return dict(
        item_ids=item_ids,
        item_index=torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 4, 5, 1, 2, 3], [-1, -1, -1, -1, 5, 4]]),
        item_log_popularity=torch.log(torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1])),
        input_ids=torch.ones(6, 4, dtype=torch.long),
        pixel_values=torch.zeros(6, 3, 8, 8),
        corrupted_index=torch.tensor([[-1, -1, 0, 1, 5], [0, 4, 5, 2, 1], [-1, -1, -1, -1, 5]]),
    )


def test_config_reuses_the_user_encoder_fields():
    config = _config()
    assert config.model_type == "pmmrec_sasrec" and isinstance(config, PMMRecUserEncoderConfig)
    user = config.user_encoder_config
    assert type(user) is PMMRecUserEncoderConfig
    defaults = PMMRecUserEncoderConfig()
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_act", "hidden_dropout_prob",
                 "layer_norm_eps", "layer_norm_position", "initializer_range"):
        assert getattr(config, name) == getattr(user, name) == getattr(defaults, name)
    assert (user.hidden_size, user.intermediate_size, user.max_position_embeddings) == (16, 32, L)
    assert AutoConfig.for_model("pmmrec_sasrec").__class__ is SASRecConfig
    with pytest.raises(ValueError, match="negatives"):
        _config(negatives="sampled")
    with pytest.raises(ValueError, match="num_items"):
        _config(num_items=0)
    with pytest.raises(ValueError, match="num_items"):
        SASRecModel(SASRecConfig(hidden_size=16, intermediate_size=32))
    with pytest.raises(ValueError, match="num_attention_heads"):
        _config(num_attention_heads=3)


def test_shapes_and_shared_interface():
    model = _model().eval()
    assert isinstance(model.user_encoder, PMMRecUserEncoder)
    assert isinstance(AutoModel.from_config(_config()), SASRecModel)
    batch = _batch()
    out = model(**batch)
    assert isinstance(out, PMMRecModelOutput)
    assert out.loss.shape == () and torch.equal(out.loss, out.next_item_loss)
    assert out.nicl_loss is None and out.nid_loss is None and out.rcl_loss is None
    assert out.item_embeddings.shape == (6, 16)
    assert out.user_states.shape == (3, L, 16) and out.user_embeddings.shape == (3, 16)
    assert torch.equal(out.user_embeddings, out.user_states[:, -1])
    table = model.all_item_embeddings()
    assert table.shape == (NUM_ITEMS, 16)
    assert torch.equal(model.encode_items(item_ids=batch["item_ids"]), table[batch["item_ids"]])
    assert torch.equal(model.encode_items(item_ids=batch["item_ids"], input_ids=batch["input_ids"]), out.item_embeddings)
    users = model.encode_users(out.item_embeddings, batch["item_index"][:, :-1])
    assert torch.equal(users.last_hidden_state, out.user_states)
    inference = model(**{**batch, "item_index": batch["item_index"][:, 1:]}, return_loss=False)
    assert inference.loss is None and inference.user_states.shape == (3, L, 16)
    last = model.encode_users(out.item_embeddings, batch["item_index"][:, 1:]).user_embeddings
    assert torch.equal(inference.user_embeddings, last)
    with pytest.raises(ValueError, match="item_ids"):
        model.encode_items(item_ids=torch.tensor([NUM_ITEMS]))
    # gradients reach the item table and the user encoder
    model.train()
    model(**batch).loss.backward()
    assert model.item_embeddings.weight.grad.abs().sum() > 0
    assert model.user_encoder.layers[0].attention.query.weight.grad is not None


@pytest.mark.parametrize("logq", [True, False])
def test_in_batch_loss_is_next_item_loss_on_the_same_tensors(logq):
    model = _model(logq_correction=logq).eval()
    batch = _batch()
    out = model(**batch)
    item_ids, index = batch["item_ids"], batch["item_index"]
    emb = model.item_embeddings.weight[item_ids]
    states = model.encode_users(emb, index[:, :-1]).last_hidden_state
    inputs, targets = index[:, :-1], index[:, 1:]
    users, slots = ((inputs >= 0) & (targets >= 0)).nonzero(as_tuple=True)
    expected = next_item_loss(
        query=states[users, slots], candidates=emb, targets=targets[users, slots], query_users=users,
        user_item_ids=_user_item_ids(index, item_ids), candidate_ids=item_ids,
        candidate_log_q=batch["item_log_popularity"] if logq else None,
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert users.numel() == 3 + 5 + 1  # every real position with a real next item is a training example


def test_full_softmax_loss_is_next_item_loss_over_all_items():
    model = _model(negatives="full").eval()
    batch = _batch()
    out = model(**batch)
    item_ids, index = batch["item_ids"], batch["item_index"]
    table = model.item_embeddings.weight
    states = model.encode_users(table[item_ids], index[:, :-1]).last_hidden_state
    inputs, targets = index[:, :-1], index[:, 1:]
    users, slots = ((inputs >= 0) & (targets >= 0)).nonzero(as_tuple=True)
    expected = next_item_loss(
        query=states[users, slots], candidates=table, targets=item_ids[targets[users, slots]], query_users=users,
        user_item_ids=_user_item_ids(index, item_ids), candidate_ids=torch.arange(NUM_ITEMS),
    )  # no log-q correction over the full catalogue
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    in_batch = _model(negatives="in_batch").eval()(**batch).loss
    assert not torch.allclose(out.loss, in_batch)  # 20 candidates instead of 6


def _toy_batch(generator: torch.Generator, num_items: int, users: int = 8) -> dict:
    """Item i is always followed by item i + 1 (mod num_items); sequences of L + 1 items, some shorter."""
    starts = torch.randint(0, num_items, (users,), generator=generator)
    sequences = (starts[:, None] + torch.arange(L + 1)) % num_items  # (B, L + 1) item ids
    lengths = torch.randint(2, L + 2, (users,), generator=generator)
    real = torch.arange(L + 1)[None, :] >= (L + 1 - lengths)[:, None]  # left padding
    item_ids, inverse = torch.unique(sequences[real], return_inverse=True)
    item_index = torch.full_like(sequences, -1)
    item_index[real] = inverse
    return {"item_ids": item_ids, "item_index": item_index}


@pytest.mark.parametrize("negatives", ["in_batch", "full"])
def test_training_learns_a_deterministic_pattern(negatives):
    num_items = 10
    torch.manual_seed(0)
    model = SASRecModel(_config(num_items=num_items, negatives=negatives, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, num_hidden_layers=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(60):
        loss = model(**_toy_batch(generator, num_items)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    # full ranking (as in evaluation): the item after the last one of the history ranks first
    model.eval()
    with torch.no_grad():
        table = model.all_item_embeddings()
        histories = torch.stack([(torch.arange(i - 2, i + 1)) % num_items for i in range(num_items)])  # (I, 3)
        index = torch.cat([torch.full((num_items, L - 3), -1), histories], dim=1)  # left-padded to L
        users = model.encode_users(table, index).user_embeddings
        scores = users @ table.T
        scores[torch.arange(num_items)[:, None], histories] = float("-inf")  # exclude the history
    assert torch.equal(scores.argmax(1), (torch.arange(num_items) + 1) % num_items)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = _model(negatives="full", logq_correction=False).eval()
    model.save_pretrained(tmp_path)
    for loader in (SASRecModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is SASRecModel
        assert loaded.config.negatives == "full" and loaded.config.num_items == NUM_ITEMS
        assert loaded.config.logq_correction is False
        assert loaded.config.to_dict() == model.config.to_dict() | {"_name_or_path": loaded.config._name_or_path}
        original, restored = model.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[key], restored[key]) for key in original)
        batch = _batch()
        assert torch.equal(loaded(**batch).loss, model(**batch).loss)


@pytest.mark.slow
def test_remote_code_loading_without_the_package(tmp_path):
    """A saved SASRec checkpoint loads with AutoModel(trust_remote_code=True) where pmmrec_hf is hidden."""
    model = _model().eval()
    model.save_pretrained(tmp_path / "sasrec")
    batch = _batch()
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(model(**batch).loss, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["pmmrec_hf"] = None  # hide the package
        import torch
        from transformers import AutoModel
        root = {str(tmp_path)!r}
        model = AutoModel.from_pretrained(root + "/sasrec", trust_remote_code=True).eval()
        assert type(model).__name__ == "SASRecModel" and "transformers_modules" in type(model).__module__
        assert torch.equal(model(**torch.load(root + "/batch.pt")).loss, torch.load(root + "/expected.pt"))
        print("REMOTE OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert "REMOTE OK" in result.stdout, result.stderr[-3000:]
