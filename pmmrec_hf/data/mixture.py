"""Pre-training on several platforms at once: prepared datasets mixed through ``datasets``.

    mixture = mix_prepared(["data/ml-1m", "data/amazon-beauty", "data/hm"], sampling="temperature")
    mixture.items, mixture.train, mixture.validation   # one item table, mixed training rows, every platform's users

Item and user ids are prefixed with the platform's name (``"<name>:<id>"``), so ids of different platforms
never collide (the integer ids of the collator are rows of the concatenated item table). Every row keeps its
platform index in ``platform``.

Sampling policy (which platform the next training row comes from), with n_k the training users of platform k:

- ``"proportional"`` (default): every training row once per epoch, shuffled together: a platform is drawn with
  probability n_k / sum n (``datasets.concatenate_datasets``);
- ``"uniform"``: each platform with probability 1/K;
- ``"temperature"``: probability proportional to n_k ** (1 / T) (T = 1 proportional, T -> infinity uniform).

``uniform`` and ``temperature`` use ``datasets.interleave_datasets`` with those probabilities and
``stopping_strategy="all_exhausted"``: an epoch ends when every platform's rows were drawn at least once, the
smaller platforms' rows being drawn again meanwhile (over-sampling). Streaming splits are interleaved the same
way (rows stream in, nothing is materialised).

Batches: mixed (rows of any platform side by side; in-batch negatives come from every platform), or
``per_platform`` (:class:`PlatformBatchSampler`: every batch holds one platform's users, and the
``num_processes`` batches of one optimiser step all come from the same platform, so in-batch negatives,
gathered across processes too, are always items of the user's own platform).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["SAMPLING_POLICIES", "DatasetMixture", "PlatformBatchSampler", "mix_prepared", "platform_probabilities"]

SAMPLING_POLICIES = ("proportional", "uniform", "temperature")
SEPARATOR = ":"


def platform_probabilities(sizes: Sequence[int], sampling: str = "proportional", temperature: float = 2.0) -> list[float]:
    """The probability of drawing each platform's rows (see the module docstring)."""
    if sampling not in SAMPLING_POLICIES:
        raise ValueError(f"`sampling` (--mixture-sampling) must be one of {SAMPLING_POLICIES}, got {sampling!r}.")
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"every platform needs training rows, got sizes {list(sizes)}.")
    if sampling == "uniform":
        weights = [1.0] * len(sizes)
    elif sampling == "temperature":
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"`temperature` (--mixture-temperature) must be positive, got {temperature!r}.")
        weights = [n ** (1.0 / temperature) for n in sizes]
    else:
        weights = [float(n) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass
class DatasetMixture:
    """Several prepared datasets as one: `items` (the concatenated item table, prefixed ids), `train` (the mixed
    training rows), `validation` / `test` (every platform's rows, prefixed), per-platform `names`, `sizes`
    (training rows), `probabilities`, and `item_platform` (the platform index of every item row)."""

    names: list[str]
    items: Any
    train: Any
    validation: Any
    test: Any
    sizes: list[int]
    probabilities: list[float]
    sampling: str
    item_platform: list[int] = field(default_factory=list)
    row_platform: list[int] | None = None  # platform of each training row (map-style)

    def describe(self) -> str:
        parts = [f"{n} ({s:,} users, p={p:.3f})" for n, s, p in zip(self.names, self.sizes, self.probabilities)]
        return f"{len(self.names)} platforms, {self.sampling} sampling: " + ", ".join(parts)


def _platform_names(folders: Sequence[str | os.PathLike]) -> list[str]:
    """Each dataset's name from its metadata; where two share a name, their folder names; then "-2", "-3"."""
    from .format import read_metadata

    def clean(name) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "dataset"

    stored = []
    for folder in folders:
        try:
            stored.append(clean(read_metadata(folder).get("name") or Path(str(folder)).name))
        except Exception:  # noqa: BLE001 - no readable metadata: the last part of the path
            stored.append(clean(Path(str(folder)).name))
    counts = {name: stored.count(name) for name in stored}
    names, taken = [], set()
    for folder, name in zip(folders, stored):
        name = clean(Path(str(folder)).name) if counts[name] > 1 else name
        base, suffix = name, 2
        while name in taken:
            name, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(name)
        names.append(name)
    return names


def _prefixed(dataset, name: str, platform: int):
    def prefix(row):
        return {"user_id": f"{name}{SEPARATOR}{row['user_id']}",
                "item_ids": [f"{name}{SEPARATOR}{i}" for i in row["item_ids"]], "platform": platform}

    return dataset.map(prefix)


def mix_prepared(
    folders: Sequence[str | os.PathLike],
    sampling: str = "proportional",
    temperature: float = 2.0,
    seed: int = 0,
    streaming: bool = False,
    names: Sequence[str] | None = None,
) -> DatasetMixture:
    """Load several prepared folders (or Hub dataset ids) as one :class:`DatasetMixture`. A platform's name (the
    id prefix) is its dataset's metadata name, or its folder's name where two datasets share one (`names`
    overrides both)."""
    from datasets import concatenate_datasets, interleave_datasets

    from .format import load_items, load_prepared

    if len(folders) < 1:
        raise ValueError("give at least one prepared dataset")
    platform_names = list(names) if names is not None else _platform_names(folders)
    if len(set(platform_names)) != len(platform_names) or len(platform_names) != len(folders):
        raise ValueError(f"platform names must be distinct, one per dataset: {platform_names}")
    items, item_platform, trains, validations, tests, sizes = [], [], [], [], [], []
    for index, (folder, name) in enumerate(zip(folders, platform_names)):
        table, _ = load_items(folder, decode_images=False)
        table = table.map(lambda row, name=name: {"item_id": f"{name}{SEPARATOR}{row['item_id']}"})
        items.append(table)
        item_platform += [index] * len(table)
        splits = load_prepared(folder)
        sizes.append(len(splits["train"]))
        train = load_prepared(folder, streaming=True, split="train") if streaming else splits["train"]
        trains.append(_prefixed(train, name, index))
        validations.append(_prefixed(splits["validation"], name, index))
        tests.append(_prefixed(splits["test"], name, index))
    probabilities = platform_probabilities(sizes, sampling, temperature)
    if len(trains) == 1:
        train = trains[0]
    elif sampling == "proportional" and not streaming:
        train = concatenate_datasets(trains)
    else:
        train = interleave_datasets(trains, probabilities=probabilities, seed=seed,
                                    stopping_strategy="all_exhausted")
    row_platform = None if streaming else list(train["platform"])
    return DatasetMixture(
        names=platform_names, items=concatenate_datasets(items), train=train,
        validation=concatenate_datasets(validations), test=concatenate_datasets(tests), sizes=sizes,
        probabilities=probabilities, sampling=sampling, item_platform=item_platform, row_platform=row_platform,
    )


class PlatformBatchSampler(torch.utils.data.Sampler):
    """Batches of one platform each, for map-style mixed rows (``row_platform[i]`` = platform of row i).

    Per epoch (``generator`` seeded by the training loop): each platform's rows are shuffled and cut into
    batches of `batch_size` (the last one may be short); the batches are grouped in runs of `group`
    (``num_processes``: the batches of one optimiser step; a platform's last run is completed with its first
    batches again, as Accelerate's ``even_batches`` does), and the runs are drawn platform by platform with
    `probabilities` until every platform's runs are used. With accelerate, process r takes batch r of each run,
    so all processes of a step hold users of one platform.
    """

    def __init__(self, row_platform: Sequence[int], batch_size: int, probabilities: Sequence[float] | None = None,
                 generator: torch.Generator | None = None, group: int = 1):
        self.row_platform = list(row_platform)
        self.batch_size = batch_size
        self.group = max(int(group), 1)
        platforms = sorted(set(self.row_platform))
        self.platforms = platforms
        self.probabilities = list(probabilities) if probabilities is not None else [1.0] * (max(platforms) + 1)
        self.generator = generator

    def _rows_by_platform(self) -> dict[int, list[int]]:
        rows: dict[int, list[int]] = {}
        for index, platform in enumerate(self.row_platform):
            rows.setdefault(platform, []).append(index)
        return rows

    def __iter__(self):
        g = self.generator
        runs: dict[int, list[list[int]]] = {}
        for platform, rows in self._rows_by_platform().items():
            order = torch.randperm(len(rows), generator=g).tolist()
            batches = [[rows[i] for i in order[s : s + self.batch_size]] for s in range(0, len(rows), self.batch_size)]
            padded = batches + [batches[i % len(batches)] for i in range(-len(batches) % self.group)]
            runs[platform] = [padded[s : s + self.group] for s in range(0, len(padded), self.group)]
        while any(runs.values()):
            alive = [p for p in self.platforms if runs.get(p)]
            weights = torch.tensor([self.probabilities[p] for p in alive], dtype=torch.float64)
            pick = alive[int(torch.multinomial(weights, 1, generator=g))]
            yield from runs[pick].pop(0)

    def __len__(self) -> int:
        return sum(math.ceil(math.ceil(len(rows) / self.batch_size) / self.group) * self.group
                   for rows in self._rows_by_platform().values())
