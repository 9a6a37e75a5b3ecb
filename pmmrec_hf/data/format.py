"""The prepared dataset folder: writing it, reading it, sharding it (see ``docs/formats.md``).

A prepared folder holds ``items.parquet`` (one row per item, the row number is the item's integer id),
one or more parquet files per split (``train``, ``validation``, ``test``; one row per user) and
``pmmrec_dataset.json`` (metadata and every count). A split with more than ``max_rows_per_file`` rows
is written as several files ``<split>-00000-of-0000N.parquet`` of nearly equal size, so that a
streaming dataset has N shards and ``datasets.distributed.split_dataset_by_node`` can hand whole shards
to each process. The metadata lists every file, in order.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

ITEMS_FILE = "items.parquet"
METADATA_FILE = "pmmrec_dataset.json"
CARD_FILE = "README.md"
SPLITS = ("train", "validation", "test")
FORMAT_NAME = "pmmrec_hf.prepared"
FORMAT_VERSION = 1
DEFAULT_MAX_ROWS_PER_FILE = 10_000
ITEMS_ROW_GROUP_SIZE = 256  # items are written (and their images read) this many at a time

__all__ = [
    "CARD_FILE",
    "DEFAULT_MAX_ROWS_PER_FILE",
    "ITEMS_FILE",
    "METADATA_FILE",
    "SPLITS",
    "check_output_folder",
    "is_prepared_folder",
    "item_features",
    "load_items",
    "load_prepared",
    "read_metadata",
    "save_prepared",
    "sequence_features",
    "shard_for_process",
    "subset_users",
]


def item_features():
    """The ``datasets.Features`` of ``items.parquet``."""
    from datasets import Features, Image, Value

    return Features(
        {"item_id": Value("string"), "text": Value("string"), "image": Image(), "train_count": Value("int64")}
    )


def sequence_features():
    """The ``datasets.Features`` of the split files."""
    from datasets import Features, List, Value

    return Features(
        {"user_id": Value("string"), "item_ids": List(Value("string")), "timestamps": List(Value("int64"))}
    )


# --------------------------------------------------------------------------------------------------
# writing


def _rows(table: Any, what: str) -> list[dict]:
    """A pandas DataFrame, a mapping of column lists or a sequence of row dicts, as a list of row dicts."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
        return table.to_dict("records")
    if isinstance(table, Mapping):
        columns = {k: list(v) for k, v in table.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"{what}: columns have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return [dict(r) for r in table]


def _encode_image(value: Any) -> dict | None:
    """An image value as the ``Image()`` storage struct {bytes, path}, bytes always embedded.

    Accepts None, raw encoded bytes, a file path (read now), a {bytes, path} dict, a PIL image or numpy
    array (encoded by ``datasets.Image``), or a zero-argument callable returning one of these (called at
    write time, so a large image set never has to be in memory at once).
    """
    if callable(value) and not hasattr(value, "save"):  # PIL images have .save and are not lazy loaders
        value = value()
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):  # a missing value in a pandas column
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return {"bytes": path.read_bytes(), "path": path.name}
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return {"bytes": bytes(value["bytes"]), "path": value.get("path")}
        if value.get("path") is not None:
            return _encode_image(value["path"])
        return None
    from datasets import Image

    encoded = Image().encode_example(value)
    if encoded.get("bytes") is None and encoded.get("path") is not None:
        return _encode_image(encoded["path"])
    return encoded


def _check_sequence_rows(split: str, rows: list[dict], known: set[str] | None) -> None:
    for i, row in enumerate(rows):
        for key in ("user_id", "item_ids", "timestamps"):
            if key not in row:
                raise ValueError(f"split {split!r} row {i}: missing field {key!r}")
        if len(row["item_ids"]) != len(row["timestamps"]):
            raise ValueError(
                f"split {split!r} row {i} (user {row['user_id']!r}): {len(row['item_ids'])} item_ids "
                f"but {len(row['timestamps'])} timestamps"
            )
        if known is not None:
            for item in row["item_ids"]:
                if item not in known:
                    raise ValueError(
                        f"split {split!r} row {i} (user {row['user_id']!r}): item {item!r} is not in the items"
                    )


def _file_names(split: str, num_rows: int, max_rows_per_file: int, num_shards: int | None) -> list[str]:
    n = num_shards if num_shards is not None else max(1, math.ceil(num_rows / max_rows_per_file))
    if n < 1:
        raise ValueError(f"num_shards must be >= 1, got {n}")
    if n == 1:
        return [f"{split}.parquet"]
    return [f"{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def _write_card(folder: Path, files: Mapping[str, list[str]], metadata: Mapping[str, Any]) -> None:
    """A minimal Hub dataset card whose ``configs`` make ``load_dataset(repo_id)`` and
    ``load_dataset(repo_id, "items")`` work without this package."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in SPLITS:
        if split in files:
            lines += [f"  - split: {split}", "    path:"] + [f"    - {f}" for f in files[split]]
    lines += ["- config_name: items", "  data_files:", "  - split: train", "    path:"]
    lines += [f"    - {f}" for f in files["items"]]
    lines += ["---", "", f"# {metadata.get('name') or 'PMMRec prepared dataset'}", ""]
    lines += [
        "A sequential-recommendation dataset in the `pmmrec_hf` prepared format (see `docs/formats.md` of",
        "`pmmrec_hf`): `items` has one row per item (`item_id`, `text`, `image`, `train_count`), the row",
        "number being the item's integer id; each split has one row per user (`user_id`, `item_ids`,",
        "`timestamps`, time-ordered, leave-one-out). Read it with `pmmrec_hf.data.load_prepared` and",
        "`pmmrec_hf.data.load_items`. Counts are in `pmmrec_dataset.json`.",
        "",
    ]
    counts = metadata.get("counts") or {}
    if counts:
        lines += ["| count | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()] + [""]
    (folder / CARD_FILE).write_text("\n".join(lines), encoding="utf-8")


def _is_dataset_file(name: str) -> bool:
    """A file (path relative to the folder) that a prepared dataset writes: replaced, never carried over."""
    from ..atomic_io import MARKER

    if name in (ITEMS_FILE, METADATA_FILE, CARD_FILE, MARKER):
        return True
    return "/" not in name and name.endswith(".parquet") and any(
        name.startswith(f"{s}.") or name.startswith(f"{s}-") for s in SPLITS)


def is_prepared_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a prepared dataset's metadata (complete or not)."""
    try:
        meta = json.loads((Path(folder) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def check_output_folder(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to write a prepared dataset over a file, or into a non-empty folder that is not a prepared
    dataset unless `overwrite`; the error names the folder and the option."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file, not a folder: choose a folder to write the dataset to.")
    if not folder.is_dir() or not any(folder.iterdir()) or is_prepared_folder(folder):
        return
    if overwrite:
        import logging

        logging.getLogger(__name__).warning(
            "%s is not a prepared dataset; writing one into it (overwrite): its files named like a prepared "
            "dataset's are replaced, the others kept.", folder)
        return
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise ValueError(
        f"--output {folder} exists and is not a prepared dataset (no {METADATA_FILE}; it holds {shown}): not "
        "writing over it. Choose another folder, or pass --overwrite (overwrite=True) to write the dataset into "
        f"it (its files named like a prepared dataset's ({CARD_FILE}, {ITEMS_FILE}, <split>*.parquet) are then "
        "replaced, the others kept)."
    )


def save_prepared(
    folder: str | os.PathLike,
    items: Any,
    sequences_by_split: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
    num_shards: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write a prepared dataset folder; returns the metadata written to ``pmmrec_dataset.json``.

    The folder is written atomically (``pmmrec_hf.atomic_io``): built in a temporary sibling, marked
    complete, then swapped in; an interrupted write leaves the previous version intact.

    Args:
        folder: created if needed. An earlier prepared dataset there is replaced (other files in it are
            kept); an existing folder that is not a prepared dataset (and not empty) is refused unless
            ``overwrite`` (its files named like ours are then replaced, the others kept).
        items: a DataFrame, a mapping of columns or a sequence of row dicts with ``item_id`` (unique
            strings, in integer-id order), ``text`` (None is written as "") and optionally ``image``
            (see ``_encode_image`` for the accepted values). ``train_count`` is always computed from
            the ``train`` split; a given one is ignored.
        sequences_by_split: ``{"train"|"validation"|"test": rows}`` with ``user_id``, ``item_ids``
            (list of item_id strings, each present in ``items``), ``timestamps`` (list of ints).
        metadata: extra keys to store (``name``, ``max_length``, ``min_length``, ``counts``, ...).
        max_rows_per_file: a split with more rows is written as ceil(rows / max_rows_per_file) files
            of nearly equal size (streaming shards).
        num_shards: write exactly this many files per split instead (e.g. a multiple of the number of
            processes); 1 gives a single ``<split>.parquet``.
    """
    from tqdm.auto import tqdm

    from ..atomic_io import AtomicFolder

    folder = Path(folder)
    check_output_folder(folder, overwrite)
    unknown = set(sequences_by_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; expected a subset of {list(SPLITS)}")
    if max_rows_per_file < 1:
        raise ValueError(f"max_rows_per_file must be >= 1, got {max_rows_per_file}")

    item_rows = _rows(items, "items")
    item_ids = [str(r["item_id"]) for r in item_rows]
    if len(set(item_ids)) != len(item_ids):
        dup = next(i for i, c in Counter(item_ids).items() if c > 1)
        raise ValueError(f"items: item_id {dup!r} occurs more than once")
    known = set(item_ids)
    split_rows = {s: _rows(sequences_by_split[s], f"split {s!r}") for s in SPLITS if s in sequences_by_split}
    for split, rows in split_rows.items():
        _check_sequence_rows(split, rows, known)
    train_count = Counter(item for row in split_rows.get("train", []) for item in row["item_ids"])

    # built in a temporary sibling, swapped in when complete; files that are not ours are carried over
    writer = AtomicFolder(folder, carry_over=lambda name: not _is_dataset_file(name))
    folder = writer.begin()
    try:
        meta = _write_prepared_files(folder, item_rows, split_rows, train_count, metadata, max_rows_per_file,
                                     num_shards, progress, tqdm)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return meta


def _write_prepared_files(folder, item_rows, split_rows, train_count, metadata, max_rows_per_file, num_shards,
                          progress, tqdm) -> dict:
    from ..atomic_io import boundary

    features = item_features()
    schema = features.arrow_schema
    with pq.ParquetWriter(folder / ITEMS_FILE, schema) as writer:
        bar = tqdm(total=len(item_rows), desc="writing items", unit="item", disable=not progress)
        for start in range(0, len(item_rows), ITEMS_ROW_GROUP_SIZE):
            chunk = item_rows[start : start + ITEMS_ROW_GROUP_SIZE]
            columns = {
                "item_id": [str(r["item_id"]) for r in chunk],
                "text": ["" if r.get("text") is None else str(r["text"]) for r in chunk],
                "image": [_encode_image(r.get("image")) for r in chunk],
                "train_count": [train_count.get(str(r["item_id"]), 0) for r in chunk],
            }
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            bar.update(len(chunk))
        bar.close()
        if not item_rows:
            writer.write_table(schema.empty_table())
    boundary("file_written")

    files: dict[str, list[str]] = {"items": [ITEMS_FILE]}
    num_rows: dict[str, int] = {"items": len(item_rows)}
    seq_schema = sequence_features().arrow_schema
    for split, rows in split_rows.items():
        names = _file_names(split, len(rows), max_rows_per_file, num_shards)
        # nearly equal sizes: file k gets rows [k*n/N, (k+1)*n/N)
        bounds = [k * len(rows) // len(names) for k in range(len(names) + 1)]
        for k, name in enumerate(names):
            part = rows[bounds[k] : bounds[k + 1]]
            table = pa.Table.from_pydict(
                {
                    "user_id": [str(r["user_id"]) for r in part],
                    "item_ids": [[str(i) for i in r["item_ids"]] for r in part],
                    "timestamps": [[int(t) for t in r["timestamps"]] for r in part],
                },
                schema=seq_schema,
            )
            pq.write_table(table, folder / name)
            boundary("file_written")
        files[split] = names
        num_rows[split] = len(rows)

    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    meta.update(dict(metadata or {}))
    meta["files"] = files
    meta["num_rows"] = num_rows
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    boundary("file_written")
    _write_card(folder, files, meta)
    boundary("file_written")
    return meta


# --------------------------------------------------------------------------------------------------
# reading


def _local_folder(folder_or_hub_id: str | os.PathLike) -> Path:
    from ..atomic_io import resolve_folder

    return resolve_folder(Path(folder_or_hub_id).expanduser())


def _check_complete(folder: Path) -> None:
    from ..atomic_io import MARKER, incomplete_reason

    reason = incomplete_reason(folder)
    if reason is not None:
        raise ValueError(
            f"{folder} is not a complete prepared dataset: {reason}. Its write was interrupted (or it was made "
            f"by hand or by an older version): prepare it again; a folder written by hand can be marked complete "
            f"with pmmrec_hf.atomic_io.write_marker({str(folder)!r}), which lists its files in {MARKER}."
        )


def _is_local(folder_or_hub_id: str | os.PathLike) -> bool:
    path = _local_folder(folder_or_hub_id)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a prepared dataset folder")
        return True
    text = str(folder_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise FileNotFoundError(f"no prepared dataset folder at {text}")
    return False


def read_metadata(
    folder_or_hub_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> dict:
    """The parsed ``pmmrec_dataset.json`` of a local folder or a Hub dataset repository.

    A local folder must be complete (its completeness marker, written last, lists every file with its
    size); a folder an interrupted write left aside is read in place of a missing one (with a warning)."""
    if _is_local(folder_or_hub_id):
        folder = _local_folder(folder_or_hub_id)
        path = folder / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {Path(folder_or_hub_id)} is not a prepared dataset folder")
        _check_complete(folder)
    else:
        from huggingface_hub import hf_hub_download

        path = Path(
            hf_hub_download(str(folder_or_hub_id), METADATA_FILE, repo_type="dataset", revision=revision, token=token)
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the prepared dataset's metadata is damaged") from err


def _confined(files: Mapping[str, Any], folder: Path | None, label: str) -> dict[str, list[str]]:
    """The metadata's ``files``, each checked to stay inside the dataset (no absolute path, no ``..``, no symlink
    out of a local folder); a ValueError names the entry."""
    from pathlib import PurePosixPath, PureWindowsPath

    root = folder.resolve() if folder is not None else None
    for split, names in files.items():
        for i, name in enumerate(names):
            text = str(name)
            parts = PurePosixPath(text.replace("\\", "/")).parts
            outside = (
                PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive
                or ".." in parts or "://" in text
                or (root is not None and not (root / text).resolve().is_relative_to(root))
            )
            if outside:
                raise ValueError(
                    f"{label}: files[{split!r}][{i}] = {text!r} points outside the dataset folder; refused (pass "
                    "allow_outside_paths=True to load_prepared / load_items for trusted data)"
                )
    return {k: [str(f) for f in v] for k, v in files.items()}


def _files(
    metadata: Mapping[str, Any], folder: Path | None, allow_outside_paths: bool = False, label: str = METADATA_FILE
) -> dict[str, list[str]]:
    """Files per split, from the metadata (or, for a folder written by hand without that key, by name)."""
    if "files" in metadata:
        if allow_outside_paths:
            return {k: list(v) for k, v in metadata["files"].items()}
        return _confined(metadata["files"], folder, label)
    if folder is None:
        raise ValueError("the metadata has no 'files' entry")
    files = {"items": [ITEMS_FILE]}
    for split in SPLITS:
        single = folder / f"{split}.parquet"
        shards = sorted(p.name for p in folder.glob(f"{split}-*.parquet"))
        if single.is_file():
            files[split] = [single.name]
        elif shards:
            files[split] = shards
    return files


def _data_files(
    folder_or_hub_id: str | os.PathLike, revision: str | None, token: str | bool | None,
    allow_outside_paths: bool = False,
) -> tuple[dict[str, list[str]], dict]:
    metadata = read_metadata(folder_or_hub_id, revision=revision, token=token)
    if _is_local(folder_or_hub_id):
        folder = _local_folder(folder_or_hub_id).resolve()
        files = _files(metadata, folder, allow_outside_paths, str(folder / METADATA_FILE))
        return {k: [str(folder / f) for f in v] for k, v in files.items()}, metadata
    base = f"hf://datasets/{folder_or_hub_id}"
    if revision is not None:
        base += "@" + quote(revision, safe="")
    files = _files(metadata, None, allow_outside_paths, f"{folder_or_hub_id}/{METADATA_FILE}")
    return {k: [f"{base}/{f}" for f in v] for k, v in files.items()}, metadata


def load_prepared(
    folder_or_hub_id: str | os.PathLike,
    streaming: bool = False,
    split: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_outside_paths: bool = False,
    **load_kwargs: Any,
):
    """The user sequences of a prepared dataset, through ``datasets.load_dataset("parquet", ...)``.

    Returns a ``DatasetDict`` (``IterableDatasetDict`` when ``streaming``) with the splits present, or
    the one ``split`` asked for. Rows: ``user_id``, ``item_ids`` (time-ordered), ``timestamps``. With
    ``streaming=True`` each split has as many shards as it has files. A ``files`` entry of the metadata that
    leads outside the dataset (absolute, ``..``, a symlink out) is a ValueError naming it, unless
    ``allow_outside_paths=True`` (trusted data only).
    """
    from datasets import load_dataset

    data_files, _ = _data_files(folder_or_hub_id, revision, token, allow_outside_paths)
    data_files.pop("items")
    if split is not None:
        if split not in data_files:
            raise ValueError(f"split {split!r} not in {folder_or_hub_id} (splits: {list(data_files)})")
        data_files = {split: data_files[split]}
    ds = load_dataset(
        "parquet",
        data_files=data_files,
        features=sequence_features(),
        streaming=streaming,
        token=token,
        cache_dir=None if cache_dir is None else str(cache_dir),
        **load_kwargs,
    )
    return ds[split] if split is not None else ds


def load_items(
    folder_or_hub_id: str | os.PathLike,
    *,
    decode_images: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_outside_paths: bool = False,
    **load_kwargs: Any,
):
    """``(items, item_to_index)``: the items as a map-style ``datasets.Dataset`` (``item_id``, ``text``,
    ``image`` as an ``Image()`` feature, PIL images when decoded, ``train_count``) and a dict from
    ``item_id`` to the integer id (row number). ``allow_outside_paths``: as in ``load_prepared``."""
    from datasets import Image, load_dataset

    data_files, _ = _data_files(folder_or_hub_id, revision, token, allow_outside_paths)
    items = load_dataset(
        "parquet",
        data_files={"items": data_files["items"]},
        features=item_features(),
        split="items",
        token=token,
        cache_dir=None if cache_dir is None else str(cache_dir),
        **load_kwargs,
    )
    if not decode_images:
        items = items.cast_column("image", Image(decode=False))
    ids = items.data.column("item_id").to_pylist()
    return items, {item_id: index for index, item_id in enumerate(ids)}


def shard_for_process(dataset, rank: int, world_size: int, seed: int = 0, buffer_size: int = 1000):
    """This process's part of a split, shuffled with a seed shared by all processes.

    ``datasets.distributed.split_dataset_by_node(dataset, rank, world_size)`` first: for a streaming
    dataset whose number of shards (files) is a multiple of ``world_size`` each process gets whole
    shards, otherwise each keeps one row in ``world_size``; the parts are disjoint and together complete.
    Then a seeded shuffle (an ``IterableDataset`` uses a ``buffer_size`` buffer and also shuffles its
    shard order; call ``.set_epoch(epoch)`` on the result to reshuffle each epoch).
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    part = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if isinstance(part, IterableDataset):
        return part.shuffle(seed=seed, buffer_size=buffer_size)
    return part.shuffle(seed=seed)


def _user_key(user_id: Any, seed: int) -> int:
    """A seeded 64-bit key of a user id (stable across processes, Python versions and runs)."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def subset_users(dataset, fraction: float, seed: int = 0):
    """The rows of a seeded fraction of the users of a training split: nested (with the same seed, the users
    kept at fraction f are among those kept at any f' > f) and the same whatever the row order.

    Users are ordered by a seeded hash of their id. A map-style dataset (``datasets.Dataset`` or a list of rows
    with a ``user_id``) keeps exactly the first ``ceil(fraction * users)`` users of that order (at least one);
    a streaming (``IterableDataset``) split keeps each user whose hash falls below ``fraction`` of the range,
    which is nested too but holds about, not exactly, that fraction. ``fraction`` 1 returns the split itself.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"`fraction` (--train-fraction) must be in (0, 1], got {fraction!r}.")
    if fraction == 1:
        return dataset
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        threshold = fraction * 2**64
        return dataset.filter(lambda row: _user_key(row["user_id"], seed) < threshold)
    users = list(dataset["user_id"]) if hasattr(dataset, "column_names") else [row["user_id"] for row in dataset]
    distinct = sorted(set(users), key=lambda user: (_user_key(user, seed), str(user)))
    keep = set(distinct[: max(1, math.ceil(fraction * len(distinct)))])
    indices = [index for index, user in enumerate(users) if user in keep]
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[index] for index in indices]
