"""A prepared dataset is pushed in one commit (local Hub server): a re-push with another shard layout adds
exactly one commit holding the new files and the removal of the old data files, never a mix."""

from __future__ import annotations

from huggingface_hub import HfApi

from pmmrec_hf.data import load_prepared, push_prepared_to_hub, read_metadata, save_prepared
from pmmrec_hf.data.format import SPLITS
import hub_server  # tests/hub_server.py
from hub_server import use_local_hub

local_hub_server = hub_server.local_hub_server
TOKEN = "hf_local_alice"


def _save(folder, version: int, num_shards: int) -> None:
    items = [{"item_id": f"i{k}", "text": f"v{version} item {k}"} for k in range(5)]
    rows = [{"user_id": f"u{u}", "item_ids": [f"i{(u + j) % 5}" for j in range(3 + version)],
             "timestamps": list(range(3 + version))} for u in range(4)]
    save_prepared(folder, items, {s: rows for s in SPLITS}, {"name": f"v{version}"}, num_shards=num_shards)


def test_a_dataset_push_is_one_commit_and_a_repush_leaves_no_stale_shards(local_hub_server, tmp_path):
    repo = "alice/pushed-once"
    with use_local_hub(local_hub_server, token=TOKEN):
        api = HfApi(token=TOKEN)
        _save(tmp_path / "v1", 1, num_shards=2)
        push_prepared_to_hub(tmp_path / "v1", repo, token=TOKEN)
        first = [c.commit_id for c in api.list_repo_commits(repo, repo_type="dataset")]
        _save(tmp_path / "v2", 2, num_shards=1)
        push_prepared_to_hub(tmp_path / "v2", repo, token=TOKEN)
        commits = [c.commit_id for c in api.list_repo_commits(repo, repo_type="dataset")]
        assert commits[1:] == first  # exactly one new commit
        files = set(api.list_repo_files(repo, repo_type="dataset"))
        local = {p.name for p in (tmp_path / "v2").iterdir()}
        assert files == local | {".gitattributes"}  # the two-shard files of v1 are gone in that same commit
        assert read_metadata(repo, token=TOKEN)["name"] == "v2"
        assert load_prepared(repo, split="test", token=TOKEN, cache_dir=tmp_path / "c")["item_ids"][0] == [
            "i0", "i1", "i2", "i3", "i4"]
        # the commit before it is still the complete v1 (the Hub never shows a mix)
        v1 = set(api.list_repo_files(repo, repo_type="dataset", revision=first[0]))
        assert v1 == {p.name for p in (tmp_path / "v1").iterdir()} | {".gitattributes"}
