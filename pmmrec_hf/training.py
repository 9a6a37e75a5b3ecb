"""The training loop behind ``examples/pretrain.py`` and ``examples/finetune.py`` (Accelerate).

Everything here is reusable and tested; the example scripts only parse arguments, build the model and
the data, and call :func:`train`.

Determinism and resuming: the order of the training rows in epoch ``e`` comes from a generator seeded
with ``seed + e``; NID/RCL corruption of step ``s`` from a generator seeded with ``(seed, s)``; dropout
from torch's RNG, whose state ``Accelerator.save_state`` stores. A run resumed from a checkpoint
therefore sees the same batches, corruption and dropout masks as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.corruption import corrupt_sequences
from .metrics import DEFAULT_KS, evaluate_full_ranking, ranking_metrics_from_ranks, target_ranks

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


@dataclass
class TrainingConfig:
    """Settings of a training run (every example script argument that is not about the model or data)."""

    output_dir: str = "outputs/pretrain"
    batch_size: int = 64
    eval_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    tower_learning_rate: float | None = None  # defaults to learning_rate
    weight_decay: float = 0.1
    tower_weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    max_steps: int = 1000
    num_epochs: int | None = None  # when set, max_steps = num_epochs * steps per epoch
    eval_steps: int = 200
    save_steps: int = 0  # 0: no intermediate checkpoints
    logging_steps: int = 10
    seed: int = 0
    mixed_precision: str = "no"
    report_to: str = "tensorboard"  # "none" to disable
    num_workers: int = 0
    ks: tuple[int, ...] = DEFAULT_KS
    catalogue_batch_size: int = 256
    resume_from_checkpoint: str | None = None
    max_grad_norm: float | None = None
    replace_prob: float = 0.0
    shuffle_prob: float = 0.0
    streaming_buffer_size: int = 1000
    stop_after_steps: int | None = None  # stop (as if killed) after this many steps: for resume tests


# --------------------------------------------------------------------------------------------------
# optimiser
# --------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, config: TrainingConfig) -> list[dict]:
    """Two groups: the backbone towers (tower learning rate, weight decay 0 by default) and everything else
    (learning rate, weight decay 0.1), the research code's setup. Only parameters that require grad."""
    towers, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (towers if ("text_tower." in name or "vision_tower." in name) else rest).append(param)
    groups = []
    if towers:
        groups.append({"params": towers, "lr": config.tower_learning_rate or config.learning_rate,
                       "weight_decay": config.tower_weight_decay, "name": "towers"})
    if rest:
        groups.append({"params": rest, "lr": config.learning_rate, "weight_decay": config.weight_decay,
                       "name": "rest"})
    if not groups:
        raise ValueError("The model has no trainable parameter.")
    return groups


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_catalogue(model: nn.Module, collator, batch_size: int = 256, device: torch.device | None = None,
                     feature_cache=None) -> torch.Tensor:
    """(I, d) embeddings of every item of the collator's item table, in integer-id order, in batches.

    With a `feature_cache` (``pmmrec_hf.feature_cache.FeatureCache`` holding every item of the table), the
    items' frozen tower features are looked up instead of running the towers' frozen part on raw inputs
    (the collator's item contents are not used then: a ``modality="ids"`` collator will do)."""
    if hasattr(model, "all_item_embeddings"):  # ID baseline
        return model.all_item_embeddings()
    table = collator.items
    encoder = collator.encoder
    device = device or next(model.parameters()).device
    chunks = []
    for start in range(0, len(table), batch_size):
        indices = list(range(start, min(start + batch_size, len(table))))
        if feature_cache is not None:
            inputs = feature_cache.lookup(torch.tensor(indices), device=device)
            chunks.append(model.encode_items(**inputs).float())
            continue
        texts = table.get_texts(indices) if encoder.uses_text else None
        images = table.get_images(indices) if encoder.uses_images else None
        inputs = encoder(texts, images, item_ids=[table.item_ids[i] for i in indices])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        chunks.append(model.encode_items(**inputs).float())
    return torch.cat(chunks)


def sequences_to_tensors(rows: Sequence[Any], item_table, max_length: int) -> dict[str, torch.Tensor]:
    """Evaluation rows -> integer tensors: ``inputs`` (B, L) left-padded with -1 (the last L items before the
    target), ``targets`` (B,) and ``history`` (B, H) every item before the target, for masking."""
    ids = [[item_table.index(i) for i in (row["item_ids"] if isinstance(row, dict) else row)] for row in rows]
    for row, seq in zip(rows, ids):
        if len(seq) < 2:
            user = row.get("user_id") if isinstance(row, dict) else seq
            raise ValueError(f"evaluation row {user!r} has {len(seq)} item(s); it needs at least 2.")
    width = max(len(seq) - 1 for seq in ids)
    inputs = torch.full((len(ids), max_length), -1, dtype=torch.long)
    history = torch.full((len(ids), width), -1, dtype=torch.long)
    for row, seq in enumerate(ids):
        cut = seq[:-1][-max_length:]
        inputs[row, max_length - len(cut):] = torch.tensor(cut)
        history[row, width - len(seq) + 1:] = torch.tensor(seq[:-1])
    return {"inputs": inputs, "targets": torch.tensor([seq[-1] for seq in ids]), "history": history}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    collator,
    rows: Iterable[Any],
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    catalogue_batch_size: int = 256,
    accelerator=None,
    item_embeddings: torch.Tensor | None = None,
    feature_cache=None,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K of `model` on validation/test rows (the last item of a row is the target).

    The catalogue is embedded once (in batches), each user is scored against every item with the history
    masked (``pmmrec_hf.metrics``). With a `feature_cache`, the catalogue is embedded from cached frozen tower
    features (see `encode_catalogue`). With an `accelerator`, each process ranks its share of the rows and the
    ranks are gathered (``gather_for_metrics``), so every process returns the metrics of all rows.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if item_embeddings is None:
        item_embeddings = encode_catalogue(model, collator, catalogue_batch_size, device, feature_cache=feature_cache)
    max_length = collator.max_length
    rows = list(rows)
    if accelerator is not None and accelerator.num_processes > 1:
        rows = rows[accelerator.process_index :: accelerator.num_processes]
    ranks = []
    for start in range(0, len(rows), batch_size):
        tensors = sequences_to_tensors(rows[start : start + batch_size], collator.items, max_length)
        users = model.encode_users(item_embeddings.to(device), tensors["inputs"].to(device)).user_embeddings
        ranks.append(target_ranks(users.float(), item_embeddings.to(device), tensors["targets"].to(device),
                                  tensors["history"].to(device)))
    ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    if accelerator is not None and accelerator.num_processes > 1:
        ranks = _gather_ranks(accelerator, ranks.to(device))
    model.train(was_training)
    return ranking_metrics_from_ranks(ranks.cpu(), ks=ks)


def _gather_ranks(accelerator, ranks: torch.Tensor) -> torch.Tensor:
    padded = accelerator.pad_across_processes(ranks, dim=0, pad_index=-1)
    gathered = accelerator.gather(padded)
    return gathered[gathered >= 0]


def popularity_metrics(train_counts: Sequence[int], rows: Iterable[Any], item_table, ks=DEFAULT_KS) -> dict[str, float]:
    """The most-popular baseline under the same protocol: score = train count, history masked."""
    counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
    rows = list(rows)
    tensors = sequences_to_tensors(rows, item_table, max_length=1)
    users = torch.ones(len(rows), 1, dtype=torch.float64)
    return evaluate_full_ranking(users, counts[:, None], tensors["targets"], tensors["history"], ks=ks)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def _epoch_loader(dataset, collator, config: TrainingConfig, generator: torch.Generator):
    from torch.utils.data import DataLoader, RandomSampler

    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        collate_fn=collator,
        num_workers=config.num_workers,
        drop_last=False,
    )


def _corrupt(batch: dict, config: TrainingConfig, step: int, process_index: int) -> dict:
    if config.replace_prob <= 0 and config.shuffle_prob <= 0:
        return batch
    generator = torch.Generator().manual_seed(hash((config.seed, step, process_index)) & 0x7FFF_FFFF)
    index = batch["item_index"][:, :-1].cpu()
    corrupted, labels = corrupt_sequences(
        index, int(batch["item_ids"].numel()), config.replace_prob, config.shuffle_prob, generator=generator
    )
    device = batch["item_index"].device
    batch["corrupted_index"], batch["noise_labels"] = corrupted.to(device), labels.to(device)
    return batch


_RAW_ITEM_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def _with_cached_features(batch: dict, feature_cache) -> dict:
    """The batch with its raw item inputs replaced by the cached frozen features of its `item_ids`."""
    device = batch["item_ids"].device
    out = {k: v for k, v in batch.items() if k not in _RAW_ITEM_INPUTS}
    out.update(feature_cache.lookup(batch["item_ids"], device=device))
    return out


def _latest_checkpoint(output_dir: str) -> str | None:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = sorted(int(p.name[len(CHECKPOINT_PREFIX):]) for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))
    return str(folder / f"{CHECKPOINT_PREFIX}{steps[-1]}") if steps else None


def train(
    model: nn.Module,
    train_dataset,
    collator,
    config: TrainingConfig,
    eval_rows: Sequence[Any] | None = None,
    accelerator=None,
    save_fn=None,
    feature_cache=None,
    on_evaluate=None,
) -> dict[str, Any]:
    """Train `model` on `train_dataset` rows with Accelerate; evaluate on `eval_rows`; checkpoint and resume.

    `train_dataset` is a map-style dataset (``datasets.Dataset`` or a list of rows) or an iterable/streaming
    one (already sharded for this process: see ``pmmrec_hf.data.shard_for_process``).
    `save_fn(unwrapped_model, output_dir)` writes the final model (defaults to ``save_pretrained``).
    `feature_cache`: a ``FeatureCache`` holding every item's frozen tower features; each batch's raw item
    inputs (input_ids / attention_mask / pixel_values) are then replaced by ``feature_cache.lookup(item_ids)``
    before the forward pass, and evaluation embeds the catalogue from it, so the towers' frozen blocks are
    never recomputed (a ``modality="ids"`` collator avoids tokenising and decoding images at all).
    `on_evaluate(step, metrics, model, item_embeddings)`: called on every process after each evaluation of
    `eval_rows`, with the unwrapped model in eval mode and the catalogue embeddings the metrics were computed
    from (e.g. to keep the best checkpoint, or to score a second split at the same step without embedding the
    catalogue again: ``evaluate_model(model, collator, test_rows, item_embeddings=item_embeddings)``, as the
    transfer benchmark does for its epochs grid).
    Returns a summary: steps, final losses, the evaluation history, `train_seconds` (the training loop's wall
    time without evaluation) and `eval_seconds`.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if accelerator is None:
        log_with = None if config.report_to in ("none", "", None) else config.report_to
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_dir=config.output_dir,
        )
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    streaming = not hasattr(train_dataset, "__len__")
    if streaming and config.num_epochs is not None:
        raise ValueError("`num_epochs` needs a dataset of known length; give `max_steps` for streaming data.")
    steps_per_epoch = None
    if not streaming:
        per_process = math.ceil(len(train_dataset) / config.batch_size / accelerator.num_processes)
        steps_per_epoch = max(per_process // config.gradient_accumulation_steps, 1)
    max_steps = config.max_steps if config.num_epochs is None else config.num_epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.is_main_process and accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers("pmmrec", config={k: v for k, v in asdict(config).items()
                                                    if isinstance(v, (int, float, str, bool))})

    generator = torch.Generator()
    loader = None
    if not streaming:
        loader = accelerator.prepare(_epoch_loader(train_dataset, collator, config, generator))

    start_step = 0
    resume = config.resume_from_checkpoint
    if resume == "latest":
        resume = _latest_checkpoint(config.output_dir)
    if resume:
        accelerator.load_state(resume)
        start_step = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
        logger.info("Resumed from %s at step %d", resume, start_step)

    unwrapped = accelerator.unwrap_model(model)
    history: list[dict] = []
    progress = tqdm(total=max_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)
    step, micro = start_step, 0
    last_logs: dict[str, float] = {}
    running: dict[str, list[float]] = {}

    def batches():
        epoch = 0 if streaming else step // steps_per_epoch
        while True:
            if streaming:
                if hasattr(train_dataset, "set_epoch"):
                    train_dataset.set_epoch(epoch)
                from torch.utils.data import DataLoader

                iterator = iter(DataLoader(train_dataset, batch_size=config.batch_size, collate_fn=collator,
                                           num_workers=config.num_workers))
                skip = step * config.gradient_accumulation_steps if epoch == 0 else 0
                for _ in range(skip):
                    next(iterator, None)
            else:
                generator.manual_seed(config.seed + epoch)
                skip = (step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
                iterator = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
            # starting a DataLoader iterator draws a base seed from torch's global RNG: keep that draw out of
            # the RNG stream that dropout uses, so a resumed run sees the same dropout masks
            with torch.random.fork_rng(devices=[]):
                first = next(iterator, None)
            if first is not None:
                for batch in itertools.chain([first], iterator):
                    yield {k: v.to(accelerator.device) for k, v in batch.items()} if streaming else batch
            epoch += 1

    timing = {"eval_seconds": 0.0}

    def evaluate_now() -> dict[str, float]:
        eval_start = time.perf_counter()
        was_training = unwrapped.training
        unwrapped.eval()
        catalogue = encode_catalogue(unwrapped, collator, config.catalogue_batch_size, accelerator.device,
                                     feature_cache=feature_cache)
        metrics = evaluate_model(unwrapped, collator, eval_rows, ks=config.ks, batch_size=config.eval_batch_size,
                                 accelerator=accelerator, item_embeddings=catalogue)
        history.append({"step": step, **metrics})
        if on_evaluate is not None:
            on_evaluate(step, metrics, unwrapped, catalogue)
        unwrapped.train(was_training)
        timing["eval_seconds"] += time.perf_counter() - eval_start
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "num_users"}, step=step)
        if accelerator.is_main_process:
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                          if k in (f"hr@{config.ks[0]}", f"ndcg@{config.ks[0]}")))
        return metrics

    loop_start = time.perf_counter()
    if eval_rows is not None and start_step == 0:
        evaluate_now()
    model.train()
    stream = batches()
    while step < max_steps:
        batch = next(stream)
        batch = _corrupt(batch, config, step * config.gradient_accumulation_steps + micro, accelerator.process_index)
        if feature_cache is not None:
            batch = _with_cached_features(batch, feature_cache)
        with accelerator.accumulate(model):
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        for name in ("loss", "next_item_loss", "nicl_loss", "nid_loss", "rcl_loss"):
            value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
            if value is not None:
                running.setdefault(name, []).append(float(value.detach()))
        micro += 1
        if not accelerator.sync_gradients:
            continue
        micro = 0
        step += 1
        progress.update(1)
        if step % config.logging_steps == 0 or step == max_steps:
            last_logs = {k: sum(v) / len(v) for k, v in running.items()}
            running = {}
            progress.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in last_logs.items()})
            accelerator.log({f"train/{k}": v for k, v in last_logs.items()} | {"train/lr": scheduler.get_last_lr()[-1]},
                            step=step)
        if eval_rows is not None and config.eval_steps and step % config.eval_steps == 0 and step < max_steps:
            evaluate_now()
        if config.save_steps and step % config.save_steps == 0:
            _save_checkpoint(accelerator, config.output_dir, step)
        if config.stop_after_steps is not None and step >= config.stop_after_steps:
            progress.close()
            accelerator.wait_for_everyone()
            return {"global_step": step, "stopped": True, "eval_history": history, "last_logs": last_logs}
    progress.close()
    if eval_rows is not None:
        evaluate_now()
    train_seconds = time.perf_counter() - loop_start - timing["eval_seconds"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (save_fn or _save_pretrained)(accelerator.unwrap_model(model), str(output_dir))
        (output_dir / "eval_history.json").write_text(json.dumps(history, indent=2))
    accelerator.end_training()
    return {"global_step": step, "stopped": False, "eval_history": history, "last_logs": last_logs,
            "train_seconds": train_seconds, "eval_seconds": timing["eval_seconds"],
            "collator_stats": dict(getattr(collator, "stats", {}))}


def _save_checkpoint(accelerator, output_dir: str, step: int) -> None:
    path = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    accelerator.wait_for_everyone()


def _save_pretrained(model, output_dir: str) -> None:
    model.save_pretrained(output_dir)


def save_pmmrec_outputs(model, output_dir: str, tokenizer=None, image_processor=None) -> dict[str, str]:
    """Save the full model, and the item encoder and the user encoder each on its own, with save_pretrained.

    Layout: ``<output_dir>/model``, ``<output_dir>/item_encoder``, ``<output_dir>/user_encoder``; the
    tokenizer / image processor go with the full model and the item encoder.
    """
    paths = {"model": os.path.join(output_dir, "model")}
    model.save_pretrained(paths["model"])
    if hasattr(model, "item_encoder"):
        paths["item_encoder"] = os.path.join(output_dir, "item_encoder")
        paths["user_encoder"] = os.path.join(output_dir, "user_encoder")
        model.item_encoder.save_pretrained(paths["item_encoder"])
        model.user_encoder.save_pretrained(paths["user_encoder"])
    for key in ("model", "item_encoder"):
        if key in paths:
            for processor in (tokenizer, image_processor):
                if processor is not None:
                    processor.save_pretrained(paths[key])
    return paths
