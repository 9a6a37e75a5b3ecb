"""Next-item scoring: dot product (the research code) or cosine with a temperature (PMMRec and SASRec)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from tiny_models import tiny_batch, tiny_config

from pmmrec_hf import PMMRecConfig, PMMRecModel
from pmmrec_hf.losses import next_item_loss
from pmmrec_hf.commands.arguments import scoring_overrides
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel
from pmmrec_hf.transfer import load_for_transfer


def test_temperature_divides_the_logits():
    # logits [2, 0] / 0.5 = [4, 0]; positive first -> loss = log(1 + e^-4)
    loss = next_item_loss(query=torch.tensor([[1.0, 0.0]]), candidates=torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
                          targets=torch.tensor([0]), query_users=torch.tensor([0]),
                          user_item_ids=torch.tensor([[7]]), candidate_ids=torch.tensor([7, 8]), temperature=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-5)
    plain = next_item_loss(query=torch.tensor([[1.0, 0.0]]), candidates=torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
                           targets=torch.tensor([0]), query_users=torch.tensor([0]),
                           user_item_ids=torch.tensor([[7]]), candidate_ids=torch.tensor([7, 8]))
    assert plain.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)


def _text_model(similarity: str, temperature: float = 1.0) -> PMMRecModel:
    torch.manual_seed(0)
    return PMMRecModel(tiny_config("text", nid_weight=0.0, rcl_weight=0.0, next_item_similarity=similarity,
                                   next_item_temperature=temperature)).eval()


def _text_batch() -> dict:
    batch = tiny_batch()
    return {k: v for k, v in batch.items() if k != "pixel_values"}


@torch.no_grad()
def test_cosine_scores_do_not_depend_on_the_embedding_scale():
    """Scaling the text projection by 3 scales every item embedding by 3: the cosine model's normalised
    embeddings, user embeddings and loss are unchanged; the dot model's loss changes."""
    batch = _text_batch()
    for similarity in ("cosine", "dot"):
        model = _text_model(similarity, 0.1 if similarity == "cosine" else 1.0)
        before = model(**batch)
        items = model.encode_items(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        users = model.encode_users(items, batch["item_index"][:, :-1]).user_embeddings
        model.item_encoder.text_projection.weight.mul_(3.0)
        model.item_encoder.text_projection.bias.mul_(3.0)
        after = model(**batch)
        if similarity == "cosine":
            torch.testing.assert_close(items.norm(dim=-1), torch.ones(items.shape[0]))
            torch.testing.assert_close(users.norm(dim=-1), torch.ones(users.shape[0]))
            torch.testing.assert_close(after.loss, before.loss, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(after.item_embeddings, before.item_embeddings, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(after.loss, before.loss, atol=1e-3)


@torch.no_grad()
def test_cosine_loss_is_the_dot_loss_of_normalised_states_over_the_temperature():
    batch = _text_batch()
    model = _text_model("cosine", 0.05)
    out = model(**batch)
    inputs, targets = batch["item_index"][:, :-1], batch["item_index"][:, 1:]
    states = model.encode_users(out.item_embeddings, inputs).last_hidden_state
    users, slots = ((inputs >= 0) & (targets >= 0)).nonzero(as_tuple=True)
    query = torch.nn.functional.normalize(states[users, slots], dim=-1)
    ids = torch.where(batch["item_index"] >= 0, batch["item_ids"][batch["item_index"].clamp(min=0)], -1)
    expected = next_item_loss(query / 0.05, out.item_embeddings, targets[users, slots], users, ids,
                              batch["item_ids"], batch["item_log_popularity"])
    torch.testing.assert_close(out.next_item_loss, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sasrec_cosine():
    torch.manual_seed(0)
    model = SASRecModel(SASRecConfig(num_items=20, hidden_size=16, intermediate_size=32, max_position_embeddings=5,
                                     next_item_similarity="cosine", next_item_temperature=0.1)).eval()
    table = model.all_item_embeddings()
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(20))
    batch = {"item_ids": torch.tensor([4, 0, 17, 9, 12, 3]),
             "item_index": torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 4, 5, 1, 2, 3], [-1, -1, -1, -1, 5, 4]])}
    before = model(**batch).loss
    model.item_embeddings.weight.mul_(3.0)
    torch.testing.assert_close(model(**batch).loss, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.all_item_embeddings(), table, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("setting", ["full", "item_encoder", "user_encoder", "scratch", "text"])
def test_transfer_keeps_the_scoring(setting, tmp_path):
    torch.manual_seed(0)
    model = PMMRecModel(tiny_config(next_item_similarity="cosine", next_item_temperature=0.07))
    model.save_pretrained(tmp_path)
    reloaded = PMMRecModel.from_pretrained(tmp_path)
    assert (reloaded.config.next_item_similarity, reloaded.config.next_item_temperature) == ("cosine", 0.07)
    random = {"random_towers": True} if setting in ("user_encoder", "scratch") else {}
    kept = load_for_transfer(setting, str(tmp_path), **random)
    assert (kept.config.next_item_similarity, kept.config.next_item_temperature) == ("cosine", 0.07)
    changed = load_for_transfer(setting, str(tmp_path), next_item_temperature=0.2, **random)
    assert changed.config.next_item_temperature == 0.2


@pytest.mark.parametrize("bad", [{"next_item_similarity": "euclid"}, {"next_item_temperature": 0.0},
                                 {"next_item_temperature": -1.0}, {"next_item_temperature": "0.1"}])
def test_bad_scoring_settings_are_refused(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        tiny_config(**bad)
    with pytest.raises(ValueError, match=name):
        SASRecConfig(num_items=5, **bad)


def test_scoring_arguments_of_the_scripts():
    given = argparse.Namespace(next_item_similarity="cosine", next_item_temperature=0.07)
    unset = argparse.Namespace(next_item_similarity=None, next_item_temperature=None)
    assert scoring_overrides(given, new_model=True) == {"next_item_similarity": "cosine", "next_item_temperature": 0.07}
    assert scoring_overrides(unset, new_model=True) == {"next_item_similarity": "dot", "next_item_temperature": 1.0}
    # fine-tuning keeps the pre-trained model's scoring unless the command line says otherwise
    assert scoring_overrides(unset, new_model=False) == {}
    assert PMMRecConfig(item_encoder_config=tiny_config().item_encoder_config).next_item_similarity == "dot"
