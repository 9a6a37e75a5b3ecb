"""`pmmrec_hf.training.train`: the evaluation callback and the timing summary (ID baseline: fast)."""

from __future__ import annotations

import pytest
import torch

from pmmrec_hf.data.collator import PMMRecCollator
from pmmrec_hf.data.format import load_items, load_prepared
from pmmrec_hf.data.synthetic import make_synthetic_dataset
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel
from pmmrec_hf.training import TrainingConfig, encode_catalogue, evaluate_model, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(num_items=30, num_users=24, seed=0, output_dir=folder, max_length=8, image_size=8)
    items, _ = load_items(folder, decode_images=False)
    splits = load_prepared(folder)
    return items, [dict(r) for r in splits["train"]], [dict(r) for r in splits["validation"]]


def _model(num_items: int) -> SASRecModel:
    torch.manual_seed(0)
    return SASRecModel(SASRecConfig(num_items=num_items, hidden_size=16, intermediate_size=32,
                                    max_position_embeddings=8))


def test_on_evaluate_sees_every_evaluation_with_the_model_in_eval_mode(data, tmp_path):
    items, train_rows, validation = data
    collator = PMMRecCollator(items, modality="ids", max_length=8)
    model = _model(len(collator.items))
    calls = []

    def on_evaluate(step, metrics, unwrapped, item_embeddings):
        assert unwrapped is model and not unwrapped.training
        # the catalogue handed over is the model's at this step: re-embedding it gives the same tensor, and
        # re-scoring validation with it reproduces the metrics train() just computed
        torch.testing.assert_close(item_embeddings, encode_catalogue(unwrapped, collator), rtol=0, atol=0)
        again = evaluate_model(unwrapped, collator, validation, ks=(5,), item_embeddings=item_embeddings)
        calls.append((step, dict(metrics), again))

    config = TrainingConfig(output_dir=str(tmp_path), batch_size=8, learning_rate=1e-2, max_steps=7, eval_steps=3,
                            report_to="none", ks=(5,))
    summary = train(model, train_rows, collator, config, eval_rows=validation, save_fn=lambda m, out: None,
                    on_evaluate=on_evaluate)
    assert [step for step, _, _ in calls] == [0, 3, 6, 7]
    assert [metrics for _, metrics, _ in calls] == [{k: v for k, v in h.items() if k != "step"}
                                                   for h in summary["eval_history"]]
    for _, metrics, again in calls:
        assert again == metrics
    assert calls[0][1] != calls[-1][1]  # training changed the model between the first and the last call
    assert model.training  # train mode restored after each callback
    assert summary["train_seconds"] > 0 and summary["eval_seconds"] > 0


def test_without_evaluation_all_time_is_training(data, tmp_path):
    items, train_rows, _ = data
    collator = PMMRecCollator(items, modality="ids", max_length=8)
    config = TrainingConfig(output_dir=str(tmp_path), batch_size=8, max_steps=2, report_to="none")
    summary = train(_model(len(collator.items)), train_rows, collator, config, save_fn=lambda m, out: None)
    assert summary["eval_seconds"] == 0.0 and summary["train_seconds"] > 0
