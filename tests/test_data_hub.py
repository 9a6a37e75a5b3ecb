"""A prepared dataset pushed to a Hub dataset repo (local Hub server) and read back, fully and streaming."""

import pytest

from pmmrec_hf.data import load_items, load_prepared, make_synthetic_dataset, push_prepared_to_hub, read_metadata
import hub_server  # tests/hub_server.py
from hub_server import use_local_hub

local_hub_server = hub_server.local_hub_server
TOKEN = "hf_local_alice"


def test_push_prepared_dataset_and_load_it_from_the_hub(local_hub_server, tmp_path):
    make_synthetic_dataset(num_items=40, num_users=60, seed=1, output_dir=tmp_path / "data")
    local = load_prepared(tmp_path / "data")
    with use_local_hub(local_hub_server, token=TOKEN):
        push_prepared_to_hub(tmp_path / "data", "alice/synthetic-seq", token=TOKEN, private=True)
        remote = load_prepared("alice/synthetic-seq", token=TOKEN)
        for split in ("train", "validation", "test"):
            assert remote[split]["item_ids"] == local[split]["item_ids"]
            assert remote[split]["user_id"] == local[split]["user_id"]
        streamed = load_prepared("alice/synthetic-seq", streaming=True, split="test", token=TOKEN)
        assert [row["item_ids"] for row in streamed] == local["test"]["item_ids"]
        items, index = load_items("alice/synthetic-seq", token=TOKEN, decode_images=False)
        assert len(items) == 40 and index[items[0]["item_id"]] == 0
        assert read_metadata("alice/synthetic-seq", token=TOKEN)["num_rows"] == read_metadata(tmp_path / "data")["num_rows"]
    # the repo is private: without a token it cannot be read
    with use_local_hub(local_hub_server):
        with pytest.raises(Exception):
            load_prepared("alice/synthetic-seq", split="test")
