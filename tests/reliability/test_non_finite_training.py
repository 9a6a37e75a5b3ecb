"""A non-finite gradient (the loss still finite) or loss stops training naming the step and the parameters,
or, with ``on_non_finite="skip"``, the step is skipped (no update), counted and logged (tiny ID model)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from pmmrec_hf.data.collator import PMMRecCollator
from pmmrec_hf.data.format import load_items, load_prepared
from pmmrec_hf.data.synthetic import make_synthetic_dataset
from pmmrec_hf.sasrec import SASRecConfig, SASRecModel
from pmmrec_hf.training import TrainingConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(num_items=20, num_users=24, seed=0, output_dir=folder, max_length=6, image_size=4)
    items, _ = load_items(folder, decode_images=False)
    collator = PMMRecCollator(items, modality="ids", max_length=6)
    return collator, [dict(r) for r in load_prepared(folder, split="train")]


class _Poisoned(SASRecModel):
    """Makes the gradient of `item_embeddings.weight` (or the loss) NaN at the forward calls in `at`."""

    poison_at: tuple[int, ...] = ()
    poison: str = "gradient"

    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        outputs = super().forward(*args, **kwargs)
        if self.poison == "gradient" and self.calls == 1:  # the backward of a poisoned call gets a NaN gradient
            self.item_embeddings.weight.register_hook(
                lambda grad: grad * float("nan") if self.calls in self.poison_at else grad)
        if self.poison == "loss" and self.calls in self.poison_at:
            outputs.loss = outputs.loss * float("nan")
        return outputs


def _model(collator, poison_at=(), poison="gradient") -> SASRecModel:
    torch.manual_seed(0)
    model = _Poisoned(SASRecConfig(num_items=len(collator.items), hidden_size=8, intermediate_size=16,
                                   max_position_embeddings=6, num_hidden_layers=1))
    model.poison_at, model.poison = tuple(poison_at), poison
    return model


def _config(tmp_path, **kw) -> TrainingConfig:
    values = dict(output_dir=str(tmp_path), batch_size=8, learning_rate=1e-2, max_steps=3, eval_steps=0,
                  report_to="none", logging_steps=1)
    values.update(kw)
    return TrainingConfig(**values)


def test_a_non_finite_gradient_stops_training_naming_the_step_and_the_parameter(data, tmp_path):
    collator, rows = data
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at step 2 in item_embeddings\.weight \(losses: "
                                                 r"loss [\d.]+, next_item_loss [\d.]+\).*--on-non-finite skip"):
        train(_model(collator, poison_at=(2,)), rows, collator, _config(tmp_path))
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("poison", ["gradient", "loss"])
def test_skip_mode_skips_the_step_without_an_update_counts_and_logs_it(data, tmp_path, caplog, poison):
    collator, rows = data
    with caplog.at_level(logging.WARNING, logger="pmmrec_hf.training"):
        summary = train(_model(collator, poison_at=(3,), poison=poison), rows, collator,
                        _config(tmp_path / "skip", on_non_finite="skip"))
    assert summary["global_step"] == 3 and summary["skipped_steps"] == 1
    reason = "non-finite gradient in item_embeddings.weight" if poison == "gradient" else "the loss is not finite"
    skips = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert len(skips) == 1 and skips[0].startswith(f"Skipped step 3 ({reason}"), skips
    assert skips[0].endswith("; 1 step(s) skipped so far.")
    assert json.loads((tmp_path / "skip" / "trainer_state.json").read_text())["skipped_steps"] == 1
    assert [e["step"] for e in summary["log_history"]] == [1, 2, 3]  # the skipped step's NaN is not logged
    assert all(math.isfinite(v) for e in summary["log_history"] for v in e.values())
    # no update at step 3: the weights are exactly those of a healthy run stopped after 2 steps
    skipped = SASRecModel.from_pretrained(tmp_path / "skip")
    train(_model(collator), rows, collator, _config(tmp_path / "two", max_steps=2))
    two = SASRecModel.from_pretrained(tmp_path / "two")
    for name, tensor in skipped.state_dict().items():
        assert torch.equal(tensor, two.state_dict()[name]), name


def test_on_non_finite_is_validated(data, tmp_path):
    collator, rows = data
    with pytest.raises(ValueError, match=r"`on_non_finite` must be 'raise' or 'skip', got 'ignore'"):
        train(_model(collator), rows, collator, _config(tmp_path, on_non_finite="ignore"))
