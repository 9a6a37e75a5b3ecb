"""``pmmrec-prepare``: import a dataset into the prepared format (docs/formats.md).

Examples::

    pmmrec-prepare --preset movielens-100k --source ../shared/data/movielens-100k --output data/ml-100k
    pmmrec-prepare --preset hm --source ../shared/data/hm-fashion --output data/hm --require-text --require-images
    pmmrec-prepare --interactions inter.csv --items movies.jsonl --output data/mine \\
        --user-col uid --item-col mid --time-col ts --text-template "{title}. {genres}" \\
        --image-pattern "posters/{item_id}.jpg" --image-root ./media
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..hub import PMMRecPublishError
from .format import DEFAULT_MAX_ROWS_PER_FILE
from .prepare import DEFAULT_MAX_LENGTH, DEFAULT_MIN_LENGTH, prepare_dataset
from .presets import PRESETS, prepare_preset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmmrec-prepare",
        description="Import interactions and items into a PMMRec prepared dataset folder.",
        epilog="Presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    src = parser.add_argument_group("source (a preset, or the generic importer's tables)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a known source layout (needs --source)")
    src.add_argument("--source", help="the preset's source folder")
    src.add_argument("--movielens-100k-dir", help="movielens-1m: the movielens-100k folder giving posters "
                     "and synopses (default: a sibling folder); 'none' to import without them")
    src.add_argument("--lmdb", dest="lmdb_path", help="pmmrec: the images LMDB (default: the one in --source)")
    src.add_argument("--dataset-name", help="recbole / amazon-games: the files' stem (default: the only "
                     ".inter / .test.inter)")
    src.add_argument("--interactions", nargs="+", help="interaction file(s) (CSV, TSV, Parquet, JSON lines)")
    src.add_argument("--interactions-format", choices=["table", "user-sequences", "recbole-sequential"],
                     help="table (default: one row per interaction), user-sequences (one line per user: "
                          "'<user> <item 1> ... <item n>'), recbole-sequential (user_id:token, item_id_list:token_seq, "
                          "item_id:token rows; a user's rows in several files are merged)")
    src.add_argument("--items-quoted", action="store_true",
                     help="the items TSV quotes fields that hold tabs or newlines (RecBole files written by pandas)")
    src.add_argument("--items", help="the items file")
    src.add_argument("--user-col", help="default: user_id")
    src.add_argument("--item-col", help="default: item_id")
    src.add_argument("--time-col", help="default: timestamp; 'none' for file order")
    src.add_argument("--item-id-col", help="the items file's id column (default: --item-col)")
    src.add_argument("--text-cols", nargs="+", help="item text columns, joined with --text-separator")
    src.add_argument("--text-separator", help="default: a space")
    src.add_argument("--text-template", help="item text template, e.g. '{title}. {genres}'")
    src.add_argument("--image-col", help="column with image paths (or bytes)")
    src.add_argument("--image-pattern", help="image path template, e.g. 'posters/{item_id}.jpg'")
    src.add_argument("--image-root", help="folder the image paths are relative to (default: the items file's)")
    src.add_argument("--image-lmdb", help="an LMDB of pickled uint8 image arrays keyed by item id")
    src.add_argument("--interactions-sep", help="separator overriding the extension's (e.g. '\\t')")
    src.add_argument("--items-sep", help="separator overriding the extension's")
    src.add_argument("--interactions-columns", nargs="+", help="column names of a header-less interactions file")
    src.add_argument("--items-columns", nargs="+", help="column names of a header-less items file")
    src.add_argument("--encoding", help="text encoding of CSV/TSV/JSON files (default utf-8; e.g. latin-1)")
    src.add_argument("--time-format", help="strftime format of date times (default: parsed automatically)")

    out = parser.add_argument_group("output and policy")
    out.add_argument("--output", required=True, help="the prepared folder to write")
    out.add_argument("--name", help="dataset name stored in the metadata")
    out.add_argument("--max-length", type=int,
                     help=f"L (default {DEFAULT_MAX_LENGTH}): the last L+3 interactions are kept")
    out.add_argument("--min-length", type=int,
                     help=f"users with fewer interactions are dropped (default {DEFAULT_MIN_LENGTH})")
    out.add_argument("--require-text", action="store_true", default=None, help="drop items without text")
    out.add_argument("--require-images", action="store_true", default=None, help="drop items without a decodable image")
    out.add_argument("--unknown-items", choices=["drop", "keep"],
                     help="interactions naming items absent from the items table: drop them (default) "
                     "or keep the items")
    out.add_argument("--max-users", type=int, help="keep only the first N users in file order (a quick slice)")
    out.add_argument("--max-rows-per-file", type=int, help=f"rows per split file (default {DEFAULT_MAX_ROWS_PER_FILE})")
    out.add_argument("--num-shards", type=int, help="exactly this many files per split")
    out.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder as a Hub dataset repository")
    out.add_argument("--token", help="Hub token (default: the logged-in one)")
    out.add_argument("--private", action="store_true", default=None, help="create the Hub repository private")
    out.add_argument("--allow-outside-paths", action="store_true", default=None,
                     help="trusted data only: let image paths from the data leave --image-root ('../', absolute paths)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--overwrite", action="store_true",
                     help="write into an existing --output folder that is not a prepared dataset (its files named "
                          "like a prepared dataset's are replaced)")
    return parser


_GENERIC = (
    "user_col", "item_col", "time_col", "item_id_col", "text_cols", "text_separator", "text_template",
    "image_col", "image_pattern", "image_root", "image_lmdb", "interactions_sep", "items_sep",
    "interactions_columns", "items_columns", "interactions_format", "encoding", "time_format", "name", "max_length",
    "min_length",
    "require_text", "require_images", "unknown_items", "max_users", "max_rows_per_file", "num_shards", "token",
    "private", "allow_outside_paths",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in _GENERIC if getattr(args, k) is not None}
    if args.items_quoted:
        options["items_quoted"] = True
    if options.get("time_col", "").lower() == "none":
        options["time_col"] = None
    for key in ("interactions_sep", "items_sep"):
        if key in options:
            options[key] = options[key].encode().decode("unicode_escape")  # '\t' typed on a shell
    common = dict(push_to_hub=args.push_to_hub, progress=not args.no_progress, verbose=True)
    if args.overwrite:
        common["overwrite"] = True
    try:
        if args.preset is not None:
            if args.source is None:
                parser.error("--preset needs --source")
            if args.interactions or args.items:
                parser.error("give --preset or --interactions/--items, not both")
            own = {}
            if args.movielens_100k_dir is not None:
                value = args.movielens_100k_dir
                own["movielens_100k_dir"] = None if value.lower() == "none" else value
            if args.lmdb_path is not None:
                own["lmdb_path"] = args.lmdb_path
            if args.dataset_name is not None:
                own["dataset_name"] = args.dataset_name
            unknown = set(own) - set(PRESETS[args.preset].options)
            if unknown:
                flags = ", ".join("--" + k.replace("_", "-") for k in sorted(unknown))
                parser.error(f"preset {args.preset} takes no {flags}")
            prepare_preset(args.preset, args.source, args.output, **own, **options, **common)
        else:
            if not args.interactions or not args.items:
                parser.error("give --preset and --source, or --interactions and --items")
            interactions = args.interactions[0] if len(args.interactions) == 1 else args.interactions
            prepare_dataset(interactions, args.items, args.output, **options, **common)
    except (ValueError, OSError, PMMRecPublishError) as err:  # (OSError: e.g. a permission denied, naming the path)
        print(f"pmmrec-prepare: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
