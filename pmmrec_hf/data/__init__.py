"""Datasets for PMMRec: the prepared on-disk format, loading, and importers (docs/formats.md)."""

from .format import (
    DEFAULT_MAX_ROWS_PER_FILE,
    ITEMS_FILE,
    METADATA_FILE,
    SPLITS,
    item_features,
    load_items,
    load_prepared,
    read_metadata,
    save_prepared,
    sequence_features,
    shard_for_process,
    subset_users,
)
from .prepare import (
    COUNT_NAMES,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MIN_LENGTH,
    PrepareResult,
    build_splits,
    leave_one_out,
    prepare_dataset,
    push_prepared_to_hub,
    read_table,
)
from .presets import PRESETS, Preset, prepare_preset, preset_kwargs
from .sequences import INTERACTION_FORMATS, read_sequence_benchmark, read_user_sequences
from .collator import ItemInputEncoder, ItemTable, PMMRecCollator, PMMRecEvalCollator, encode_item_inputs
from .corruption import corrupt_sequences
from .image_processing import PMMRecImageTransform, is_missing_image, load_image
from .synthetic import (
    SYNTHETIC_VOCABULARY,
    SyntheticDataset,
    make_synthetic_dataset,
    reference_hit_rates,
    synthetic_tokenizer,
)

__all__ = [
    "COUNT_NAMES",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MAX_ROWS_PER_FILE",
    "DEFAULT_MIN_LENGTH",
    "INTERACTION_FORMATS",
    "ITEMS_FILE",
    "ItemInputEncoder",
    "ItemTable",
    "METADATA_FILE",
    "PMMRecCollator",
    "PMMRecEvalCollator",
    "PMMRecImageTransform",
    "PRESETS",
    "PrepareResult",
    "Preset",
    "SPLITS",
    "SYNTHETIC_VOCABULARY",
    "SyntheticDataset",
    "build_splits",
    "corrupt_sequences",
    "encode_item_inputs",
    "is_missing_image",
    "item_features",
    "leave_one_out",
    "load_image",
    "load_items",
    "load_prepared",
    "make_synthetic_dataset",
    "prepare_dataset",
    "prepare_preset",
    "preset_kwargs",
    "push_prepared_to_hub",
    "read_metadata",
    "read_sequence_benchmark",
    "read_table",
    "read_user_sequences",
    "reference_hit_rates",
    "save_prepared",
    "sequence_features",
    "shard_for_process",
    "subset_users",
    "synthetic_tokenizer",
]
