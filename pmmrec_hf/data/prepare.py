"""The generic importer: an interactions table and an items table -> a prepared dataset folder.

Every row or item that is left out is counted under a named count (the policy table is in
``docs/formats.md``); the counts go to ``pmmrec_dataset.json`` and are printed at the end.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .format import DEFAULT_MAX_ROWS_PER_FILE, check_output_folder, save_prepared

DEFAULT_MAX_LENGTH = 20
DEFAULT_MIN_LENGTH = 3

__all__ = [
    "COUNT_NAMES",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MIN_LENGTH",
    "PrepareResult",
    "build_splits",
    "leave_one_out",
    "prepare_dataset",
    "push_prepared_to_hub",
    "read_table",
]

# Every count written to the metadata, in the order of the pipeline (see docs/formats.md).
COUNT_NAMES = (  # (a sequence-format import adds pmmrec_hf.data.sequences.SOURCE_COUNT_NAMES first)
    "items_read",
    "items_missing_id",
    "items_duplicate",
    "interactions_read",
    "users_read",
    "interactions_outside_user_slice",
    "interactions_missing_field",
    "interactions_bad_time",
    "interactions_duplicate",
    "interactions_unknown_item",
    "items_added_from_interactions",
    "items_without_interactions",
    "texts_missing",
    "images_missing",
    "images_undecodable",
    "items_dropped_no_text",
    "items_dropped_no_image",
    "interactions_dropped_item",
    "users_all_interactions_dropped",
    "users_too_short",
    "interactions_too_short_users",
    "interactions_truncated",
    "items_unused",
    "users",
    "items",
    "interactions",
    "items_with_text",
    "items_with_image",
)

_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_TYPED_HEADER = re.compile(r"^(.+):(" + "|".join(_RECBOLE_TYPES) + r")$")


# --------------------------------------------------------------------------------------------------
# the split


def leave_one_out(sequence: Sequence, max_length: int = DEFAULT_MAX_LENGTH, min_length: int = DEFAULT_MIN_LENGTH):
    """``(train, validation, test)`` rows of one time-ordered sequence, or None when it is shorter than
    ``min_length``. s = the last ``max_length + 3`` elements; train = s[:-2] (every position a target),
    validation = s[:-1] (target s[-2]), test = s (target s[-1])."""
    _check_lengths(max_length, min_length)
    if len(sequence) < min_length:
        return None
    s = list(sequence)[-(max_length + 3) :]
    return s[:-2], s[:-1], s


def _check_lengths(max_length: int, min_length: int) -> None:
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3 (train, validation and test each need a target), got {min_length}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")


def build_splits(
    user_sequences: Iterable[tuple[str, Sequence[str], Sequence[int]]],
    max_length: int = DEFAULT_MAX_LENGTH,
    min_length: int = DEFAULT_MIN_LENGTH,
) -> tuple[dict[str, dict[str, list]], dict[str, int]]:
    """The three split tables (column dicts) from ``(user_id, item_ids, timestamps)`` triples, already
    time-ordered, and the counts ``users``, ``interactions``, ``users_too_short``,
    ``interactions_too_short_users``, ``interactions_truncated``."""
    splits = {s: {"user_id": [], "item_ids": [], "timestamps": []} for s in ("train", "validation", "test")}
    counts = dict(users=0, interactions=0, users_too_short=0, interactions_too_short_users=0, interactions_truncated=0)
    for user, items, times in user_sequences:
        if len(items) != len(times):
            raise ValueError(f"user {user!r}: {len(items)} items but {len(times)} timestamps")
        parts = leave_one_out(range(len(items)), max_length, min_length)
        if parts is None:
            counts["users_too_short"] += 1
            counts["interactions_too_short_users"] += len(items)
            continue
        for split, positions in zip(("train", "validation", "test"), parts):
            splits[split]["user_id"].append(str(user))
            splits[split]["item_ids"].append([items[p] for p in positions])
            splits[split]["timestamps"].append([int(times[p]) for p in positions])
        counts["users"] += 1
        counts["interactions"] += len(parts[2])
        counts["interactions_truncated"] += len(items) - len(parts[2])
    return splits, counts


# --------------------------------------------------------------------------------------------------
# reading tables


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet"
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if last == ".csv":
        return "csv"
    return "tsv"


def _check_encoding(encoding: str) -> None:
    import codecs

    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError) as err:
        raise ValueError(f"encoding {encoding!r} (CLI: --encoding) is not a known text encoding, e.g. 'utf-8' or 'latin-1'") from err


def _first_undecodable_line(path: Path, encoding: str) -> tuple[int, UnicodeDecodeError] | None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                return lineno, err
    return None


def read_table(
    source: str | os.PathLike | pd.DataFrame | Sequence[str | os.PathLike],
    *,
    sep: str | None = None,
    columns: Sequence[str] | None = None,
    encoding: str = "utf-8",
    usecols: Sequence[int | str] | None = None,
    quoted: bool = False,
) -> pd.DataFrame:
    """One table as a DataFrame, every text-file column read as strings (only empty fields are
    missing, so ids like ``0108775015`` or ``NA`` stay as written).

    ``source``: a path, a list of paths (concatenated in order, same columns) or a DataFrame (returned
    as is). The format follows the extension: ``.csv`` comma-separated, ``.parquet``/``.pq``,
    ``.jsonl``/``.json``/``.ndjson`` JSON lines, anything else tab-separated (unquoted unless ``quoted``:
    then a field in double quotes may hold tabs and newlines, as in RecBole files written by pandas); ``sep``
    overrides the separator. ``columns``: names for a file without a header line. RecBole typed headers
    (``item_id:token``) lose their type suffix. The table's name is kept in ``df.attrs["source"]`` for
    error messages. Raises ValueError naming the file and line when the file is not valid ``encoding``.
    """
    if isinstance(source, pd.DataFrame):
        source.attrs.setdefault("source", "<DataFrame>")
        return source
    if isinstance(source, (list, tuple)):
        frames = [read_table(s, sep=sep, columns=columns, encoding=encoding, usecols=usecols, quoted=quoted)
                  for s in source]
        df = pd.concat(frames, ignore_index=True)
        df.attrs["source"] = " + ".join(str(s) for s in source)
        return df
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = _kind(path)
    try:
        if kind == "parquet":
            df = pd.read_parquet(path)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False, encoding=encoding)
        else:
            delimiter = sep if sep is not None else ("," if kind == "csv" else "\t")
            df = pd.read_csv(
                path,
                sep=delimiter,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                encoding=encoding,
                header=None if columns is not None else "infer",
                names=list(columns) if columns is not None else None,
                usecols=list(usecols) if usecols is not None else None,
                quoting=csv.QUOTE_NONE if delimiter == "\t" and not quoted else csv.QUOTE_MINIMAL,
            )
    except UnicodeDecodeError as err:
        found = _first_undecodable_line(path, encoding)
        where = f"line {found[0]}, byte {found[1].start + 1} of that line" if found else f"byte {err.start + 1}"
        raise ValueError(
            f"{path}: {where} is not valid {encoding} text; pass encoding='latin-1' (CLI: --encoding latin-1) "
            f"or the file's real encoding"
        ) from err
    except (pd.errors.ParserError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as a {kind} table: {err}") from err
    renamed = {}
    for col in df.columns:
        match = _TYPED_HEADER.match(str(col))
        if match:
            renamed[col] = match.group(1)
    if renamed and len(renamed) == len(df.columns):
        df = df.rename(columns=renamed)
    df.attrs["source"] = str(path)
    return df


def _label(df: pd.DataFrame) -> str:
    return df.attrs.get("source", "<DataFrame>")


def _require_columns(df: pd.DataFrame, names: Iterable[str | None], what: str) -> None:
    for name in names:
        if name is not None and name not in df.columns:
            raise ValueError(
                f"{_label(df)}: missing column {name!r} ({what}); the columns are {[str(c) for c in df.columns]}"
            )


def _as_ids(series: pd.Series) -> pd.Series:
    """Ids as strings (integers without a trailing .0), missing values as None."""
    def one(value: Any):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            return None
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return str(int(value))
        if isinstance(value, bytes):
            return value.decode("utf-8")
        return str(value)

    if pd.api.types.is_string_dtype(series) and not pd.api.types.is_object_dtype(series):
        return series.astype(object).where(series.notna(), None)  # a string column: the common, fast case
    return pd.Series([one(v) for v in series.tolist()], index=series.index, dtype=object)


def _parse_times(series: pd.Series, time_format: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(sort keys as float64, int64 seconds) with NaN keys where a value cannot be parsed.

    Numbers are unix seconds (a fraction is kept in the sort key, floored in the seconds); a text column
    is numeric when any value is a number (the others are then bad times), else dates/datetimes
    (``time_format``, default parsed automatically) in UTC. ``inf``, ``nan`` and numbers outside the int64
    range (e.g. ``1e30``) are bad times."""
    if pd.api.types.is_datetime64_any_dtype(series):
        keys = _seconds(pd.to_datetime(series, utc=True))
    elif pd.api.types.is_numeric_dtype(series) and time_format is None:
        keys = series.astype("float64").to_numpy()
    else:
        text = series.astype(object).where(series.notna(), None)
        numeric = pd.to_numeric(text, errors="coerce") if time_format is None else None
        if numeric is not None and numeric.notna().any():
            keys = numeric.astype("float64").to_numpy()
        else:
            keys = _seconds(pd.to_datetime(text, errors="coerce", utc=True, format=time_format or "mixed"))
    keys = np.array(keys, dtype=np.float64)  # (a copy: the column's own values stay)
    # inf, 1e30, ...: not a storable int64 second (they would wrap to -2**63) -> a bad time, like text
    keys[~np.isfinite(keys) | (keys >= 2.0**63) | (keys < -(2.0**63))] = np.nan
    return keys, np.floor(np.nan_to_num(keys)).astype(np.int64)


def _seconds(parsed: pd.Series) -> np.ndarray:
    return ((parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).astype("float64").to_numpy()


# --------------------------------------------------------------------------------------------------
# texts


_TEMPLATE_OPTIONS = {"text": "text_template (CLI: --text-template)", "image": "image_pattern (CLI: --image-pattern)"}


def _template_fields(template: str, what: str = "text") -> list[str]:
    option = _TEMPLATE_OPTIONS.get(what, what)
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # e.g. "{title" (an unclosed field)
        raise ValueError(f"{option} {template!r} is not a valid template: {err}") from err
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise ValueError(f"{option} {template!r}: every field must name a column, got {{{name}}}")
        if base not in fields:
            fields.append(base)
    try:  # a format spec or conversion that a text value cannot take, e.g. "{title:d}"
        template.format_map(_Fields({f: "x" for f in fields}))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"{option} {template!r} cannot format text values: {type(err).__name__}: {err}") from err
    return fields


def _column_fields(template: str, table: pd.DataFrame, what: str = "text") -> list[str]:
    """The columns a template names (``item_id`` needs no column: it is always the item's id); a template that
    does not parse, cannot format text, or names a column the items table lacks is a ValueError naming it."""
    columns = table.columns
    fields = [f for f in _template_fields(template, what) if not (f == "item_id" and f not in columns)]
    absent = [f for f in fields if f not in columns]
    if absent:
        import difflib

        names = [str(c) for c in columns]
        close = difflib.get_close_matches(absent[0], names, n=1)
        raise ValueError(
            f"{_label(table)}: missing column {absent[0]!r} (named by {_TEMPLATE_OPTIONS.get(what, what)} {template!r}"
            f"{f'; did you mean {{{close[0]}}}?' if close else ''}); the columns are {names}"
        )
    return fields


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _clean(value: Any) -> str:
    return "" if _is_missing(value) else str(value).strip()


class _Fields(dict):
    """Template fields: missing values and absent columns format as ""."""

    def __missing__(self, key: str) -> str:
        return ""


def _format(template: str, fields: Mapping[str, Any]) -> str:
    try:
        return template.format_map(_Fields({k: _clean(v) for k, v in fields.items()}))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(
            f"template {template!r} cannot format the item {fields.get('item_id')!r}: {type(err).__name__}: {err}"
        ) from err


# --------------------------------------------------------------------------------------------------
# images


class _Opaque:
    """Stands for any class found in a pickled LMDB value (its state is kept, nothing is executed)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain data; any other class becomes an ``_Opaque`` record."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "frombuffer", "scalar"}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            return super().find_class(module, name)
        if (module, name) in {("codecs", "encode"), ("_codecs", "encode"), ("builtins", "bytearray"),
                              ("builtins", "object"), ("copyreg", "_reconstructor"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        return type(name, (_Opaque,), {})


def _pixels_to_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _lmdb_value_to_bytes(raw: bytes) -> bytes:
    """An LMDB image value as encoded image bytes: a pickled uint8 array (1-D = an encoded file,
    H x W (x C) = pixels, saved as PNG), pickled bytes, or an object with ``image`` (bytes or array)
    and optionally ``size`` (H, W) and ``channels``; a value that is not a pickle is taken as a file."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except Exception:
        return bytes(raw)
    if isinstance(obj, dict):
        obj = obj.get("bytes", obj.get("image"))
    if isinstance(obj, _Opaque):
        image = getattr(obj, "image", None)
        if isinstance(image, (bytes, bytearray)) and hasattr(obj, "size"):
            h, w = obj.size[:2]
            channels = getattr(obj, "channels", None) or len(image) // (h * w)
            shape = (h, w) if channels == 1 else (h, w, channels)
            obj = np.frombuffer(image, dtype=np.uint8).reshape(shape)
        else:
            obj = image
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, np.ndarray):
        if obj.ndim == 1:
            return obj.astype(np.uint8, copy=False).tobytes()
        if obj.ndim in (2, 3):
            return _pixels_to_png(obj.astype(np.uint8, copy=False))
    raise ValueError(f"unrecognised LMDB image value of type {type(obj).__name__}")


def _image_ok(data: bytes) -> bool:
    """True when PIL can identify, verify and fully decode the image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


class _FileImages:
    """Images named per item by a path pattern or a column (paths, raw bytes or {bytes, path} structs)."""

    def __init__(self, root: Path, pattern: str | None, column: str | None, allow_outside_paths: bool = False):
        self.root, self.pattern, self.column = root, pattern, column
        self.allow_outside_paths = allow_outside_paths
        self._resolved_root = root.resolve()

    def describe(self) -> dict:
        return {"kind": "files", "root": str(self.root), "pattern": self.pattern, "column": self.column}

    def ref(self, fields: Mapping[str, Any]):
        if self.pattern is not None:
            return _format(self.pattern, fields)
        value = fields.get(self.column)
        if _is_missing(value):
            return None
        if isinstance(value, Mapping):
            return value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        text = str(value).strip()
        return text or None

    def load(self, ref) -> bytes | None:
        if isinstance(ref, bytes):
            return ref
        path = self.root / ref
        if not self.allow_outside_paths and not path.resolve().is_relative_to(self._resolved_root):
            source = f"column {self.column!r}" if self.pattern is None else f"image_pattern {self.pattern!r}"
            raise ValueError(
                f"image path {str(ref)!r} (from {source}) is outside the image root {self.root}; paths from the data "
                "stay inside it unless allow_outside_paths=True (CLI: --allow-outside-paths) for trusted data"
            )
        return path.read_bytes() if path.is_file() else None

    def load_struct(self, ref) -> dict | None:
        data = self.load(ref)
        if data is None:
            return None
        return {"bytes": data, "path": None if isinstance(ref, bytes) else Path(ref).name}

    def close(self) -> None:
        pass


class _LmdbImages:
    """Images in an LMDB database keyed by ``key_template.format(item_id=...)`` (UTF-8)."""

    def __init__(self, path: Path, key_template: str):
        try:
            import lmdb
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("reading images from LMDB needs the 'lmdb' package: pip install lmdb") from err
        if not path.exists():
            raise FileNotFoundError(f"{path}: no LMDB database there")
        self.path, self.key_template = path, key_template
        self.env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir())

    def describe(self) -> dict:
        return {"kind": "lmdb", "path": str(self.path), "key": self.key_template}

    def ref(self, fields: Mapping[str, Any]):
        return _format(self.key_template, fields)

    def load(self, ref) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            raw = txn.get(str(ref).encode("utf-8"))
        if raw is None:
            return None
        try:
            return _lmdb_value_to_bytes(raw)
        except ValueError:
            return b""  # present but not an image: counted as undecodable

    def load_struct(self, ref) -> dict | None:
        data = self.load(ref)
        return None if data is None else {"bytes": data, "path": None}

    def close(self) -> None:
        self.env.close()


# --------------------------------------------------------------------------------------------------
# the importer


@dataclass
class PrepareResult:
    """What ``prepare_dataset`` wrote: the folder, its metadata (with every count) and, after an
    upload, the Hub repository's URL."""

    folder: Path
    metadata: dict
    hub_url: str | None = None
    counts: dict = field(init=False)

    def __post_init__(self):
        self.counts = self.metadata["counts"]

    def summary(self) -> str:
        c = self.counts
        name = self.metadata.get("name") or "dataset"
        lines = [
            f"Prepared {name} -> {self.folder}",
            f"  users {c['users']:,} | items {c['items']:,} | interactions {c['interactions']:,}",
            f"  images found {c['items_with_image']:,} of {c['items']:,} items"
            + ("" if self.metadata.get("image_source") else " (no image source)")
            + f" | texts found {c['items_with_text']:,} of {c['items']:,}",
            "  every count:",
        ]
        width = max(len(k) for k in c)
        lines += [f"    {k:<{width}}  {v:,}" for k, v in c.items()]
        if self.hub_url:
            lines.append(f"  uploaded to {self.hub_url}")
        return "\n".join(lines)


_HUB_DATA_PATTERNS = ["*.parquet", "pmmrec_dataset.json", ".pmmrec-complete.json"]


def push_prepared_to_hub(
    folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool | None = None,
    commit_message: str = "Upload prepared PMMRec dataset",
) -> str:
    """Upload a prepared folder as a Hub dataset repository (created if needed); returns its URL.

    ``private=True`` onto an existing public repo logs the same warning as the model push (the repo stays
    public). No token, or a token the Hub refuses (401/403), raises ``PMMRecAuthError`` saying how to log in;
    another Hub or network error raises ``PMMRecPublishError``; either way the local folder is left as it is."""
    from huggingface_hub import HfApi

    from ..hub import _LOGIN_HINT, PMMRecAuthError, PMMRecPublishError, _status, warn_if_public

    _require_hub_token(repo_id, token)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if private:
            warn_if_public(api, repo_id, "dataset")
        # one commit: the new files and the removal of an earlier version's data files that this one does not
        # have (e.g. another number of shards), so the repo never shows a mix of two versions
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                          commit_message=commit_message, delete_patterns=_HUB_DATA_PATTERNS)
    except Exception as err:
        status = _status(err)
        if status in (401, 403):
            raise PMMRecAuthError(
                f"the Hub at {api.endpoint} refused to push the dataset to '{repo_id}' (HTTP {status}: the token is "
                f"invalid, read-only or may not write there). {_LOGIN_HINT} Nothing was uploaded; the prepared "
                f"folder {folder} is complete.", repo_id=repo_id, not_published=[repo_id],
            ) from err
        if isinstance(err, ValueError) and status is None:
            raise
        raise PMMRecPublishError(
            f"pushing the dataset to '{repo_id}' at {api.endpoint} failed ({type(err).__name__}: {err}). The prepared "
            f"folder {folder} is complete; push it again with push_prepared_to_hub.", repo_id=repo_id,
            not_published=[repo_id],
        ) from err
    return str(url)


def _require_hub_token(repo_id: str, token: str | bool | None) -> None:
    """PMMRecAuthError when there is no token to push with (none given and no stored login / HF_TOKEN)."""
    from huggingface_hub import get_token

    from ..hub import _LOGIN_HINT, PMMRecAuthError

    if token is False or (token is None and not get_token()):
        raise PMMRecAuthError(
            f"pushing the dataset to '{repo_id}' needs a Hugging Face token with write access, and none was found. "
            f"{_LOGIN_HINT}", repo_id=repo_id, not_published=[repo_id],
        )


def _check_output_folder(output_dir: str | os.PathLike) -> None:
    """ValueError naming ``output_dir`` (CLI --output) when it, or a folder above it, is an existing file."""
    path = Path(output_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == path else f"is inside {candidate}, which is a file"
                raise ValueError(f"output folder (CLI --output) {path} {what}, not a folder; give a folder path")
            return


def check_output_outside_inputs(output_dir: str | os.PathLike, inputs: Iterable[Any],
                                source_root: str | os.PathLike | None = None) -> None:
    """Refuse an output folder that is an input's folder or holds an input (writing it would replace the
    inputs), or, with a `source_root` (a preset's source folder), one equal to it or holding it. (A folder
    inside the source is allowed: writing it touches no input.)"""
    output = Path(output_dir).expanduser().resolve()
    paths = []
    for value in inputs:
        if isinstance(value, (str, os.PathLike)):
            paths.append(Path(value))
        elif isinstance(value, (list, tuple)):
            paths += [Path(v) for v in value if isinstance(v, (str, os.PathLike))]
    for path in paths:
        path = path.expanduser().resolve()
        folder = path if path.is_dir() else path.parent
        if output == folder or output in folder.parents:
            raise ValueError(f"--output {output_dir} holds the input {path}: writing the dataset there would "
                             "replace the inputs; choose a folder outside the source.")
    if source_root is not None:
        root = Path(source_root).expanduser().resolve()
        if output == root or output in root.parents:
            raise ValueError(f"--output {output_dir} is the source folder {source_root} or holds it: writing the "
                             "dataset there would replace the inputs; choose another folder.")


def _first_users(users: pd.Series, max_users: int) -> set:
    seen: dict = {}
    for user in users.tolist():
        if user is not None and user not in seen:
            seen[user] = None
            if len(seen) == max_users:
                break
    return set(seen)


def prepare_dataset(
    interactions: str | os.PathLike | pd.DataFrame | Sequence[str | os.PathLike],
    items: str | os.PathLike | pd.DataFrame,
    output_dir: str | os.PathLike,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    item_id_col: str | None = None,
    text_cols: Sequence[str] | None = None,
    text_template: str | None = None,
    text_separator: str = " ",
    image_col: str | None = None,
    image_pattern: str | None = None,
    image_root: str | os.PathLike | None = None,
    image_lmdb: str | os.PathLike | None = None,
    image_lmdb_key: str = "{item_id}",
    interactions_sep: str | None = None,
    items_sep: str | None = None,
    interactions_columns: Sequence[str] | None = None,
    items_columns: Sequence[str] | None = None,
    interactions_format: str = "table",
    items_quoted: bool = False,
    encoding: str = "utf-8",
    time_format: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    min_length: int = DEFAULT_MIN_LENGTH,
    require_text: bool = False,
    require_images: bool = False,
    unknown_items: str = "drop",
    max_users: int | None = None,
    name: str | None = None,
    source_info: Mapping[str, Any] | None = None,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
    num_shards: int | None = None,
    push_to_hub: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    allow_outside_paths: bool = False,
    progress: bool = True,
    verbose: bool = True,
    overwrite: bool = False,
) -> PrepareResult:
    """Import an interactions table and an items table into a prepared folder (docs/formats.md).

    Args:
        interactions: path (CSV/TSV/Parquet/JSON lines, see ``read_table``), list of paths read one
            after the other, or DataFrame; one row per interaction.
        items: path or DataFrame; one row per item.
        output_dir: the prepared folder to write.
        interactions_format: ``"table"`` (one row per interaction), ``"user-sequences"`` (one line per user:
            ``<user> <item 1> ... <item n>``) or ``"recbole-sequential"`` (RecBole / UniSRec
            ``user_id:token \t item_id_list:token_seq \t item_id:token`` files, a user's rows merged); see
            ``pmmrec_hf.data.sequences``. The sequence formats set the columns (``user_id``, ``item_id``, and
            the position as the time) and add their ``source_*`` counts.
        items_quoted: the items file is a tab-separated file whose double-quoted fields may hold tabs and
            newlines.
        user_col, item_col, time_col: interaction columns. ``time_col`` holds numbers (unix seconds;
            fractions are kept for sorting and floored when stored) or dates/datetimes (stored as unix
            seconds, ``time_format`` a strftime format, default: parsed automatically); None: no time,
            the row number in the interactions table is the timestamp. Interactions are sorted by time,
            equal times keeping the table order.
        item_id_col: the items table's id column (default ``item_col``).
        text_cols: columns whose non-empty values are joined with ``text_separator``; or
        text_template: a ``str.format`` template naming columns, e.g. ``"{title}. {genres}"`` (an empty
            field gives ""; the result is stripped); ``{item_id}`` is always the item id. Default: the
            ``text`` column. An item whose text fields are all empty has a missing text.
        image_col: column with each item's image path (relative to ``image_root``), raw bytes or a
            ``{bytes, path}`` struct; or ``image_pattern``: a template of the path, e.g.
            ``"posters/{item_id}.jpg"`` or ``"images/{item_id:.3}/{item_id}.jpg"``; or ``image_lmdb``:
            an LMDB database (``pip install lmdb``) whose values are pickled uint8 arrays, under keys
            ``image_lmdb_key``. ``image_root`` defaults to the items file's folder. Every image is
            opened, verified and decoded with PIL. An image path from the data (a column value, or the pattern
            filled with row values) that leads outside ``image_root`` (``../``, an absolute path, a symlink out)
            is a ValueError naming the item, unless ``allow_outside_paths=True`` (trusted data only).
        interactions_sep, items_sep: separators overriding the extension's; ``interactions_columns``,
            ``items_columns``: column names for files without a header line.
        encoding: text encoding of CSV/TSV/JSON files (e.g. ``"latin-1"``).
        max_length (L), min_length: the split (users with fewer than ``min_length`` interactions are
            dropped, the last L + 3 kept, leave-one-out).
        require_text, require_images: drop items without a text / a decodable image (and their
            interactions) instead of keeping them with ``""`` / a null image.
        unknown_items: interactions naming an item absent from the items table are ``"drop"``ped, or
            (``"keep"``) the item is added with an empty text (its image is still looked up).
        max_users: keep only the first N users in the order of their first interaction in the table
            (for quick slices); every count then refers to that slice.
        name, source_info: stored in the metadata.
        max_rows_per_file, num_shards: see ``save_prepared``.
        push_to_hub: a Hub dataset repo id to upload the folder to (``token``, ``private``).
        progress, verbose: tqdm progress bars; print the summary at the end.
        overwrite: write into an existing ``output_dir`` that is not a prepared dataset (see
            ``save_prepared``). ``output_dir`` may never be an input's folder or hold an input.
    """
    from tqdm.auto import tqdm

    from .sequences import INTERACTION_FORMATS, read_interactions

    if interactions_format not in INTERACTION_FORMATS:
        raise ValueError(f"interactions_format must be one of {INTERACTION_FORMATS}, got {interactions_format!r}")
    if unknown_items not in ("drop", "keep"):
        raise ValueError(f"unknown_items must be 'drop' or 'keep', got {unknown_items!r}")
    if text_cols is not None and text_template is not None:
        raise ValueError("give text_cols or text_template, not both")
    if sum(x is not None for x in (image_col, image_pattern, image_lmdb)) > 1:
        raise ValueError("give at most one of image_col, image_pattern, image_lmdb")
    if require_images and image_col is None and image_pattern is None and image_lmdb is None:
        raise ValueError("require_images needs an image source (image_col, image_pattern or image_lmdb)")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1, got {max_users}")
    _check_lengths(max_length, min_length)
    _check_encoding(encoding)
    _check_output_folder(output_dir)
    check_output_folder(output_dir, overwrite)
    check_output_outside_inputs(output_dir, [interactions, items, image_root, image_lmdb])
    if push_to_hub is not None:
        _require_hub_token(push_to_hub, token)  # before the import's work, not after it
    item_id_col = item_id_col or item_col
    counts = dict.fromkeys(COUNT_NAMES, 0)

    # ---- items table
    items_df = read_table(items, sep=items_sep, columns=items_columns, encoding=encoding, quoted=items_quoted)
    items_label = _label(items_df)
    if text_template is not None:
        text_fields = _column_fields(text_template, items_df)
    elif text_cols is not None:
        text_fields = list(text_cols)
    else:
        text_fields = ["text"]
    image_fields = []
    if image_pattern is not None:
        image_fields = _column_fields(image_pattern, items_df, "image")
    _require_columns(items_df, [item_id_col], "the item id")
    _require_columns(items_df, text_fields, "item text")
    _require_columns(items_df, [image_col] + image_fields, "item image")
    counts["items_read"] = len(items_df)
    item_ids = _as_ids(items_df[item_id_col])
    has_id = item_ids.notna()
    counts["items_missing_id"] = int((~has_id).sum())
    items_df = items_df[has_id].assign(**{item_id_col: item_ids[has_id]})
    duplicated = items_df[item_id_col].duplicated(keep="first")
    counts["items_duplicate"] = int(duplicated.sum())
    items_df = items_df[~duplicated].reset_index(drop=True)

    # ---- interactions table
    if interactions_format != "table":  # whole sequences: read into (user_id, item_id, position) rows
        if not isinstance(interactions, pd.DataFrame):  # (a DataFrame is taken to be the reader's output)
            interactions = read_interactions(interactions, interactions_format, encoding=encoding)
        user_col, item_col, time_col = "user_id", "item_id", "position"
    inter = read_table(interactions, sep=interactions_sep, columns=interactions_columns, encoding=encoding)
    if inter.attrs.get("source_counts"):  # lines / rows of a sequence-format source, first in the counts
        counts = {**inter.attrs["source_counts"], **counts}
    inter_label = _label(inter)
    _require_columns(inter, [user_col, item_col, time_col], "interactions")
    counts["interactions_read"] = len(inter)
    frame = pd.DataFrame(
        {"user": _as_ids(inter[user_col]).to_numpy(), "item": _as_ids(inter[item_col]).to_numpy()}
    )
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    inside = np.ones(len(frame), dtype=bool)
    if max_users is not None:
        keep_users = _first_users(frame["user"], max_users)
        inside = frame["user"].isin(keep_users).to_numpy() | frame["user"].isna().to_numpy()
        counts["interactions_outside_user_slice"] = int((~inside).sum())
        frame = frame[inside]
    if time_col is not None:
        time_values = inter[time_col].reset_index(drop=True)[inside].reset_index(drop=True)
        time_missing = time_values.isna().to_numpy()
        keys, seconds = _parse_times(time_values, time_format)
        bad_time_examples = time_values[np.isnan(keys) & ~time_missing].head(3).tolist()
    else:
        time_missing = np.zeros(len(frame), dtype=bool)
        keys, seconds = frame["row"].to_numpy(dtype=np.float64), frame["row"].to_numpy()
    frame = frame.assign(key=keys, time=seconds)
    del inter
    users_read = set(frame["user"].dropna().tolist())
    counts["users_read"] = len(users_read)
    missing = frame["user"].isna().to_numpy() | frame["item"].isna().to_numpy() | time_missing
    counts["interactions_missing_field"] = int(missing.sum())
    frame = frame[~missing]
    bad_time = np.isnan(frame["key"].to_numpy())
    counts["interactions_bad_time"] = int(bad_time.sum())
    frame = frame[~bad_time]
    duplicate = frame.duplicated(["user", "item", "key"], keep="first").to_numpy()
    counts["interactions_duplicate"] = int(duplicate.sum())
    frame = frame[~duplicate]
    known = frame["item"].isin(set(items_df[item_id_col])).to_numpy()
    if unknown_items == "drop":
        counts["interactions_unknown_item"] = int((~known).sum())
        frame = frame[known]
        added: list[str] = []
    else:
        added = list(dict.fromkeys(frame["item"][~known].tolist()))
        counts["items_added_from_interactions"] = len(added)

    # ---- the items to check: table rows referenced by an interaction, then the added ones
    referenced = set(frame["item"].tolist())
    used_rows = items_df[items_df[item_id_col].isin(referenced)]
    counts["items_without_interactions"] = len(items_df) - len(used_rows)
    image_columns = image_fields + ([image_col] if image_col else [])
    columns_needed = list(dict.fromkeys([item_id_col] + text_fields + image_columns))
    candidates = used_rows[columns_needed].to_dict("records")
    candidates += [{item_id_col: item} for item in added]
    del items_df, used_rows

    if image_lmdb is not None:
        images = _LmdbImages(Path(image_lmdb), image_lmdb_key)
    elif image_col is not None or image_pattern is not None:
        root = Path(image_root) if image_root is not None else (
            Path(items).parent if isinstance(items, (str, os.PathLike)) else Path.cwd()
        )
        images = _FileImages(root, image_pattern, image_col, allow_outside_paths)
    else:
        images = None

    checked = []  # (item_id, text, image ref or None)
    try:
        for row in tqdm(candidates, desc="checking items", unit="item", disable=not progress):
            item = row[item_id_col]
            fields = dict(row)
            fields.setdefault("item_id", item)
            if text_template is not None:
                has_text = any(_clean(fields.get(f)) for f in text_fields)
                text = _format(text_template, fields).strip() if has_text else ""
            else:
                text = text_separator.join(v for v in (_clean(fields.get(f)) for f in text_fields) if v)
                has_text = bool(text)
            if not has_text:
                counts["texts_missing"] += 1
            ref = None
            if images is not None:
                ref = images.ref(fields)
                try:
                    data = images.load(ref) if ref is not None else None
                except ValueError as err:
                    raise ValueError(f"{items_label}: item {item!r}: {err}") from err
                if data is None:
                    counts["images_missing"] += 1
                    ref = None
                elif not _image_ok(data):
                    counts["images_undecodable"] += 1
                    ref = None
            if require_text and not has_text:
                counts["items_dropped_no_text"] += 1
            elif require_images and ref is None:
                counts["items_dropped_no_image"] += 1
            else:
                checked.append((item, text, ref))

        kept_items = {item for item, _, _ in checked}
        kept = frame["item"].isin(kept_items).to_numpy()
        counts["interactions_dropped_item"] = int((~kept).sum())
        frame = frame[kept]
        counts["users_all_interactions_dropped"] = len(users_read) - frame["user"].nunique()

        # ---- sequences: users in order of first interaction, then time, then table order
        frame = frame.assign(user_code=pd.factorize(frame["user"], sort=False)[0])
        frame = frame.sort_values(["user_code", "key", "row"], kind="stable")
        users = frame["user"].to_numpy()
        item_col_values = frame["item"].to_numpy()
        time_values_sorted = frame["time"].to_numpy()
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], dtype=int)
        ends = np.r_[starts[1:], len(users)] if len(users) else np.array([], dtype=int)
        triples = (
            (users[a], item_col_values[a:b].tolist(), time_values_sorted[a:b].tolist())
            for a, b in zip(starts.tolist(), ends.tolist())
        )
        splits, split_counts = build_splits(
            tqdm(triples, total=len(starts), desc="building sequences", unit="user", disable=not progress),
            max_length,
            min_length,
        )
        counts.update(split_counts)

        in_sequences = {item for seq in splits["test"]["item_ids"] for item in seq}
        final = [(item, text, ref) for item, text, ref in checked if item in in_sequences]
        counts["items_unused"] = len(checked) - len(final)
        counts["items"] = len(final)
        if counts["users"] == 0:
            reason = _why_nothing_kept(
                counts, inter_label=inter_label, items_label=items_label, time_col=time_col, time_format=time_format,
                bad_time_examples=bad_time_examples if time_col is not None else [], min_length=min_length,
            )
            nonzero = {k: v for k, v in counts.items() if v}
            raise ValueError(f"the import keeps nothing, so nothing was written to {output_dir}: {reason}. Counts: {nonzero}")
        counts["items_with_text"] = sum(1 for _, text, _ in final if text)
        counts["items_with_image"] = sum(1 for _, _, ref in final if ref is not None)
        _check_balance(counts)

        item_rows = {
            "item_id": [item for item, _, _ in final],
            "text": [text for _, text, _ in final],
            "image": [None if ref is None else partial(images.load_struct, ref) for _, _, ref in final],
        }
        metadata = {
            "name": name,
            "max_length": max_length,
            "min_length": min_length,
            "counts": counts,
            "options": {
                "require_text": require_text,
                "require_images": require_images,
                "unknown_items": unknown_items,
                "max_users": max_users,
                "encoding": encoding,
            },
            "source": {
                "interactions": inter_label,
                "items": items_label,
                "user_col": user_col,
                "item_col": item_col,
                "time_col": time_col,
                "item_id_col": item_id_col,
                "text": {"template": text_template} if text_template is not None else {
                    "columns": text_fields, "separator": text_separator},
                **dict(source_info or {}),
            },
            "image_source": images.describe() if images is not None else None,
        }
        written = save_prepared(
            output_dir, item_rows, splits, metadata,
            max_rows_per_file=max_rows_per_file, num_shards=num_shards, progress=progress, overwrite=overwrite,
        )
    finally:
        if images is not None:
            images.close()

    result = PrepareResult(Path(output_dir), written)
    if push_to_hub is not None:
        result.hub_url = push_prepared_to_hub(output_dir, push_to_hub, token=token, private=private)
    if verbose:
        print(result.summary(), file=sys.stdout, flush=True)
    return result


def _why_nothing_kept(
    c: Mapping[str, int], *, inter_label: str, items_label: str, time_col: str | None, time_format: str | None,
    bad_time_examples: list, min_length: int,
) -> str:
    """Why an import that keeps no user kept nothing: the first step of the pipeline that left no interaction."""
    left = c["interactions_read"]
    if left == 0:
        return f"the interactions table {inter_label} has no rows (an empty or header-only file?)"
    left -= c["interactions_outside_user_slice"] + c["interactions_missing_field"]
    if left <= 0:
        return (f"every interaction lacks a user, an item or a time (interactions_missing_field="
                f"{c['interactions_missing_field']}); check user_col / item_col / time_col (CLI --user-col / "
                "--item-col / --time-col)")
    left -= c["interactions_bad_time"]
    if left <= 0:
        why = f"no interaction has a readable time in column {time_col!r} (interactions_bad_time={c['interactions_bad_time']}"
        why += f", e.g. {bad_time_examples})" if bad_time_examples else ")"
        if time_format is not None:
            why += f": time_format {time_format!r} (CLI --time-format) matches none of them"
        return why
    left -= c["interactions_duplicate"] + c["interactions_unknown_item"]
    if left <= 0:
        if c["items_read"] == 0:
            return f"the items table {items_label} has no rows (an empty or header-only file?)"
        return (f"no interaction names an item of the items table {items_label} (interactions_unknown_item="
                f"{c['interactions_unknown_item']}); check item_col / item_id_col (CLI --item-col / --item-id-col), or "
                "keep such items with unknown_items='keep' (CLI --unknown-items keep)")
    left -= c["interactions_dropped_item"]
    if left <= 0:
        dropped = {k: c[k] for k in ("texts_missing", "images_missing", "images_undecodable", "items_dropped_no_text",
                                     "items_dropped_no_image") if c[k]}
        return (f"every item with interactions was dropped by require_text / require_images (CLI --require-text / "
                f"--require-images): {dropped}")
    return (f"every user has fewer than min_length={min_length} interactions (users_too_short={c['users_too_short']}; "
            "CLI --min-length)")


def _check_balance(c: Mapping[str, int]) -> None:
    """Every interaction, item and user read is either kept or under exactly one skip count."""
    interactions = c["interactions_read"] - sum(
        c[k] for k in (
            "interactions_outside_user_slice", "interactions_missing_field", "interactions_bad_time",
            "interactions_duplicate", "interactions_unknown_item", "interactions_dropped_item",
            "interactions_too_short_users", "interactions_truncated",
        )
    )
    items = (
        c["items_read"] + c["items_added_from_interactions"]
        - sum(c[k] for k in ("items_missing_id", "items_duplicate", "items_without_interactions",
                             "items_dropped_no_text", "items_dropped_no_image", "items_unused"))
    )
    users = c["users_read"] - c["users_all_interactions_dropped"] - c["users_too_short"]
    if (interactions, items, users) != (c["interactions"], c["items"], c["users"]):  # pragma: no cover - a bug
        raise AssertionError(f"counts do not add up: {dict(c)}")
