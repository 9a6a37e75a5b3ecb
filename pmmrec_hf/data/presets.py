"""Importers for known source layouts: each preset turns a source folder into ``prepare_dataset`` options.

| preset | source folder holds |
|---|---|
| ``movielens-100k`` | ``ml-100k/u.data``, ``tmdb_items.csv``, ``posters/<movie_id>.jpg`` |
| ``movielens-1m`` | RecBole ``ml-1m.inter`` + ``ml-1m.item`` (item ids are titles); posters and synopses come from a ``movielens-100k`` folder by exact title |
| ``hm`` | H&M ``transactions.csv``, ``articles.csv``, ``images/<first 3 digits>/<article_id>.jpg`` |
| ``amazon-office`` | ``train.csv``/``dev.csv``/``test.csv`` (``user_id \\t item_id \\t time``), ``Office.text``, ``Office.item2index`` |
| ``pmmrec`` | research-code layout: ``users.tsv``, ``items_texts.tsv``, an LMDB of images |
| ``recbole`` | RecBole atomic files ``<name>.inter`` + ``<name>.item`` |
| ``amazon-beauty`` | ``user_sequence.txt`` (one line per user) + RecBole ``Amazon_Beauty.item`` (quoted TSV) |
| ``amazon-games`` | UniSRec/RecBole sequential ``Games-6k.valid.inter`` + ``Games-6k.test.inter`` + ``Games-6k.item`` |
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .prepare import (
    _TYPED_HEADER,
    PrepareResult,
    _check_encoding,
    check_output_outside_inputs,
    prepare_dataset,
    read_table,
)

__all__ = ["PRESETS", "Preset", "prepare_preset", "preset_kwargs"]


@dataclass(frozen=True)
class Preset:
    """A named source layout: ``build(source, **options)`` returns ``prepare_dataset`` keyword
    arguments (``interactions`` and ``items`` included); ``options`` names the preset's own options."""

    name: str
    description: str
    build: Callable[..., dict]
    options: tuple[str, ...] = ()


def _frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    df.attrs["source"] = source
    return df


# ---- MovieLens-100K ------------------------------------------------------------------------------

_ML100K_GENRES = {  # tmdb_items.csv genre flag columns -> the names used in MovieLens
    "Action": "Action", "Adventure": "Adventure", "Animation": "Animation", "Children": "Children's",
    "Comedy": "Comedy", "Crime": "Crime", "Documentary": "Documentary", "Drama": "Drama",
    "Fantasy": "Fantasy", "FilmNoir": "Film-Noir", "Horror": "Horror", "Musical": "Musical",
    "Mystery": "Mystery", "Romance": "Romance", "SciFi": "Sci-Fi", "Thriller": "Thriller", "War": "War",
    "Western": "Western",
}


def _tmdb_items(folder: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """tmdb_items.csv with a ``genres`` column ("Animation, Children's, Comedy"); duplicates kept (the
    importer drops and counts them)."""
    df = read_table(folder / "tmdb_items.csv", encoding=encoding)
    flags = [c for c in _ML100K_GENRES if c in df.columns]
    genres = df[flags].fillna("0").eq("1")
    df["genres"] = [", ".join(_ML100K_GENRES[c] for c, on in zip(flags, row) if on) for row in genres.to_numpy()]
    return _frame(df, f"{folder / 'tmdb_items.csv'} (+ genres from its flag columns)")


def _movielens_100k(source: Path, encoding: str = "utf-8") -> dict:
    return dict(
        name="movielens-100k",
        interactions=source / "ml-100k" / "u.data",
        interactions_columns=["user_id", "item_id", "rating", "timestamp"],
        items=_tmdb_items(source, encoding),
        item_id_col="movie_id",
        text_template="{title}. {genres}. {overview}",
        image_pattern="posters/{item_id}.jpg",
        image_root=source,
    )


# ---- MovieLens-1M (RecBole files, joined to the 100K posters and synopses by exact title) ---------


def _movielens_1m(source: Path, movielens_100k_dir: str | os.PathLike | None = "auto", encoding: str = "utf-8") -> dict:
    items = read_table(source / "ml-1m.item", encoding=encoding)
    items["genres"] = [", ".join(str(g).split()) if isinstance(g, str) else "" for g in items["genre"]]
    info: dict[str, Any] = {}
    if movielens_100k_dir == "auto":
        movielens_100k_dir = source.parent / "movielens-100k"
        if not movielens_100k_dir.is_dir():
            raise FileNotFoundError(
                f"{movielens_100k_dir}: the movielens-100k folder (posters, synopses) is not there; pass "
                "movielens_100k_dir=<folder> (CLI: --movielens-100k-dir) or None to import without them"
            )
    if movielens_100k_dir is not None:
        ml100k = Path(movielens_100k_dir)
        tmdb = read_table(ml100k / "tmdb_items.csv", encoding=encoding).drop_duplicates("movie_id")
        tmdb["poster"] = [ml100k / "posters" / f"{m}.jpg" for m in tmdb["movie_id"]]
        tmdb["has_poster"] = [p.is_file() for p in tmdb["poster"]]
        tmdb["movie_number"] = pd.to_numeric(tmdb["movie_id"])
        # one 100K movie per title: the lowest movie_id with a poster, else the lowest movie_id
        tmdb = tmdb.sort_values(["has_poster", "movie_number"], ascending=[False, True], kind="stable")
        tmdb = tmdb.drop_duplicates("title").set_index("title")
        match = items["item_id"].map(tmdb["movie_id"])
        items["movielens_100k_id"] = match
        items["overview"] = items["item_id"].map(tmdb["overview"])
        items["image"] = [  # relative to the image root, the movielens-100k folder
            str(tmdb.at[t, "poster"].relative_to(ml100k)) if isinstance(m, str) and tmdb.at[t, "has_poster"] else None
            for t, m in zip(items["item_id"], match)
        ]
        info = {"movielens_100k_dir": str(ml100k), "titles_matched": int(match.notna().sum())}
    else:
        items["overview"] = None
        items["image"] = None
    return dict(
        name="movielens-1m",
        interactions=source / "ml-1m.inter",
        items=_frame(items, f"{source / 'ml-1m.item'} (+ movielens-100k synopses and posters by exact title)"),
        text_template="{item_id}. {genres}. {overview}",
        image_col="image",
        image_root=ml100k if movielens_100k_dir is not None else source,
        source_info=info,
    )


# ---- H&M -------------------------------------------------------------------------------------------


def _hm(source: Path, encoding: str = "utf-8") -> dict:
    return dict(
        name="hm",
        interactions=source / "transactions.csv",
        user_col="customer_id",
        item_col="article_id",
        time_col="t_dat",
        items=source / "articles.csv",
        text_template="{prod_name}. {product_type_name}. {colour_group_name}. {detail_desc}",
        image_pattern="images/{item_id:.3}/{item_id}.jpg",
        image_root=source,
        # purchased articles without a row in articles.csv stay, with "" text (texts_missing) and their
        # photo if one exists (images_missing otherwise); require_text / require_images drop them
        unknown_items="keep",
    )


# ---- Amazon Office (rebuilt leave-one-out from train + dev + test) --------------------------------


def _amazon_office(source: Path, encoding: str = "utf-8") -> dict:
    files = [source / f for f in ("train.csv", "dev.csv", "test.csv")]
    inter = read_table(files, sep="\t", usecols=["user_id", "item_id", "time"], encoding=encoding)  # tab-separated despite .csv
    index = read_table(source / "Office.item2index", columns=["asin", "item_id"], encoding=encoding)
    asin = dict(zip(index["item_id"], index["asin"]))
    # integer ids -> ASINs; an id absent from Office.item2index stays as written (an unknown item)
    inter["item_id"] = [asin.get(i, i) if isinstance(i, str) else i for i in inter["item_id"]]
    texts = read_table(source / "Office.text", encoding=encoding)
    return dict(
        name="amazon-office",
        interactions=_frame(inter, " + ".join(str(f) for f in files) + " (item ids mapped to ASINs)"),
        user_col="user_id",
        item_col="item_id",
        time_col="time",
        items=texts,
        item_id_col="id",
        text_cols=["text"],
        source_info={"split": "rebuilt leave-one-out from train + dev + test (the source's split is not reused)"},
    )


# ---- PMMRec research-code layout -------------------------------------------------------------------


def _find_lmdb(source: Path) -> Path | None:
    candidates = sorted(p for p in source.iterdir() if p.suffix == ".lmdb" or (p / "data.mdb").is_file())
    return candidates[0] if candidates else None


def _pmmrec(source: Path, lmdb_path: str | os.PathLike | None = "auto", encoding: str = "utf-8") -> dict:
    users_file, items_file = source / "users.tsv", source / "items_texts.tsv"
    raw = read_table(users_file, columns=["user_id", "items"], encoding=encoding)
    if len(raw) and raw.iloc[0]["user_id"] == "user_id":  # a header line
        raw = raw.iloc[1:]
    rows = []
    for user, sequence in zip(raw["user_id"], raw["items"]):
        for position, item in enumerate(sequence.split() if isinstance(sequence, str) else []):
            rows.append((user, item, position))
    inter = _frame(pd.DataFrame(rows, columns=["user_id", "item_id", "position"]), str(users_file))
    items = read_table(items_file, columns=["item_id", "title"], encoding=encoding)
    if len(items) and items.iloc[0]["item_id"] == "item_id":
        items = items.iloc[1:].reset_index(drop=True)
    items = _frame(items, str(items_file))
    if lmdb_path == "auto":
        lmdb_path = _find_lmdb(source)
    return dict(
        name="pmmrec",
        interactions=inter,
        time_col="position",  # users.tsv is time-ordered; the position is the timestamp
        items=items,
        text_cols=["title"],
        image_lmdb=lmdb_path,
    )


# ---- RecBole atomic files --------------------------------------------------------------------------


def _header(path: Path, encoding: str) -> list[str]:
    """The tab-separated header line of a RecBole atomic file; a decode error names the file and the option."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as handle:
        raw = handle.readline()
    try:
        return raw.decode(encoding).rstrip("\r\n").split("\t")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: line 1 (the header) is not valid {encoding} text ({err.reason} at byte {err.start + 1}); pass "
            "encoding='latin-1' (CLI: --encoding latin-1) or the file's real encoding"
        ) from err


def _recbole(source: Path, dataset_name: str | None = None, encoding: str = "utf-8") -> dict:
    if dataset_name is None:
        found = sorted(source.glob("*.inter"))
        if len(found) != 1:
            raise ValueError(f"{source}: expected one .inter file, found {[p.name for p in found]}; pass dataset_name")
        dataset_name = found[0].stem
    inter_file, item_file = source / f"{dataset_name}.inter", source / f"{dataset_name}.item"
    header = _header(item_file, encoding)
    text_cols = []
    for column in header:
        match = _TYPED_HEADER.match(column)
        if match and match.group(2) in ("token", "token_seq") and match.group(1) != "item_id":
            text_cols.append(match.group(1))
    inter_header = _header(inter_file, encoding)
    has_time = any(c.split(":")[0] == "timestamp" for c in inter_header)
    return dict(
        name=dataset_name,
        interactions=inter_file,
        items=item_file,
        time_col="timestamp" if has_time else None,
        text_cols=text_cols,
        text_separator=". ",
    )


# ---- Amazon 5-core, one line of items per user (Beauty) ------------------------------------------------


def _category_list(value) -> str:
    """RecBole's ``'Beauty', 'Makeup', 'Face'`` -> ``Beauty, Makeup, Face``."""
    if not isinstance(value, str):
        return ""
    parts = [part.strip().strip("'\"").strip() for part in value.split("', '")]
    return ", ".join(part for part in parts if part)


def _amazon_beauty(source: Path, encoding: str = "utf-8") -> dict:
    items = read_table(source / "Amazon_Beauty.item", quoted=True, encoding=encoding)
    items["categories"] = [_category_list(v) for v in items["categories"]]
    return dict(
        name="amazon-beauty",
        interactions=source / "user_sequence.txt",
        interactions_format="user-sequences",
        items=_frame(items, f"{source / 'Amazon_Beauty.item'} (categories as a list of names)"),
        text_template="{title}. {categories}. {brand}",
        source_info={"order": "position in user_sequence.txt (the source has no timestamps)"},
    )


# ---- Amazon Video Games, UniSRec / RecBole sequential-benchmark files ------------------------------------


def _amazon_games(source: Path, dataset_name: str | None = None, encoding: str = "utf-8") -> dict:
    if dataset_name is None:
        found = sorted(p.name[: -len(".test.inter")] for p in source.glob("*.test.inter"))
        if len(found) != 1:
            raise ValueError(f"{source}: expected one *.test.inter file, found {found}; pass dataset_name")
        dataset_name = found[0]
    inter = [source / f"{dataset_name}.{part}.inter" for part in ("valid", "test")]
    return dict(
        name="amazon-games",
        interactions=[path for path in inter if path.is_file()],
        interactions_format="recbole-sequential",
        items=source / f"{dataset_name}.item",
        text_cols=["title"],
        source_info={"order": "position in the merged valid + test rows (the source has no timestamps)"},
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("movielens-100k", "MovieLens-100K ratings; title + genres + TMDB synopsis; TMDB posters",
               _movielens_100k),
        Preset("movielens-1m", "MovieLens-1M RecBole files joined to the 100K posters/synopses by title",
               _movielens_1m, ("movielens_100k_dir",)),
        Preset("hm", "H&M transactions; article name/type/colour/description; product photos", _hm),
        Preset("amazon-office", "Amazon Office (train+dev+test re-split leave-one-out); text only", _amazon_office),
        Preset("pmmrec", "PMMRec research layout: users.tsv, items_texts.tsv, images in LMDB", _pmmrec, ("lmdb_path",)),
        Preset("recbole", "RecBole atomic files <name>.inter + <name>.item", _recbole, ("dataset_name",)),
        Preset("amazon-beauty", "Amazon Beauty 5-core: one line of items per user; title + categories + brand",
               _amazon_beauty),
        Preset("amazon-games", "Amazon Video Games: UniSRec/RecBole sequential benchmark files; titles",
               _amazon_games, ("dataset_name",)),
    )
}


def preset_kwargs(name: str, source: str | os.PathLike, *, encoding: str = "utf-8", **options: Any) -> dict:
    """The ``prepare_dataset`` keyword arguments of preset ``name`` on ``source``; ``options`` are the
    preset's own options (``Preset.options``); ``encoding``: the text encoding of every file the preset reads."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    preset = PRESETS[name]
    unknown = set(options) - set(preset.options)
    if unknown:
        raise TypeError(f"preset {name!r} has no option(s) {sorted(unknown)}; its options: {list(preset.options)}")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such source folder")
    _check_encoding(encoding)
    kwargs = preset.build(source, encoding=encoding, **options)
    kwargs["encoding"] = encoding
    kwargs["source_info"] = {"preset": name, "folder": str(source), **kwargs.get("source_info", {})}
    return kwargs


def prepare_preset(name: str, source: str | os.PathLike, output_dir: str | os.PathLike, **kwargs: Any) -> PrepareResult:
    """Import ``source`` with preset ``name`` into ``output_dir``. Keyword arguments naming the preset's
    own options go to it; the others are ``prepare_dataset`` options and override the preset's
    (e.g. ``max_users=50``, ``require_images=True``, ``max_length=50``)."""
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    check_output_outside_inputs(output_dir, [], source_root=source)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in preset.options}
    options = preset_kwargs(name, source, encoding=kwargs.get("encoding", "utf-8"), **own)
    options.update(kwargs)
    interactions, items = options.pop("interactions"), options.pop("items")
    return prepare_dataset(interactions, items, output_dir, **options)
