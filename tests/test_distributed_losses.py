"""Negatives gathered across processes: 2 processes x B users == 1 process x 2B users (CPU, gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmmrec_hf import PMMRecModel
from tiny_models import batch_from_sequences, tiny_catalogue, tiny_config

SEQUENCES = [[0, 1, 2, 3, 4, 5], [3, 7, 9], [2, 11, 12, 13, 1, 0], [5, 6], [7, 8, 9, 10, 11, 12], [14, 15, 3, 4]]
SLOTS = 6
COMPONENTS = ("next_item_loss", "nicl_loss", "nid_loss", "rcl_loss")


def _add_corruption(batch: dict, seed: int) -> dict:
    # a fixed, hand-written corruption: swap the last two inputs of every sequence that has 2+ inputs
    inputs = batch["item_index"][:, :-1]
    corrupted = inputs.clone()
    labels = torch.where(inputs >= 0, 0, -100)
    for row in range(inputs.shape[0]):
        real = (inputs[row] >= 0).nonzero().squeeze(1)
        if real.numel() >= 2 and inputs[row, -1] != inputs[row, -2]:
            corrupted[row, -2:] = inputs[row, -2:].flip(0)
            labels[row, -2:] = 1
    batch.update(corrupted_index=corrupted, noise_labels=labels)
    return batch


def _model() -> PMMRecModel:
    torch.manual_seed(0)
    return PMMRecModel(tiny_config(nicl_weight=0.4, nid_weight=0.3, rcl_weight=0.2)).eval()


def _run(sequences):
    model = _model()
    batch = _add_corruption(batch_from_sequences(sequences, tiny_catalogue(), SLOTS), 0)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: out[k].detach() for k in COMPONENTS + ("loss",)}, grads


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = len(SEQUENCES) // world
        losses, grads = _run(SEQUENCES[rank * half:(rank + 1) * half])
        for value in grads.values():  # what DDP does: average the gradients over processes
            dist.all_reduce(value)
            value /= world
        torch.save({"losses": losses, "grads": grads}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    single_losses, single_grads = _run(SEQUENCES)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in COMPONENTS + ("loss",):
        mean_over_ranks = (ranks[0]["losses"][name] + ranks[1]["losses"][name]) / 2
        torch.testing.assert_close(mean_over_ranks, single_losses[name], atol=1e-5, rtol=1e-5, msg=name)
    assert ranks[0]["grads"].keys() == single_grads.keys()
    for name, grad in single_grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
