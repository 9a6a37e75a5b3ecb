"""The presets on the real datasets in ../shared/data (research use only: read in place, nothing copied).

Expected numbers were computed from the raw files with plain Python (csv module, no pandas, none of
this package), either here in the test or once by hand, and are written out literally.
Skipped when the data folder is absent (set PMMREC_SHARED_DATA to point elsewhere).
"""

import csv
import os
from pathlib import Path

import pytest

from pmmrec_hf.data import load_items, load_prepared, prepare_preset

DATA = Path(os.environ.get("PMMREC_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real datasets not found at {DATA} (set PMMREC_SHARED_DATA)"),
]


def _need(folder: str) -> Path:
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def _prepare(tmp_path, preset, folder, **kwargs):
    return prepare_preset(preset, _need(folder), tmp_path / preset, progress=False, verbose=False, **kwargs)


def _test_rows(result, tmp_path):
    ds = load_prepared(result.folder, split="test", cache_dir=tmp_path / "hf-cache")
    return {r["user_id"]: r["item_ids"] for r in ds}


def _valid_rows(result, tmp_path):
    ds = load_prepared(result.folder, split="validation", cache_dir=tmp_path / "hf-cache")
    return {r["user_id"]: r["item_ids"] for r in ds}


def _plain_sequences(rows):
    """{user: items sorted by (time, file row)} from (user, item, time, row) tuples, users in first-seen order."""
    seqs = {}
    for user, item, time, row in rows:
        seqs.setdefault(user, []).append((time, row, item))
    return {u: [i for _, _, i in sorted(v)] for u, v in seqs.items()}


def test_movielens_100k_full(tmp_path):
    result = _prepare(tmp_path, "movielens-100k", "movielens-100k")
    c = result.counts
    assert (c["users"], c["items"], c["interactions"]) == (943, 1409, 21522)
    assert (c["interactions_read"], c["interactions_truncated"], c["users_too_short"]) == (100000, 78478, 0)
    assert (c["items_read"], c["items_duplicate"], c["items_unused"]) == (1746, 64, 273)  # 64 duplicated tmdb rows
    assert (c["images_missing"], c["images_undecodable"], c["items_with_image"], c["texts_missing"]) == (19, 0, 1399, 0)

    # every user's kept sequence, recomputed from u.data with plain Python
    with open(DATA / "movielens-100k" / "ml-100k" / "u.data") as f:
        raw = [(u, i, int(t), n) for n, (u, i, _, t) in enumerate(line.rstrip("\n").split("\t") for line in f)]
    expected = {u: s[-23:] for u, s in _plain_sequences(raw).items()}
    test = _test_rows(result, tmp_path)
    assert test == expected
    # targets checked by hand against u.data: (validation target, test target)
    valid = _valid_rows(result, tmp_path)
    for user, val_target, test_target in [("196", "94", "110"), ("1", "74", "102"), ("943", "228", "234")]:
        assert valid[user][-1] == val_target and test[user][-1] == test_target

    items, index = load_items(result.folder, cache_dir=tmp_path / "hf-cache")
    posters = DATA / "movielens-100k" / "posters"
    assert sum((posters / f"{i}.jpg").is_file() for i in index) == 1399
    toy_story = items[index["1"]]
    assert toy_story["text"].startswith("Toy Story (1995). Animation, Children's, Comedy. Led by Woody")
    assert toy_story["image"].size == (92, 138)


@pytest.mark.slow
def test_movielens_1m_first_300_users(tmp_path):
    result = _prepare(tmp_path, "movielens-1m", "movielens-1m", max_users=300)
    c = result.counts
    assert (c["interactions_read"], c["interactions_outside_user_slice"]) == (1000209, 1000209 - 43745)
    assert (c["users"], c["items"], c["interactions"], c["users_too_short"]) == (300, 1906, 6873, 0)
    assert c["items_with_image"] == 835  # items whose exact title has a movielens-100k poster
    test, valid = _test_rows(result, tmp_path), _valid_rows(result, tmp_path)
    assert list(test)[:3] == ["1m_1", "1m_2", "1m_3"]
    for user, val_target, test_target in [
        ("1m_1", "Mulan (1998)", "Pocahontas (1995)"),
        ("1m_2", "Lost World: Jurassic Park, The (1997)", "Armageddon (1998)"),
        ("1m_10", "Godfather: Part II, The (1974)", "Hero (1992)"),
    ]:
        assert valid[user][-1] == val_target and test[user][-1] == test_target
    items, index = load_items(result.folder, cache_dir=tmp_path / "hf-cache")
    toy_story = items[index["Toy Story (1995)"]]
    assert toy_story["text"].startswith("Toy Story (1995). Animation, Children's, Comedy. Led by Woody")
    assert toy_story["image"] is not None


@pytest.mark.slow
def test_recbole_preset_reads_movielens_1m_alike(tmp_path):
    """ml-1m.inter is a RecBole atomic file: the generic recbole preset gives the same sequences."""
    a = _prepare(tmp_path, "recbole", "movielens-1m", max_users=50)
    b = prepare_preset("movielens-1m", DATA / "movielens-1m", tmp_path / "b", max_users=50, progress=False,
                       verbose=False)
    assert _test_rows(a, tmp_path) == _test_rows(b, tmp_path)
    items, index = load_items(a.folder, cache_dir=tmp_path / "hf-cache")
    assert items[index["Toy Story (1995)"]]["text"] == "Toy Story. Animation Children's Comedy"


@pytest.mark.slow
def test_hm_first_300_customers(tmp_path):
    result = _prepare(tmp_path, "hm", "hm-fashion", max_users=300)
    c = result.counts
    assert (c["interactions_read"], c["interactions_outside_user_slice"]) == (31662, 31662 - 14656)
    assert c["interactions_duplicate"] == 1492  # same customer, article and day: one row per unit bought
    assert (c["users_read"], c["users"], c["users_too_short"], c["interactions"]) == (300, 274, 26, 4933)
    assert (c["items"], c["items_with_text"], c["items_with_image"]) == (4238, 1715, 1715)
    assert c["texts_missing"] == c["images_missing"] == c["items_added_from_interactions"]  # no row, no photo
    test, valid = _test_rows(result, tmp_path), _valid_rows(result, tmp_path)
    first = "1a674938eb6b4f9b3ef35eda901f7c8a319f2666b182412685fb4785b22d002d"
    second = "1b291588ef8570d77e354d045dc8041d9235f2437c3d1f9bd3ddff487e20fd64"
    assert (valid[first][-1], test[first][-1], len(test[first])) == ("0860982003", "0877172002", 6)
    assert (valid[second][-1], test[second][-1], len(test[second])) == ("0832359001", "0832361001", 23)
    items, index = load_items(result.folder, cache_dir=tmp_path / "hf-cache")
    photo = items[index["0832361001"]]
    assert photo["image"].size == (360, 540) and photo["text"].count(". ") >= 3
    assert items[index["0877172002"]]["text"] == "" and items[index["0877172002"]]["image"] is None


@pytest.mark.slow
def test_hm_require_text_and_photo(tmp_path):
    result = _prepare(tmp_path, "hm", "hm-fashion", max_users=300, require_text=True, require_images=True)
    c = result.counts
    assert c["interactions_dropped_item"] == 9482
    assert c["users_too_short"] + c["users_all_interactions_dropped"] == 103
    assert (c["users"], c["interactions"], c["items"]) == (197, 2726, 1973)
    assert c["items_with_text"] == c["items_with_image"] == c["items"]
    test = _test_rows(result, tmp_path)
    user = "1dc5a502ddc5c507ddebc319d570e72e27aa3b0cf24ebdae0c1f6cb5ccda2b8e"
    assert (test[user][-2], test[user][-1], len(test[user])) == ("0863000003", "0799365001", 8)


def test_amazon_office_rebuilt_split_matches_the_source_split(tmp_path):
    result = _prepare(tmp_path, "amazon-office", "amazon-office")
    c = result.counts
    assert (c["interactions_read"], c["users"], c["items"], c["interactions"]) == (53258, 4905, 2420, 48797)
    assert (c["users_too_short"], c["interactions_unknown_item"], c["items_with_image"]) == (0, 0, 0)
    # leave-one-out rebuilt from train + dev + test gives back the source's own dev and test targets
    folder = DATA / "amazon-office"
    with open(folder / "Office.item2index") as f:
        asin = {index: a for a, index in (line.rstrip("\n").split("\t") for line in f)}

    def targets(name):
        with open(folder / name, newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            next(reader)
            return {row[0]: asin[row[1]] for row in reader}

    test, valid = _test_rows(result, tmp_path), _valid_rows(result, tmp_path)
    assert {u: s[-1] for u, s in test.items()} == targets("test.csv")
    assert {u: s[-1] for u, s in valid.items()} == targets("dev.csv")
    assert (valid["1"][-1], test["1"][-1]) == ("B00CLV8ZIU", "B0019K3LI8")
    assert (valid["21"][-1], test["21"][-1], len(test["21"])) == ("B00006IE5K", "B00006IEIO", 9)


def test_amazon_beauty_one_line_per_user(tmp_path):
    source = _need("amazon-beauty")
    lines = [line.split() for line in (source / "user_sequence.txt").read_text().splitlines()]
    result = _prepare(tmp_path, "amazon-beauty", "amazon-beauty")
    c = result.counts
    assert (c["source_lines_read"], c["source_lines_skipped"]) == (len(lines), 0) == (22363, 0)
    assert c["interactions_read"] == sum(len(line) - 1 for line in lines) == 198502
    assert (c["users"], c["items"], c["items_read"]) == (22363, 12101, 12101)
    test = _test_rows(result, tmp_path)
    first = lines[0]
    assert test[first[0]] == first[1:][-len(test[first[0]]):]  # the line's order, its last items
    items, _ = load_items(result.folder, decode_images=False)
    text = dict(zip(items["item_id"], items["text"]))
    assert text["7806397051"] == ("WAWO 15 Color Professionl Makeup Eyeshadow Camouflage Facial Concealer Neutral "
                                  "Palette. Beauty, Makeup, Face, Concealers & Neutralizers. COKA")


def test_amazon_games_sequential_benchmark_files(tmp_path):
    source = _need("amazon-games")
    with (source / "Games-6k.test.inter").open() as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    result = _prepare(tmp_path, "amazon-games", "amazon-games")
    c = result.counts
    # every valid row is the test row minus its last item (or, for users at the 50-item cap, shifted one
    # item earlier, which gives back the 51st item): all merged, none conflicting
    assert (c["source_lines_read"], c["source_rows_merged"], c["source_rows_conflicting"]) == (101092, 50546, 0)
    assert c["interactions_read"] == 440264 and c["users_read"] == len(rows) == 50546
    assert c["items"] == 16859
    test = _test_rows(result, tmp_path)
    user, history, target = rows[0]
    assert test[user][-1] == target and test[user][:-1] == history.split()[-(len(test[user]) - 1):]
