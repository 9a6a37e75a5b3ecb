"""Readers for interaction files that hold whole sequences instead of one row per interaction.

Two formats many public recommendation datasets use:

- **user sequences**: one line per user, ``<user id> <item 1> <item 2> ... <item n>`` (whitespace or a given
  separator), chronological; the position is the only order (e.g. the Amazon 5-core ``user_sequence.txt``).
- **RecBole / UniSRec sequential benchmark**: tab-separated files with a typed header,
  ``user_id:token \\t item_id_list:token_seq \\t item_id:token``: one row per user and file, the history
  (space-separated, chronological) then the target (e.g. ``Games-6k.valid.inter`` and ``.test.inter``).

Both readers return an interactions table with columns ``user_id``, ``item_id`` and ``position`` (0, 1, ...
per user: the timestamp ``prepare_dataset`` sorts by), and in ``df.attrs["source_counts"]`` how many source
lines / rows were read, skipped or merged, which ``prepare_dataset`` adds to the dataset's counts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["INTERACTION_FORMATS", "read_interactions", "read_sequence_benchmark", "read_user_sequences"]

INTERACTION_FORMATS = ("table", "user-sequences", "recbole-sequential")

SOURCE_COUNT_NAMES = (
    "source_lines_read",
    "source_lines_skipped",
    "source_rows_merged",
    "source_rows_conflicting",
)


def _paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    paths = [Path(p) for p in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    return paths


def _lines(path: Path, encoding: str):
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}: line {number}, byte {err.start + 1} of that line is not valid {encoding} text; pass "
                    "encoding='latin-1' (CLI: --encoding latin-1) or the file's real encoding"
                ) from err


def _table(rows: list[tuple[str, str, int]], label: str, counts: dict[str, int]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "position"])
    df["position"] = df["position"].astype("int64")
    df.attrs["source"] = label
    df.attrs["source_counts"] = {name: int(counts.get(name, 0)) for name in SOURCE_COUNT_NAMES}
    return df


def read_user_sequences(
    source: str | os.PathLike | Sequence[str | os.PathLike], separator: str | None = None, encoding: str = "utf-8",
) -> pd.DataFrame:
    """Interactions from files of one line per user: ``<user id> <item 1> ... <item n>``.

    `separator`: the field separator (default: any whitespace). Skipped and counted in
    ``source_lines_skipped``: blank lines, a line with a user and no item, and a later line of a user already
    read (the first line is the user's sequence; a user's lines are never concatenated, since their order
    is unknown).
    """
    counts = dict.fromkeys(SOURCE_COUNT_NAMES, 0)
    rows: list[tuple[str, str, int]] = []
    seen: set[str] = set()
    paths = _paths(source)
    for path in paths:
        for _, line in _lines(path, encoding):
            counts["source_lines_read"] += 1
            fields = [f for f in (line.split(separator) if separator else line.split()) if f != ""]
            if len(fields) < 2 or fields[0] in seen:
                counts["source_lines_skipped"] += 1
                continue
            user = fields[0]
            seen.add(user)
            rows.extend((user, item, position) for position, item in enumerate(fields[1:]))
    return _table(rows, " + ".join(str(p) for p in paths) + " (one line per user)", counts)


def _column(header: list[str], name: str, path: Path) -> int:
    for index, column in enumerate(header):
        if column.split(":")[0] == name:
            return index
    raise ValueError(f"{path}: missing column {name!r} (sequential benchmark header); the columns are {header}")


def read_sequence_benchmark(
    source: str | os.PathLike | Sequence[str | os.PathLike], encoding: str = "utf-8",
    user_col: str = "user_id", history_col: str = "item_id_list", target_col: str = "item_id",
) -> pd.DataFrame:
    """Interactions from RecBole / UniSRec sequential-benchmark files (``user_id:token``,
    ``item_id_list:token_seq``, ``item_id:token``; tab-separated, typed header).

    Each row is a user's history followed by its target. The rows of one user across the files (e.g. the
    validation and test files) are merged into one sequence: the longest row (of the later file, on a tie) is
    the sequence; a row that is
    its prefix adds nothing, and a row of the same length shifted one item earlier (what a length cap makes of
    the validation row: the window starts one item before the test row's) adds that earlier item; both are
    counted in ``source_rows_merged``. Any other row of the user disagrees with the longest one: dropped and
    counted in ``source_rows_conflicting``. A row without a user or a target is skipped
    (``source_lines_skipped``).
    """
    counts = dict.fromkeys(SOURCE_COUNT_NAMES, 0)
    sequences: dict[str, list[list[str]]] = {}
    paths = _paths(source)
    for path in paths:
        lines = _lines(path, encoding)
        try:
            _, header_line = next(lines)
        except StopIteration:
            continue
        header = header_line.split("\t")
        user_at, history_at, target_at = (_column(header, n, path) for n in (user_col, history_col, target_col))
        for _, line in lines:
            counts["source_lines_read"] += 1
            fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE)) if line else []
            get = (lambda i: fields[i].strip() if i < len(fields) else "")  # noqa: E731
            user, target = get(user_at), get(target_at)
            if not user or not target:
                counts["source_lines_skipped"] += 1
                continue
            sequences.setdefault(user, []).append(get(history_at).split() + [target])
    rows: list[tuple[str, str, int]] = []
    for user, candidates in sequences.items():
        longest = max(reversed(candidates), key=len)  # on a tie, the row of the later file (test after valid)
        merged, extended = list(longest), False
        for other in candidates:
            if other is longest:
                continue
            if other == longest[: len(other)]:
                counts["source_rows_merged"] += 1
            elif len(other) == len(longest) and other[1:] == longest[:-1] and not extended:
                counts["source_rows_merged"] += 1
                merged, extended = other[:1] + merged, True
            else:
                counts["source_rows_conflicting"] += 1
        rows.extend((user, item, position) for position, item in enumerate(merged))
    return _table(rows, " + ".join(str(p) for p in paths) + " (sequential benchmark rows)", counts)


def read_interactions(source, interactions_format: str = "table", **kwargs) -> pd.DataFrame | None:
    """The sequence formats' readers by name (`INTERACTION_FORMATS`); None for ``"table"`` (read_table's job)."""
    if interactions_format not in INTERACTION_FORMATS:
        raise ValueError(f"`interactions_format` must be one of {INTERACTION_FORMATS}, got {interactions_format!r}.")
    if interactions_format == "user-sequences":
        return read_user_sequences(source, **kwargs)
    if interactions_format == "recbole-sequential":
        return read_sequence_benchmark(source, **kwargs)
    return None
