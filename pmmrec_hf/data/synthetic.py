"""A built-in synthetic recommendation dataset that needs no files and no downloads.

Items belong to latent categories. Each item has

- a templated description whose colour / material / object / pattern words come from its category's own
  vocabulary (each slot, with probability ``text_noise``, from another category's instead), plus shared
  style words that carry no category information;
- a small procedurally drawn image: a background colour, a shape kind and a shape colour per category,
  with per-item jitter of colours, shape position and size.

Users' sequences follow a Markov chain over categories: from category c the next item's category is a
preferred successor of c with probability ``transition_strength``, c itself with ``stay_prob``, any
other category otherwise; within a category items are drawn with a Zipf popularity skew. So the next
item is predictable from the *content* of the last items (their category) far better than from
popularity alone: :func:`reference_hit_rates` measures both on a split.

The result is in the prepared format of ``docs/formats.md`` (leave-one-out splits, ``train_count`` from
the train split) and can be written as a prepared folder. :func:`synthetic_tokenizer` is a word-level
tokenizer over the synthetic vocabulary, built locally.
"""

from __future__ import annotations

import colorsys
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SYNTHETIC_VOCABULARY",
    "SyntheticDataset",
    "make_synthetic_dataset",
    "reference_hit_rates",
    "synthetic_tokenizer",
]

# --------------------------------------------------------------------------------------------------
# vocabulary

_COLOURS = (
    "red crimson scarlet orange amber tangerine yellow golden lemon green emerald olive teal turquoise cyan "
    "blue navy azure indigo violet purple magenta pink rose brown chocolate tan beige ivory white silver grey "
    "black charcoal maroon lime"
).split()
_MATERIALS = (
    "cotton wool silk linen leather denim velvet suede nylon canvas bamboo oak walnut pine steel copper brass "
    "ceramic glass marble granite rubber paper clay"
).split()
_OBJECTS = (
    "lamp chair mug scarf jacket boot bag vase clock pillow blanket bowl kettle basket candle mirror wallet "
    "belt hat glove sock notebook pen plate teapot stool shelf rug curtain towel apron backpack bottle jar "
    "frame tray"
).split()
_PATTERNS = (
    "circle square triangle star heart diamond stripe dot zigzag wave check spiral hexagon cross ring leaf "
    "flower moon sun cloud arrow grid floral paisley"
).split()
_STYLES = (
    "classic modern vintage rustic elegant casual premium handmade soft durable lightweight compact cozy bold "
    "simple deluxe sleek retro minimal sturdy bright natural smooth chic practical charming stylish quality "
    "new original"
).split()
_FILLERS = "with and made of in a the design print pattern for".split()

# words per category and slot; with up to 12 categories every category has its own words
_SLOTS = (("colour", _COLOURS, 3), ("material", _MATERIALS, 2), ("object", _OBJECTS, 3), ("pattern", _PATTERNS, 2))
_TEMPLATES = (
    "{style} {colour} {material} {object} with {pattern} pattern",
    "{colour} {object} made of {material} in a {style} {pattern} design",
    "{style} {object} in {colour} {material} with {pattern} print",
    "the {style} {colour} {object} of {material} and {pattern} design",
)

SYNTHETIC_VOCABULARY: tuple[str, ...] = tuple(
    sorted(set(_COLOURS + _MATERIALS + _OBJECTS + _PATTERNS + _STYLES + _FILLERS))
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")

_SHAPES = (
    "circle", "square", "triangle", "diamond", "cross", "ring", "stripes", "dots", "frame", "saltire", "bar", "half",
)


def synthetic_tokenizer(model_max_length: int = 64):
    """A word-level ``PreTrainedTokenizerFast`` over the synthetic vocabulary (built locally).

    Specials: ``[PAD]`` (0), ``[UNK]`` (1), ``[CLS]`` (2), ``[SEP]`` (3); texts are lower-cased, split on
    whitespace and punctuation, and encoded as ``[CLS] words [SEP]``. Its ``vocab_size`` (len) is what a
    text backbone's ``vocab_size`` must at least be.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + SYNTHETIC_VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


# --------------------------------------------------------------------------------------------------
# the dataset object


@dataclass
class SyntheticDataset:
    """The synthetic data in the prepared format, plus the ground truth used to generate it.

    ``items`` is a ``datasets.Dataset`` (``item_id``, ``text``, ``image`` as an ``Image()`` feature,
    ``train_count``), ``splits`` a ``DatasetDict`` with ``train`` / ``validation`` / ``test``
    (``user_id``, ``item_ids``, ``timestamps``). ``data["items"]`` and ``data["train"]`` etc. also work.
    """

    items: Any
    splits: Any
    item_to_index: dict[str, int]
    metadata: dict[str, Any]
    item_categories: np.ndarray  # (num_items,) category of each item
    transition: np.ndarray  # (C, C) true category transition matrix
    folder: Path | None = None
    category_words: dict[str, list[list[str]]] = field(default_factory=dict)

    def __getitem__(self, key: str):
        if key == "items":
            return self.items
        return self.splits[key]

    def keys(self) -> list[str]:
        return ["items", *self.splits.keys()]


# --------------------------------------------------------------------------------------------------
# generation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
    return float(value)


def _category_words(rng: np.random.Generator, num_categories: int) -> dict[str, list[list[str]]]:
    words: dict[str, list[list[str]]] = {}
    for slot, pool, k in _SLOTS:
        order = rng.permutation(len(pool))
        if num_categories * k <= len(pool):  # disjoint word sets
            words[slot] = [[pool[order[c * k + j]] for j in range(k)] for c in range(num_categories)]
        else:  # more categories than words: random (overlapping) subsets
            words[slot] = [[pool[i] for i in rng.choice(len(pool), size=k, replace=False)] for _ in range(num_categories)]
    return words


def _item_texts(rng, categories: np.ndarray, words, num_categories: int, text_noise: float) -> list[str]:
    texts = []
    for category in categories:
        fill = {"style": _STYLES[rng.integers(len(_STYLES))]}
        for slot, _, _ in _SLOTS:
            source = int(category)
            if num_categories > 1 and rng.random() < text_noise:
                source = int((category + rng.integers(1, num_categories)) % num_categories)
            options = words[slot][source]
            fill[slot] = options[rng.integers(len(options))]
        texts.append(_TEMPLATES[rng.integers(len(_TEMPLATES))].format(**fill))
    return texts


def _category_looks(rng: np.random.Generator, num_categories: int) -> list[dict]:
    hues = (np.arange(num_categories) + rng.random()) / num_categories
    hues = hues[rng.permutation(num_categories)]
    looks = []
    for c in range(num_categories):
        background = colorsys.hsv_to_rgb(hues[c], 0.35 + 0.2 * (c % 2), 0.9)
        foreground = colorsys.hsv_to_rgb((hues[c] + 0.5) % 1.0, 0.85, 0.45 + 0.25 * ((c // 2) % 2))
        looks.append({
            "background": np.array(background) * 255.0,
            "foreground": np.array(foreground) * 255.0,
            "shape": _SHAPES[(c + int(rng.integers(len(_SHAPES)))) % len(_SHAPES)] if c >= len(_SHAPES) else _SHAPES[c],
        })
    return looks


def _draw_item_image(rng: np.random.Generator, look: dict, size: int) -> bytes:
    from PIL import Image, ImageDraw

    def jitter(colour, amount):
        return tuple(int(v) for v in np.clip(colour + rng.uniform(-amount, amount, size=3), 0, 255))

    image = Image.new("RGB", (size, size), jitter(look["background"], 12))
    draw = ImageDraw.Draw(image)
    colour = jitter(look["foreground"], 25)
    half = size * rng.uniform(0.25, 0.4)
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12) * size
    box = [cx - half, cy - half, cx + half, cy + half]
    width = max(1, round(size / 10))
    shape = look["shape"]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    elif shape == "cross":
        draw.rectangle([cx - width, cy - half, cx + width, cy + half], fill=colour)
        draw.rectangle([cx - half, cy - width, cx + half, cy + width], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=width + 1)
    elif shape == "stripes":
        step = max(2, round(size / 6))
        offset = int(rng.integers(step))
        for y in range(offset, size, step):
            draw.rectangle([0, y, size, y + max(1, step // 2) - 1], fill=colour)
    elif shape == "frame":
        draw.rectangle(box, outline=colour, width=width + 1)
    elif shape == "saltire":
        draw.line([(cx - half, cy - half), (cx + half, cy + half)], fill=colour, width=2 * width)
        draw.line([(cx - half, cy + half), (cx + half, cy - half)], fill=colour, width=2 * width)
    elif shape == "bar":
        draw.rectangle([cx - half, cy - half / 3, cx + half, cy + half / 3], fill=colour)
    elif shape == "half":
        draw.pieslice(box, 180, 360, fill=colour)
    else:  # dots
        r = max(1.0, size / 14)
        for gx in (-1, 0, 1):
            for gy in (-1, 0, 1):
                x, y = cx + gx * half * 0.7, cy + gy * half * 0.7
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _transition_matrix(rng, num_categories: int, strength: float, stay: float) -> np.ndarray:
    c = num_categories
    if c == 1:
        return np.ones((1, 1))
    order = rng.permutation(c)
    successor = np.empty(c, dtype=np.int64)
    successor[order] = np.roll(order, -1)  # a random cycle: no category is its own successor
    matrix = np.zeros((c, c))
    others = 1.0 - strength - stay
    if others < -1e-12:
        raise ValueError("`transition_strength + stay_prob` must be <= 1.")
    for a in range(c):
        rest = [b for b in range(c) if b != a and b != successor[a]]
        if rest:
            matrix[a, rest] = max(others, 0.0) / len(rest)
        matrix[a, successor[a]] += strength
        matrix[a, a] += stay
        if not rest:  # two categories: nothing else to spread over
            matrix[a, successor[a]] += max(others, 0.0)
        matrix[a] /= matrix[a].sum()
    return matrix


def _sample_sequences(rng, lengths, transition, categories, item_weights) -> list[np.ndarray]:
    """Category Markov chain per user, items within a category by popularity (vectorised over users)."""
    num_users, max_len = len(lengths), int(lengths.max())
    c = transition.shape[0]
    cats = np.empty((num_users, max_len), dtype=np.int64)
    cats[:, 0] = rng.integers(c, size=num_users)
    cumulative = np.cumsum(transition, axis=1)
    for t in range(1, max_len):
        u = rng.random(num_users)
        cats[:, t] = np.minimum((u[:, None] > cumulative[cats[:, t - 1]]).sum(axis=1), c - 1)
    items = np.empty_like(cats)
    u = rng.random(cats.shape)
    for category in range(c):
        members = np.flatnonzero(categories == category)
        cdf = np.cumsum(item_weights[members])
        cdf /= cdf[-1]
        where = cats == category
        items[where] = members[np.minimum(np.searchsorted(cdf, u[where], side="right"), len(members) - 1)]
    return [items[i, : lengths[i]] for i in range(num_users)]


def make_synthetic_dataset(
    num_items: int = 500,
    num_users: int = 2000,
    num_categories: int = 10,
    seed: int = 0,
    image_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    *,
    max_length: int = 20,
    min_length: int = 3,
    min_sequence_length: int = 5,
    max_sequence_length: int = 30,
    transition_strength: float = 0.8,
    stay_prob: float = 0.05,
    popularity_exponent: float = 1.0,
    text_noise: float = 0.1,
    missing_image_rate: float = 0.0,
) -> SyntheticDataset:
    """Generate the synthetic dataset (deterministic for a seed); optionally write a prepared folder.

    Args:
        num_items, num_users, num_categories: sizes (every category gets at least one item).
        seed: all randomness comes from ``numpy.random.default_rng(seed)``.
        image_size: side of the square PNG images.
        output_dir: if given, written there with ``pmmrec_hf.data.format.save_prepared``.
        max_length, min_length: L and the minimum interactions per user of the leave-one-out split (each
            user's last L + 3 interactions are kept).
        min_sequence_length, max_sequence_length: each user's raw interaction count is uniform in this range.
        transition_strength: probability of moving to the category's preferred successor.
        stay_prob: probability of staying in the same category.
        popularity_exponent: Zipf exponent of the item popularity within a category.
        text_noise: probability that a category word of a description comes from another category.
        missing_image_rate: fraction of items written without an image (exercises the placeholder path).
    """
    num_items = _check_int("num_items", num_items, 1)
    num_users = _check_int("num_users", num_users, 1)
    num_categories = _check_int("num_categories", num_categories, 1)
    if num_categories > num_items:
        raise ValueError(f"`num_categories` ({num_categories}) cannot exceed `num_items` ({num_items}).")
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, 4)
    max_length = _check_int("max_length", max_length, 1)
    min_length = _check_int("min_length", min_length, 3)
    min_sequence_length = _check_int("min_sequence_length", min_sequence_length, 1)
    max_sequence_length = _check_int("max_sequence_length", max_sequence_length, min_sequence_length)
    transition_strength = _check_prob("transition_strength", transition_strength)
    stay_prob = _check_prob("stay_prob", stay_prob)
    text_noise = _check_prob("text_noise", text_noise)
    missing_image_rate = _check_prob("missing_image_rate", missing_image_rate)
    if isinstance(popularity_exponent, bool) or not isinstance(popularity_exponent, (int, float)) or popularity_exponent < 0:
        raise ValueError(f"`popularity_exponent` must be a non-negative number, got {popularity_exponent!r}.")

    rng = np.random.default_rng(seed)
    categories = rng.permutation(np.arange(num_items) % num_categories)
    item_weights = np.empty(num_items)
    for category in range(num_categories):
        members = np.flatnonzero(categories == category)
        ranks = rng.permutation(len(members))
        item_weights[members] = 1.0 / (ranks + 1.0) ** popularity_exponent
    words = _category_words(rng, num_categories)
    texts = _item_texts(rng, categories, words, num_categories, text_noise)
    looks = _category_looks(rng, num_categories)
    images: list[dict | None] = [
        {"bytes": _draw_item_image(rng, looks[int(c)], image_size), "path": None} for c in categories
    ]
    no_image = rng.random(num_items) < missing_image_rate
    images = [None if missing else image for image, missing in zip(images, no_image)]
    transition = _transition_matrix(rng, num_categories, transition_strength, stay_prob)

    lengths = rng.integers(min_sequence_length, max_sequence_length + 1, size=num_users)
    sequences = _sample_sequences(rng, lengths, transition, categories, item_weights)
    starts = rng.integers(1_600_000_000, 1_700_000_000, size=num_users)
    gaps = rng.integers(60, 86_400, size=(num_users, int(lengths.max())))
    times = starts[:, None] + np.cumsum(gaps, axis=1)

    item_width, user_width = len(str(num_items - 1)), len(str(num_users - 1))
    item_ids = [f"item{i:0{item_width}d}" for i in range(num_items)]
    user_ids = [f"user{u:0{user_width}d}" for u in range(num_users)]
    from .prepare import build_splits

    columns, split_counts = build_splits(
        (
            (user_ids[u], [item_ids[i] for i in sequences[u]], times[u, : lengths[u]].tolist())
            for u in range(num_users)
        ),
        max_length=max_length,
        min_length=min_length,
    )
    item_to_index = {item_id: i for i, item_id in enumerate(item_ids)}
    train_count = np.zeros(num_items, dtype=np.int64)
    for seq in columns["train"]["item_ids"]:
        np.add.at(train_count, [item_to_index[i] for i in seq], 1)

    metadata: dict[str, Any] = {
        "name": "synthetic",
        "source": "pmmrec_hf.data.synthetic.make_synthetic_dataset",
        "max_length": max_length,
        "min_length": min_length,
        "counts": {
            **split_counts,
            "items": num_items,
            "items_with_text": num_items,
            "items_with_image": int(num_items - no_image.sum()),
            "images_missing": int(no_image.sum()),
            "train_interactions": int(train_count.sum()),
        },
        "generator": {
            "seed": seed, "num_items": num_items, "num_users": num_users, "num_categories": num_categories,
            "image_size": image_size, "min_sequence_length": min_sequence_length,
            "max_sequence_length": max_sequence_length, "transition_strength": transition_strength,
            "stay_prob": stay_prob, "popularity_exponent": popularity_exponent, "text_noise": text_noise,
            "missing_image_rate": missing_image_rate,
        },
    }

    from datasets import Dataset, DatasetDict

    from .format import item_features, save_prepared, sequence_features

    item_columns = {"item_id": item_ids, "text": texts, "image": images, "train_count": train_count.tolist()}
    folder = None
    if output_dir is not None:
        metadata = save_prepared(
            output_dir,
            {k: v for k, v in item_columns.items() if k != "train_count"},
            columns,
            metadata,
        )
        folder = Path(output_dir)
    items = Dataset.from_dict(item_columns, features=item_features())
    splits = DatasetDict(
        {
            name: Dataset.from_dict(split_columns, features=sequence_features())
            for name, split_columns in columns.items()
        }
    )
    return SyntheticDataset(
        items=items,
        splits=splits,
        item_to_index=item_to_index,
        metadata=metadata,
        item_categories=categories.astype(np.int64),
        transition=transition,
        folder=folder,
        category_words=words,
    )


# --------------------------------------------------------------------------------------------------
# reference predictors


def _ranks(primary: np.ndarray, counts: np.ndarray, targets: np.ndarray, history_mask: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each target among all items ordered by (primary desc, count desc, id asc), with
    history items (except nothing else) removed from the ranking; primary is (U, I)."""
    num_items = counts.shape[0]
    rows = np.arange(len(targets))
    p_t = primary[rows, targets][:, None]
    c_t = counts[targets][:, None]
    ids = np.arange(num_items)[None, :]
    better = (primary > p_t) | ((primary == p_t) & ((counts[None, :] > c_t) | ((counts[None, :] == c_t) & (ids < targets[:, None]))))
    better &= ~history_mask
    return 1 + better.sum(axis=1)


def reference_hit_rates(data: SyntheticDataset, split: str = "validation", k: int = 10) -> dict[str, float]:
    """HR@k of two reference predictors under the full-ranking protocol (history items removed):

    - ``popularity``: all items ranked by ``train_count``;
    - ``category_oracle``: knows every item's true category; items of the categories most often following
      the last input item's category in the train split come first, ranked by ``train_count``.

    A model that reads texts / images can approach ``category_oracle``; ``popularity`` is the floor.
    """
    categories = data.item_categories
    num_categories = int(categories.max()) + 1
    index = data.item_to_index
    counts = np.asarray(data.items.data.column("train_count").to_pylist(), dtype=np.int64)
    transitions = np.zeros((num_categories, num_categories))
    for seq in data.splits["train"]["item_ids"]:
        cats = categories[[index[i] for i in seq]]
        np.add.at(transitions, (cats[:-1], cats[1:]), 1.0)
    transitions /= np.maximum(transitions.sum(axis=1, keepdims=True), 1.0)

    rows = data.splits[split]["item_ids"]
    targets = np.array([index[r[-1]] for r in rows], dtype=np.int64)
    last = np.array([index[r[-2]] for r in rows], dtype=np.int64)
    history = np.zeros((len(rows), len(counts)), dtype=bool)
    for u, r in enumerate(rows):
        history[u, [index[i] for i in r[:-1]]] = True
    history[np.arange(len(rows)), targets] = False  # never drop the target itself
    flat = np.zeros((len(rows), len(counts)))
    oracle = transitions[categories[last]][:, categories]  # (U, I)
    return {
        "popularity": float((_ranks(flat, counts, targets, history) <= k).mean()),
        "category_oracle": float((_ranks(oracle, counts, targets, history) <= k).mean()),
    }
