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

from .atomic_io import write_text_atomic
from .data.corruption import corrupt_sequences
from .distributed import map_batches
from .metrics import DEFAULT_KS, evaluate_full_ranking, ranking_metrics_from_ranks, target_ranks

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


@dataclass
class TrainingConfig:
    """Settings of a training run (every example script argument that is not about the model or data)."""

    output_dir: str = "outputs/pretrain"
    batch_size: int = 64  # users per process per micro-step
    eval_batch_size: int = 256
    gradient_accumulation_steps: int | None = None  # None: Accelerate's (launcher / `accelerate config`), else 1
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
    mixed_precision: str | None = None  # None: Accelerate's (launcher / `accelerate config`), else "no"
    report_to: str = "tensorboard"  # "none" to disable
    num_workers: int = 0
    ks: tuple[int, ...] = DEFAULT_KS
    catalogue_batch_size: int = 256
    repeated_targets: str = "rank"  # evaluation: a target also in the history is ranked ("rank") or a miss ("miss")
    resume_from_checkpoint: str | None = None
    max_grad_norm: float | None = None
    replace_prob: float = 0.0
    shuffle_prob: float = 0.0
    streaming_buffer_size: int = 1000
    stop_after_steps: int | None = None  # stop (as if killed) after this many steps: for resume tests
    save_total_limit: int | None = None  # keep at most this many checkpoints (the best one is always kept)
    metric_for_best_model: str | None = None  # e.g. "ndcg@10": track the best evaluation, checkpoint it
    greater_is_better: bool = True
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    early_stopping_threshold: float = 0.0  # an improvement must exceed this
    load_best_model_at_end: bool = False  # the final model is the best one (needs metric_for_best_model)
    on_non_finite: str = "raise"  # a non-finite loss or gradient: stop ("raise") or skip the step, counted ("skip")

    def validate(self, has_eval_rows: bool = True) -> None:
        """Refuse combinations that cannot work, naming the option."""
        if self.save_total_limit is not None and (not isinstance(self.save_total_limit, int) or self.save_total_limit < 1):
            raise ValueError(f"`save_total_limit` must be a positive integer or None, got {self.save_total_limit!r}.")
        if self.early_stopping_patience is not None and (
            not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 1
        ):
            raise ValueError(
                f"`early_stopping_patience` must be a positive integer or None, got {self.early_stopping_patience!r}."
            )
        for name in ("early_stopping_patience", "load_best_model_at_end"):
            if getattr(self, name) and not self.metric_for_best_model:
                raise ValueError(f"`{name}` needs `metric_for_best_model` (e.g. 'ndcg@10').")
        if self.metric_for_best_model and not has_eval_rows:
            raise ValueError("`metric_for_best_model` needs evaluation rows (`eval_rows`) to evaluate on.")
        if self.metric_for_best_model and self.early_stopping_patience and not self.eval_steps:
            raise ValueError("`early_stopping_patience` needs periodic evaluation: set `eval_steps` > 0.")
        if self.on_non_finite not in ("raise", "skip"):
            raise ValueError(f"`on_non_finite` must be 'raise' or 'skip', got {self.on_non_finite!r}.")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ValueError(f"`gradient_accumulation_steps` must be >= 1, got {self.gradient_accumulation_steps!r}.")


def make_accelerator(config: TrainingConfig, **kwargs):
    """The Accelerator of a training run: the launcher's (or `accelerate config`'s) settings unless `config`
    sets them (`mixed_precision`: ``accelerate launch --mixed_precision``; `gradient_accumulation_steps`:
    ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``; None leaves them to Accelerate, whose own default is no / 1).

    Processes started by a launcher on a machine without an accelerator device (``accelerate launch
    --multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N`` on CPUs) join one gloo process group
    instead of running as N independent single-process jobs. Raises when the launcher started N processes
    but they did not join one group."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if "WORLD_SIZE" not in os.environ and os.environ.get("MASTER_ADDR") and \
            os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        logger.warning(
            "`accelerate launch --cpu --num_processes N` starts ONE process (Accelerate's CPU launcher needs MPI for "
            "more): this run is single-process. For N CPU processes use `accelerate launch --multi_gpu "
            "--num_processes N` or `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N`."
        )
    if world > 1 and "cpu" not in kwargs and not _has_accelerator_device():
        kwargs["cpu"] = True
    if config.gradient_accumulation_steps is not None and "gradient_accumulation_plugin" not in kwargs:
        # given: it wins over ACCELERATE_GRADIENT_ACCUMULATION_STEPS (a plain count of 1 would not)
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=config.gradient_accumulation_steps)
    log_with = None if config.report_to in ("none", "", None) else config.report_to
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=log_with,
        project_dir=config.output_dir,
        **kwargs,
    )
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"The launcher started {world} processes (WORLD_SIZE), but Accelerate runs {accelerator.num_processes}: "
            "they would train independently. On CPUs launch with `accelerate launch --multi_gpu --num_processes N` "
            "or `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N` (`accelerate launch --cpu` starts one process)."
        )
    return accelerator


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


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
                     feature_cache=None, accelerator=None) -> torch.Tensor:
    """(I, d) embeddings of every item of the collator's item table, in integer-id order, in batches.

    With a `feature_cache` (``pmmrec_hf.feature_cache.FeatureCache`` holding every item of the table), the
    items' frozen tower features are looked up instead of running the towers' frozen part on raw inputs
    (the collator's item contents are not used then: a ``modality="ids"`` collator will do).
    With an `accelerator` of N processes, each process embeds its share of the batches (batch k on process
    k % N) and the shares are gathered: every process returns the whole matrix, equal to the one process
    result (``pmmrec_hf.distributed``)."""
    if hasattr(model, "all_item_embeddings"):  # ID baseline
        return model.all_item_embeddings()
    table = collator.items
    encoder = collator.encoder
    device = device or (accelerator.device if accelerator is not None else next(model.parameters()).device)

    def embed(rows: range) -> torch.Tensor:
        indices = list(rows)
        if feature_cache is not None:
            inputs = feature_cache.lookup(torch.tensor(indices), device=device)
            return model.encode_items(**inputs).float()
        texts = table.get_texts(indices) if encoder.uses_text else None
        images = table.get_images(indices) if encoder.uses_images else None
        inputs = encoder(texts, images, item_ids=[table.item_ids[i] for i in indices])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        return model.encode_items(**inputs).float()

    width = _embedding_width(model)
    return map_batches(embed, len(table), batch_size, accelerator, empty=(width,) if width else None, device=device)


def _embedding_width(model) -> int | None:
    config = getattr(model, "config", None)
    item_config = getattr(config, "item_encoder_config", None)
    return getattr(item_config, "hidden_size", None) or getattr(config, "hidden_size", None)


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
    repeated_targets: str = "rank",
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K of `model` on validation/test rows (the last item of a row is the target).

    `repeated_targets`: a target that is also in the user's history is ranked (``"rank"``, the default) or
    counted as a miss (``"miss"``, the research code's protocol); see ``pmmrec_hf.metrics.target_ranks``.

    The catalogue is embedded once (in batches), each user is scored against every item with the history
    masked (``pmmrec_hf.metrics``). With a `feature_cache`, the catalogue is embedded from cached frozen tower
    features (see `encode_catalogue`). With an `accelerator` of N processes, each process embeds its share of
    the catalogue and ranks its share of the users (batch k of `batch_size` users on process k % N) against
    the gathered catalogue; the ranks are gathered back in row order, so every process returns exactly the
    single-process metrics.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    if item_embeddings is None:
        item_embeddings = encode_catalogue(model, collator, catalogue_batch_size, device, feature_cache=feature_cache,
                                           accelerator=accelerator)
    item_embeddings = item_embeddings.to(device)
    max_length = collator.max_length
    rows = list(rows)

    def rank(batch: range) -> torch.Tensor:
        tensors = sequences_to_tensors(rows[batch.start : batch.stop], collator.items, max_length)
        users = model.encode_users(item_embeddings, tensors["inputs"].to(device)).user_embeddings
        return target_ranks(users.float(), item_embeddings, tensors["targets"].to(device),
                            tensors["history"].to(device), repeated_targets=repeated_targets)

    ranks = map_batches(rank, len(rows), batch_size, accelerator, empty=(), dtype=torch.long, device=device)
    model.train(was_training)
    return ranking_metrics_from_ranks(ranks.cpu(), ks=ks)


def popularity_metrics(train_counts: Sequence[int], rows: Iterable[Any], item_table, ks=DEFAULT_KS,
                       repeated_targets: str = "rank") -> dict[str, float]:
    """The most-popular baseline under the same protocol: score = train count, history masked."""
    counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
    rows = list(rows)
    tensors = sequences_to_tensors(rows, item_table, max_length=1)
    users = torch.ones(len(rows), 1, dtype=torch.float64)
    return evaluate_full_ranking(users, counts[:, None], tensors["targets"], tensors["history"], ks=ks,
                                 repeated_targets=repeated_targets)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def _epoch_loader(dataset, collator, config: TrainingConfig, generator: torch.Generator, batch_sampler=None):
    from torch.utils.data import DataLoader, RandomSampler

    if batch_sampler is not None:  # e.g. PlatformBatchSampler: it draws from the loop's (per-epoch seeded) generator
        batch_sampler.generator = generator
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collator, num_workers=config.num_workers)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        collate_fn=collator,
        num_workers=config.num_workers,
        drop_last=False,
    )


def _corrupt(batch: dict, config: TrainingConfig, step: int, accelerator) -> dict:
    """Add NID/RCL corruption to a batch: ``corrupted_item_ids`` and ``noise_labels`` (B, L).

    The corruption is drawn for the *global* batch, the users of every process in process order, with the
    replacement items drawn from the distinct items of every process's batch, by a generator seeded with
    ``(seed, step)``. N processes x B users therefore corrupt every user exactly as 1 process x N*B users
    does. Only item ids cross processes (one small gather); a replacement that lives on another process is
    looked up by the model in the gathered candidate pool."""
    if config.replace_prob <= 0 and config.shuffle_prob <= 0:
        return batch
    index, item_ids = batch["item_index"][:, :-1], batch["item_ids"]
    sequence_ids = torch.where(index >= 0, item_ids[index.clamp(min=0)], torch.full_like(index, -1))  # (B, L)
    users, pool_ids, offset = sequence_ids, item_ids, 0
    if accelerator.num_processes > 1:
        counts = accelerator.gather(torch.tensor([index.shape[0]], device=index.device)).tolist()
        offset = sum(counts[: accelerator.process_index])
        # rows of padding are marked -2 (a real row holds ids >= 0 and -1 only)
        rows = accelerator.gather(accelerator.pad_across_processes(sequence_ids, dim=0, pad_index=-2))
        users = rows[(rows != -2).all(1)]  # (B_total, L), process order
        pool_ids = accelerator.gather(accelerator.pad_across_processes(item_ids, dim=0, pad_index=-1))
        pool_ids = pool_ids[pool_ids >= 0]
    users, pool_ids = users.cpu(), pool_ids.cpu()
    distinct = torch.unique(pool_ids)  # (G,) sorted: the same list on every process and with one process
    positions = torch.searchsorted(distinct, users.clamp(min=0))
    global_index = torch.where(users >= 0, positions, torch.full_like(users, -1))  # (B_total, L) into `distinct`
    generator = torch.Generator().manual_seed(hash((config.seed, step)) & 0x7FFF_FFFF)
    corrupted, labels = corrupt_sequences(global_index, int(distinct.numel()), config.replace_prob,
                                          config.shuffle_prob, generator=generator)
    mine = slice(offset, offset + index.shape[0])
    corrupted, labels = corrupted[mine], labels[mine]
    corrupted_ids = torch.where(corrupted >= 0, distinct[corrupted.clamp(min=0)], torch.full_like(corrupted, -1))
    device = index.device
    batch["corrupted_item_ids"], batch["noise_labels"] = corrupted_ids.to(device), labels.to(device)
    return batch


_RAW_ITEM_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def _with_cached_features(batch: dict, feature_cache) -> dict:
    """The batch with its raw item inputs replaced by the cached frozen features of its `item_ids`."""
    device = batch["item_ids"].device
    out = {k: v for k, v in batch.items() if k not in _RAW_ITEM_INPUTS}
    out.update(feature_cache.lookup(batch["item_ids"], device=device))
    return out


def _checkpoint_steps(output_dir: str) -> tuple[list[int], list[str]]:
    """Steps of the complete checkpoints under ``<output_dir>/checkpoints`` (``step_<N>`` holding the
    completeness marker of an atomic write, and trainer_state.json), ascending, and the names of everything
    else there (with why each is not a checkpoint)."""
    from .atomic_io import incomplete_reason

    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return [], []
    steps, others = [], []
    for path in folder.iterdir():
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if not (path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and path.is_dir()):
            others.append(f"{path.name} (not a step_<N> folder)")
            continue
        reason = incomplete_reason(path)
        if reason is None and not (path / TRAINER_STATE).is_file():
            reason = f"it has no {TRAINER_STATE}"
        if reason is not None:
            others.append(f"{path.name} ({reason})")
        else:
            steps.append(int(suffix))
    return sorted(steps), sorted(others)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint; folders that are not one (an interrupted save: no completeness
    marker; or a name that is not step_<N>) are skipped with a warning naming them."""
    steps, skipped = _checkpoint_steps(output_dir)
    if skipped:
        logger.warning("Resuming from the newest complete checkpoint; skipped in %s (incomplete or not a "
                       "checkpoint): %s", Path(output_dir) / "checkpoints", ", ".join(skipped))
    return _checkpoint_path(output_dir, steps[-1]) if steps else None


TRAINER_STATE = "trainer_state.json"
LOSS_NAMES = ("loss", "next_item_loss", "nicl_loss", "nid_loss", "rcl_loss")


@dataclass
class _RunState:
    """What a checkpoint's trainer_state.json holds besides Accelerate's state."""

    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    evaluations_without_improvement: int = 0
    eval_history: list | None = None
    log_history: list | None = None
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite loss or gradient (on_non_finite="skip")

    def improved(self, value: float, config: TrainingConfig) -> bool:
        if self.best_metric is None:
            return True
        if config.greater_is_better:
            return value > self.best_metric + config.early_stopping_threshold
        return value < self.best_metric - config.early_stopping_threshold


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
    batch_sampler=None,
) -> dict[str, Any]:
    """Train `model` on `train_dataset` rows with Accelerate; evaluate on `eval_rows`; checkpoint and resume.

    `train_dataset` is a map-style dataset (``datasets.Dataset`` or a list of rows) or an iterable/streaming
    one (already sharded for this process: see ``pmmrec_hf.data.shard_for_process``).
    `save_fn(unwrapped_model, output_dir)` writes the final model (defaults to ``save_pretrained``).
    `feature_cache`: a ``FeatureCache`` holding every item's frozen tower features; each batch's raw item
    inputs (input_ids / attention_mask / pixel_values) are then replaced by ``feature_cache.lookup(item_ids)``
    before the forward pass, and evaluation embeds the catalogue from it, so the towers' frozen blocks are
    never recomputed (a ``modality="ids"`` collator avoids tokenising and decoding images at all).
    `batch_sampler`: a batch sampler over a map-style `train_dataset` instead of shuffled batches of
    `config.batch_size` (e.g. ``pmmrec_hf.data.PlatformBatchSampler``, one platform per step); its
    ``generator`` is set to the loop's, seeded ``seed + epoch`` every epoch.
    `on_evaluate(step, metrics, model, item_embeddings)`: called on every process after each evaluation of
    `eval_rows`, with the unwrapped model in eval mode and the catalogue embeddings the metrics were computed
    from (e.g. to keep the best checkpoint, or to score a second split at the same step without embedding the
    catalogue again: ``evaluate_model(model, collator, test_rows, item_embeddings=item_embeddings)``, as the
    transfer benchmark does for its epochs grid); returning True stops training after this evaluation (the same
    on every process: decide from the metrics, which every process shares).

    Under N processes (``accelerate launch``), each process takes `config.batch_size` users per micro-step;
    the losses, gradients, learning rates and weights are those of one process with N x batch_size users
    (in-batch negatives and corruption are drawn over the global batch, the learning-rate schedule follows
    optimiser steps). Every trainable parameter must receive a gradient (DistributedDataParallel requires
    it; the models freeze what their objectives do not use): the first step checks it and names offenders.
    With `metric_for_best_model`, every evaluation that improves it is checkpointed and never rotated away
    by `save_total_limit`; `early_stopping_patience` stops after that many evaluations without improvement;
    `load_best_model_at_end` makes the final model the best one.

    Returns a summary: steps, final losses (means over every process), `log_history` (one entry per logging
    step: the losses and the learning rates used at that step), the evaluation history, the best metric and
    step, whether it stopped early, `train_seconds` (the training loop's wall time without evaluation) and
    `eval_seconds`.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    config.validate(has_eval_rows=eval_rows is not None)
    if accelerator is None:
        accelerator = make_accelerator(config)
    accumulation = accelerator.gradient_accumulation_steps
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    streaming = not hasattr(train_dataset, "__len__")
    if streaming and config.num_epochs is not None:
        raise ValueError("`num_epochs` needs a dataset of known length; give `max_steps` for streaming data.")
    steps_per_epoch = None
    if batch_sampler is not None and streaming:
        raise ValueError("`batch_sampler` needs a map-style training dataset (not a streaming one).")
    if not streaming:
        batches = len(batch_sampler) if batch_sampler is not None else math.ceil(len(train_dataset) / config.batch_size)
        per_process = math.ceil(batches / accelerator.num_processes)
        steps_per_epoch = max(per_process // accumulation, 1)
    max_steps = config.max_steps if config.num_epochs is None else config.num_epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=max_steps)
    # the scheduler is not prepared: Accelerate would step it once per process per call (N times too fast);
    # it is stepped here once per optimiser step, and saved with the checkpoints
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.is_main_process and accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers("pmmrec", config={k: v for k, v in asdict(config).items()
                                                    if isinstance(v, (int, float, str, bool))})

    generator = torch.Generator()
    loader = None
    if not streaming:
        loader = accelerator.prepare(_epoch_loader(train_dataset, collator, config, generator, batch_sampler))

    state = _RunState(eval_history=[], log_history=[])
    resume = config.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(config.output_dir)
        if resume is None:  # never a silent start from step 0
            raise FileNotFoundError(
                f"--resume-from-checkpoint latest: no complete checkpoint under {output_dir / 'checkpoints'}. "
                "Checkpoints are written every --save-steps N steps (save_steps; the default 0 writes none). "
                "Start without --resume-from-checkpoint, or give a checkpoint folder.")
    if resume:
        from .atomic_io import incomplete_reason

        reason = incomplete_reason(resume) if Path(resume).is_dir() else "it does not exist"
        if reason is not None:
            raise ValueError(f"--resume-from-checkpoint {resume} is not a complete checkpoint: {reason}. Give a "
                             "complete step_<N> folder, or `latest` for the newest complete one.")
        accelerator.load_state(resume)
        saved = json.loads((Path(resume) / TRAINER_STATE).read_text())
        state = _RunState(**{k: v for k, v in saved.items() if k in _RunState.__dataclass_fields__})
        state.eval_history = state.eval_history or []
        state.log_history = state.log_history or []
        logger.info("Resumed from %s at step %d", resume, state.global_step)
    start_step = state.global_step

    unwrapped = accelerator.unwrap_model(model)
    history = state.eval_history
    progress = tqdm(total=max_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)
    step, micro = start_step, 0
    last_logs: dict[str, float] = {}
    running: dict[str, list[float]] = {}
    checked_gradients = False
    non_finite_reason: str | None = None  # why the current optimiser step is skipped (on_non_finite="skip")

    def batches():
        epoch = 0 if streaming else step // steps_per_epoch
        while True:
            if streaming:
                if hasattr(train_dataset, "set_epoch"):
                    train_dataset.set_epoch(epoch)
                from torch.utils.data import DataLoader

                iterator = iter(DataLoader(train_dataset, batch_size=config.batch_size, collate_fn=collator,
                                           num_workers=config.num_workers))
                skip = step * accumulation if epoch == 0 else 0
                for _ in range(skip):
                    next(iterator, None)
            else:
                generator.manual_seed(config.seed + epoch)
                skip = (step - epoch * steps_per_epoch) * accumulation
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
    early_stopped = False

    def save_checkpoint() -> str:
        path = _save_checkpoint(accelerator, config.output_dir, step, state)
        _rotate_checkpoints(accelerator, config, state)
        return path

    def evaluate_now() -> dict[str, float]:
        nonlocal early_stopped
        eval_start = time.perf_counter()
        was_training = unwrapped.training
        unwrapped.eval()
        catalogue = encode_catalogue(unwrapped, collator, config.catalogue_batch_size, accelerator.device,
                                     feature_cache=feature_cache, accelerator=accelerator)
        metrics = evaluate_model(unwrapped, collator, eval_rows, ks=config.ks, batch_size=config.eval_batch_size,
                                 accelerator=accelerator, item_embeddings=catalogue,
                                 repeated_targets=config.repeated_targets)
        history.append({"step": step, **metrics})
        if on_evaluate is not None and on_evaluate(step, metrics, unwrapped, catalogue) is True:
            early_stopped = True  # the callback asked to stop (as a transformers callback's should_training_stop)
        unwrapped.train(was_training)
        timing["eval_seconds"] += time.perf_counter() - eval_start
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "num_users"}, step=step)
        if accelerator.is_main_process:
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                          if k in (f"hr@{config.ks[0]}", f"ndcg@{config.ks[0]}")))
        name = config.metric_for_best_model
        if name:
            if name not in metrics:
                raise ValueError(f"`metric_for_best_model` {name!r} is not an evaluation metric; the metrics are "
                                 f"{sorted(k for k in metrics if k != 'num_users')}.")
            if state.improved(metrics[name], config):
                state.best_metric, state.best_step, state.evaluations_without_improvement = metrics[name], step, 0
                state.best_checkpoint = _checkpoint_path(config.output_dir, step)
                save_checkpoint()
            else:
                state.evaluations_without_improvement += 1
                if config.early_stopping_patience and \
                        state.evaluations_without_improvement >= config.early_stopping_patience:
                    early_stopped = True
        return metrics

    loop_start = time.perf_counter()
    if eval_rows is not None and start_step == 0:
        evaluate_now()
    model.train()
    stream = batches()
    evaluated_at = None
    while step < max_steps and not early_stopped:
        batch = next(stream)
        batch = _corrupt(batch, config, step * accumulation + micro, accelerator)
        if feature_cache is not None:
            batch = _with_cached_features(batch, feature_cache)
        learning_rates = [group["lr"] for group in optimizer.param_groups]
        with accelerator.accumulate(model):
            outputs = model(**batch)
            values = _loss_values(outputs)  # one host read of the losses, for the check and the logs
            # the decision is the same on every process (one flag reduced), so no process waits for another
            loss_finite = _finite_on_every_process(math.isfinite(values.get("loss", 0.0)), accelerator)
            if not loss_finite:
                if config.on_non_finite == "raise":
                    _check_finite_loss(values, step + 1, elsewhere=True)
                non_finite_reason = non_finite_reason or "the loss is not finite" + (
                    f" ({_format_losses(values)})" if not math.isfinite(values.get("loss", 0.0)) else
                    " on another process")
            else:
                accelerator.backward(outputs.loss)
                if not checked_gradients:
                    _check_every_trainable_parameter_has_a_gradient(model, accelerator)
                    checked_gradients = True
            if accelerator.sync_gradients and non_finite_reason is None and accelerator.scaler is None:
                # (an fp16 grad scaler skips steps with non-finite gradients itself: optimizer.step_was_skipped)
                bad = _non_finite_gradients(model)
                if not _finite_on_every_process(not bad, accelerator):
                    if config.on_non_finite == "raise":
                        raise FloatingPointError(
                            f"Training diverged: non-finite gradient at step {step + 1} in "
                            f"{_shown(bad) if bad else 'the parameters of another process'} (losses: "
                            f"{_format_losses(values)}). Lower the learning rate (or set --max-grad-norm), check "
                            "the inputs for NaN/inf, or pass on_non_finite='skip' (--on-non-finite skip) to skip "
                            "such steps.")
                    non_finite_reason = f"non-finite gradient in {_shown(bad) if bad else 'another process'}"
            if non_finite_reason is None:
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
            elif accelerator.sync_gradients:
                optimizer.zero_grad()  # the skipped step's gradients (micro-steps accumulated so far included)
            if non_finite_reason is None:
                optimizer.zero_grad()
        if non_finite_reason is None:
            for name, value in values.items():
                running.setdefault(name, []).append(value)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        if non_finite_reason is not None:  # skipped (on_non_finite="skip"): no optimiser or scheduler step
            state.skipped_steps += 1
            logger.warning("Skipped step %d (%s); %d step(s) skipped so far.", step + 1, non_finite_reason,
                           state.skipped_steps)
            non_finite_reason = None
        elif not optimizer.step_was_skipped:  # fp16 overflow: no optimiser step, no scheduler step
            scheduler.step()
        micro = 0
        step += 1
        state.global_step = step
        progress.update(1)
        if step % config.logging_steps == 0 or step == max_steps:
            last_logs = _mean_over_processes(running, accelerator)
            running = {}
            entry = {"step": step, **last_logs, "learning_rate": learning_rates[-1]}
            if len(learning_rates) > 1:
                entry["tower_learning_rate"] = learning_rates[0]
            state.log_history.append(entry)
            progress.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in last_logs.items()})
            accelerator.log({f"train/{k}": v for k, v in last_logs.items()} | {"train/lr": learning_rates[-1]},
                            step=step)
        if eval_rows is not None and config.eval_steps and step % config.eval_steps == 0 and step < max_steps:
            evaluate_now()
            evaluated_at = step
        if config.save_steps and step % config.save_steps == 0 and state.best_step != step:
            save_checkpoint()
        if config.stop_after_steps is not None and step >= config.stop_after_steps:
            progress.close()
            accelerator.wait_for_everyone()
            finish_trackers(accelerator)
            return {"global_step": step, "stopped": True, "eval_history": history, "last_logs": last_logs,
                    "log_history": state.log_history, "skipped_steps": state.skipped_steps}
    progress.close()
    if eval_rows is not None and evaluated_at != step:
        evaluate_now()
    train_seconds = time.perf_counter() - loop_start - timing["eval_seconds"]
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    if config.load_best_model_at_end and state.best_checkpoint and state.best_step != step:
        _load_model_weights(final, state.best_checkpoint)
        logger.info("Loaded the best model (step %d, %s %.4f) from %s", state.best_step,
                    config.metric_for_best_model, state.best_metric, state.best_checkpoint)
    non_finite = non_finite_parameters(final)
    if non_finite:
        raise FloatingPointError(
            f"Training ended with non-finite weights in {len(non_finite)} tensor(s) ({', '.join(non_finite[:5])}): "
            f"not saving the model to {output_dir}."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (save_fn or _save_pretrained)(final, str(output_dir))
        write_text_atomic(output_dir / "eval_history.json", json.dumps(history, indent=2))
        run = {"num_processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision),
               "gradient_accumulation_steps": accumulation, "early_stopped": early_stopped}
        write_text_atomic(output_dir / TRAINER_STATE, json.dumps({**asdict(state), **run}, indent=2))
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    return {"global_step": step, "stopped": False, "early_stopped": early_stopped, "eval_history": history,
            "last_logs": last_logs, "log_history": state.log_history, "best_metric": state.best_metric,
            "best_step": state.best_step, "best_checkpoint": state.best_checkpoint,
            "skipped_steps": state.skipped_steps,
            "num_processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision),
            "train_seconds": train_seconds, "eval_seconds": timing["eval_seconds"],
            "collator_stats": dict(getattr(collator, "stats", {}))}


def finish_trackers(accelerator) -> None:
    """Close the run's trackers (TensorBoard, ...), flushing what they hold. Unlike
    ``Accelerator.end_training`` this keeps the process group: a script may train again (pre-train, then
    fine-tune) under the same launcher; the console scripts destroy it when they end
    (:func:`destroy_process_group`)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def destroy_process_group() -> None:
    """Leave the process group the launcher's processes joined, if any (the end of a multi-process script)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _loss_values(outputs) -> dict[str, float]:
    """The loss and each computed component as Python floats."""
    values = {}
    for name in LOSS_NAMES:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            values[name] = float(value.detach())
    return values


def _format_losses(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in values.items())


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_finite_loss(values: dict[str, float], step: int, elsewhere: bool = False) -> None:
    """Stop at the first non-finite loss, naming the step and the components (the loss is finite in a healthy
    run under every precision here: logits are fp32), instead of training on and saving NaN weights.
    `elsewhere`: another process's loss is not finite (so this one stops too)."""
    if "loss" in values and not math.isfinite(values["loss"]):
        parts = ", ".join(f"{name} {value:g}" for name, value in values.items() if name != "loss")
        raise FloatingPointError(
            f"Training diverged: the loss is {values['loss']:g} at step {step} ({parts}). Lower the learning rate "
            "(or set --max-grad-norm), and check the inputs for NaN/inf (pixel values, features)."
        )
    if elsewhere:
        raise FloatingPointError(f"Training diverged: the loss is not finite on another process at step {step} "
                                 f"(this process: {_format_losses(values)}).")


def _finite_on_every_process(local_ok: bool, accelerator) -> bool:
    """`local_ok` of every process combined (one all-reduce of a flag), so every process decides alike."""
    if accelerator.num_processes == 1:
        return local_ok
    flag = torch.tensor([0.0 if local_ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


def _non_finite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds NaN or inf (one max-norm over every gradient first)."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), ord=math.inf).float() for _, g in named])
    if bool(torch.isfinite(norms).all()):
        return []
    return [name.removeprefix("module.") for (name, _), norm in zip(named, norms.tolist()) if not math.isfinite(norm)]


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of `model` holding NaN or inf (buffers are not checked: some backbones keep
    -inf in them, e.g. attention masks)."""
    return [name for name, tensor in model.named_parameters() if not bool(torch.isfinite(tensor).all())]


def _mean_over_processes(running: dict[str, list[float]], accelerator) -> dict[str, float]:
    """Means of the logged losses since the last log, averaged over processes: each process's loss is its
    share of the global mean (``distributed_mean``), so the average over processes is the global loss."""
    names = sorted(running)
    if not names:
        return {}
    local = torch.tensor([sum(running[n]) / len(running[n]) for n in names], dtype=torch.float64,
                         device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local.float(), reduction="mean").double()
    return {name: float(value) for name, value in zip(names, local.tolist())}


def _check_every_trainable_parameter_has_a_gradient(model: nn.Module, accelerator) -> None:
    """After the first backward pass: every trainable parameter must have a gradient. Under several processes
    DistributedDataParallel would otherwise fail at the next step ("Expected to have finished reduction");
    with one process the parameter would silently never train."""
    missing = [name.removeprefix("module.") for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if not missing:
        return
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    message = (f"{len(missing)} trainable parameter(s) received no gradient in the first step: {shown}. Freeze "
               "what the objectives do not use (PMMRecModel.apply_freezing() after changing an objective weight) "
               "or set `requires_grad=False` on them.")
    if accelerator.num_processes > 1:
        raise RuntimeError(message)
    logger.warning(message)


def _checkpoint_path(output_dir: str, step: int) -> str:
    return str(Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}")


def _save_checkpoint(accelerator, output_dir: str, step: int, state: _RunState | None = None) -> str:
    """Accelerate's state (model, optimiser, scheduler, RNG) and trainer_state.json, written atomically
    (``pmmrec_hf.atomic_io``): every process writes into one temporary sibling folder, the main process
    writes trainer_state.json and the completeness marker last and renames the folder into place. A kill
    at any point leaves no ``step_<N>`` folder that is incomplete; `latest` picks only marked ones."""
    from .atomic_io import AtomicFolder

    path = _checkpoint_path(output_dir, step)
    writer = AtomicFolder(path)
    if accelerator.is_main_process:
        writer.begin()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(writer.path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = asdict(state) if state is not None else {"global_step": step}
        record["global_step"] = step
        (writer.path / TRAINER_STATE).write_text(json.dumps(record, indent=2))
        writer.commit()
    accelerator.wait_for_everyone()
    return path


def _rotate_checkpoints(accelerator, config: TrainingConfig, state: _RunState) -> None:
    """Delete the oldest checkpoints beyond `save_total_limit`, never the best one."""
    limit = config.save_total_limit
    if not limit:
        return
    if accelerator.is_main_process:
        import shutil

        steps, _ = _checkpoint_steps(config.output_dir)
        keep = set(steps[-limit:])
        if state.best_step is not None:
            keep.add(state.best_step)
        from .atomic_io import aside_path

        for old in steps:
            if old not in keep:  # renamed out of the step_<N> names first: a kill mid-delete leaves no half one
                path = _checkpoint_path(config.output_dir, old)
                os.replace(path, aside_path(path))
                shutil.rmtree(aside_path(path), ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_model_weights(model: nn.Module, checkpoint: str) -> None:
    from safetensors.torch import load_file

    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"The best checkpoint {checkpoint} has no model.safetensors.")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    if unexpected or any(k in parameters for k in missing):
        raise RuntimeError(f"The best checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}.")


def _save_pretrained(model, output_dir: str) -> None:
    model.save_pretrained(output_dir)


def save_pmmrec_outputs(model, output_dir: str, tokenizer=None, image_processor=None) -> dict[str, str]:
    """Save the full model, and the item encoder and the user encoder each on its own, with save_pretrained.

    Layout: ``<output_dir>/model``, ``<output_dir>/item_encoder``, ``<output_dir>/user_encoder``; the full model
    and the item encoder each get the item encoder's :class:`~pmmrec_hf.PMMRecProcessor` (the tokenizer, the
    image processor the encoder was trained with, lower-casing and the text length), loadable with
    ``AutoProcessor.from_pretrained``. A text model saved without a tokenizer gets no processor (a warning says so).
    Each folder is written atomically with its processor (``pmmrec_hf.atomic_io.InPlaceWrite``): a kill leaves it
    complete, in its previous version or its new one.
    """
    from .atomic_io import in_place_write, is_weights_file
    from .processing_pmmrec import PMMRecProcessor

    paths = {"model": os.path.join(output_dir, "model")}
    parts = {"model": model}
    if hasattr(model, "item_encoder"):
        paths["item_encoder"] = os.path.join(output_dir, "item_encoder")
        paths["user_encoder"] = os.path.join(output_dir, "user_encoder")
        parts["item_encoder"], parts["user_encoder"] = model.item_encoder, model.user_encoder
    item_config = getattr(getattr(model, "config", None), "item_encoder_config", None)
    processor = None
    if item_config is not None:
        if isinstance(tokenizer, PMMRecProcessor):
            processor = tokenizer
        elif tokenizer is not None or not item_config.uses_text:
            processor = PMMRecProcessor.from_item_config(item_config, tokenizer, _pmmrec_image_processor(image_processor))
        else:
            logger.warning("No tokenizer given: %s gets no processor (users must load the text backbone's tokenizer).",
                           output_dir)
    for key, part in parts.items():
        with in_place_write(paths[key], replaces=is_weights_file) as tmp:
            part.save_pretrained(str(tmp))
            if key in ("model", "item_encoder"):
                if processor is not None:
                    processor.save_pretrained(str(tmp))
                else:
                    for extra in (tokenizer, image_processor):
                        if extra is not None:
                            extra.save_pretrained(str(tmp))
    return paths


def _pmmrec_image_processor(image_processor):
    """The image processor to publish: ours (None: built from the config), or a foreign one, with a warning that it
    is not the transform the collator trained with unless the caller trained with it."""
    if image_processor is None or type(image_processor).__name__ == "PMMRecImageProcessor":
        return image_processor
    logger.warning("Saving a %s as the image processor: the model's processor will use it instead of the "
                   "PMMRecImageProcessor built from the config.", type(image_processor).__name__)
    return image_processor
