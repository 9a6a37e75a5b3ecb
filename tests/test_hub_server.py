"""Tests of the local Hub-compatible server, through the real `huggingface_hub` client and `transformers` only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import hub_server  # tests/hub_server.py
from hub_server import DEFAULT_TOKENS, LocalHubServer, hub_env, use_local_hub

# The module's pytest fixtures, made available to the tests of this file.
local_hub_server = hub_server.local_hub_server
local_hub = hub_server.local_hub

ALICE = "hf_local_alice"
BOB = "hf_local_bob"
assert DEFAULT_TOKENS[ALICE] == "alice" and DEFAULT_TOKENS[BOB] == "bob"


def _api(server: LocalHubServer, token: str | bool | None = ALICE) -> HfApi:
    return HfApi(endpoint=server.endpoint, token=token)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_upload_bert_folder_and_from_pretrained(local_hub, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path / "bert")

    api = _api(local_hub)
    assert api.whoami()["name"] == "alice"
    repo_url = api.create_repo("tiny-bert")
    assert repo_url.repo_id == "alice/tiny-bert"
    api.create_repo("tiny-bert", exist_ok=True)  # idempotent
    info = api.upload_folder(folder_path=tmp_path / "bert", repo_id="alice/tiny-bert", commit_message="Add BERT")

    files = set(api.list_repo_files("alice/tiny-bert"))
    assert {"config.json", "model.safetensors"} <= files
    model_info = api.model_info("alice/tiny-bert", files_metadata=True)
    assert model_info.sha == info.oid and model_info.private is False
    sizes = {s.rfilename: s.size for s in model_info.siblings}
    assert sizes["model.safetensors"] == (tmp_path / "bert" / "model.safetensors").stat().st_size
    assert api.file_exists("alice/tiny-bert", "config.json")
    assert not api.file_exists("alice/tiny-bert", "nope.json")

    # `from_pretrained` with a hub id: HF_ENDPOINT (patched by the fixture) points to the local server.
    loaded = transformers.BertModel.from_pretrained("alice/tiny-bert")
    expected = model.state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name

    # Every byte came from the server, the way the real Hub serves it: no Xet, no LFS, no external host.
    paths = [path for _, path, _ in local_hub.requests]
    assert any("/alice/tiny-bert/resolve/" in p for p in paths)
    assert not any("xet" in p or "lfs" in p for p in paths)
    assert not local_hub.errors


def test_second_commit_branches_and_old_revision(local_hub):
    api = _api(local_hub)
    repo_id = api.create_repo("versions").repo_id
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="data/value.txt", repo_id=repo_id)
    second = api.upload_file(
        path_or_fileobj=b"v2", path_in_repo="data/value.txt", repo_id=repo_id, commit_message="Second version"
    )
    assert first.oid != second.oid

    commits = api.list_repo_commits(repo_id)
    assert len(commits) >= 2
    assert commits[0].commit_id == second.oid and commits[0].title == "Second version"
    assert commits[1].commit_id == first.oid
    assert _read(hf_hub_download(repo_id, "data/value.txt")) == b"v2"
    assert _read(hf_hub_download(repo_id, "data/value.txt", revision=first.oid)) == b"v1"

    # Several files in one commit, a deletion, and a branch.
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    dev = api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("a.txt", b"A"),
            CommitOperationAdd("sub/b.txt", b"B"),
            CommitOperationDelete("data/value.txt"),
        ],
        commit_message="dev work",
        revision="dev",
    )
    assert set(api.list_repo_files(repo_id, revision="dev")) == {".gitattributes", "a.txt", "sub/b.txt"}
    assert "a.txt" not in api.list_repo_files(repo_id)  # main untouched
    assert api.model_info(repo_id, revision="dev").sha == dev.oid
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["dev", "main"]
    snapshot = snapshot_download(repo_id, revision="dev")
    assert _read(os.path.join(snapshot, "sub", "b.txt")) == b"B"

    # Dataset repos live in their own namespace.
    ds = api.create_repo("versions", repo_type="dataset").repo_id
    api.upload_file(path_or_fileobj=b"x,y\n", path_in_repo="train.csv", repo_id=ds, repo_type="dataset")
    assert _read(hf_hub_download(ds, "train.csv", repo_type="dataset")) == b"x,y\n"
    api.delete_repo(ds, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(ds)
    assert not local_hub.errors


def test_private_repo_needs_owner_token(local_hub):
    api = _api(local_hub)
    repo_id = api.create_repo("secret", private=True).repo_id
    api.upload_file(path_or_fileobj=b"top secret", path_in_repo="s.txt", repo_id=repo_id)
    assert api.model_info(repo_id).private is True

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        hf_hub_download(repo_id, "s.txt", token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other_user:
        hf_hub_download(repo_id, "s.txt", token=BOB)
    assert other_user.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        _api(local_hub, token=False).model_info(repo_id)
    assert _read(hf_hub_download(repo_id, "s.txt", token=ALICE)) == b"top secret"


def test_wrong_token_gives_401(local_hub):
    bad = _api(local_hub, token="hf_not_a_valid_token")
    with pytest.raises(HfHubHTTPError) as create_err:
        bad.create_repo("nope")
    assert create_err.value.response.status_code == 401
    assert not isinstance(create_err.value, RepositoryNotFoundError)
    assert "Invalid credentials" in str(create_err.value)

    repo_id = _api(local_hub).create_repo("target").repo_id
    with pytest.raises(HfHubHTTPError) as upload_err:
        bad.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert upload_err.value.response.status_code == 401
    # No token at all cannot write either; a valid token cannot write in another user's namespace.
    with pytest.raises(HfHubHTTPError) as anonymous_err:
        _api(local_hub, token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert anonymous_err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as forbidden:
        _api(local_hub, token=BOB).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert forbidden.value.response.status_code == 403


def test_missing_repo_file_and_revision(local_hub):
    api = _api(local_hub)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/does-not-exist", "config.json")
    assert not api.repo_exists("alice/does-not-exist")

    repo_id = api.create_repo("present").repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    assert api.repo_exists(repo_id)
    assert not api.file_exists(repo_id, "missing.bin")


def test_subprocess_downloads_with_env_vars_only(local_hub_server):
    api = _api(local_hub_server)
    public = api.create_repo("public-file").repo_id
    private = api.create_repo("private-file", private=True).repo_id
    api.upload_file(path_or_fileobj=b"hello from the local hub", path_in_repo="greeting.txt", repo_id=public)
    api.upload_file(path_or_fileobj=b"private hello", path_in_repo="greeting.txt", repo_id=private)

    code = textwrap.dedent(
        f"""
        import sys
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RepositoryNotFoundError
        print(open(hf_hub_download({public!r}, "greeting.txt"), "rb").read().decode())
        try:
            hf_hub_download({private!r}, "greeting.txt")
        except RepositoryNotFoundError:
            print("private: not found")
        """
    )
    env = {**os.environ, **hub_env(local_hub_server)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["hello from the local hub", "private: not found"]

    env = {**os.environ, **hub_env(local_hub_server, token=ALICE)}
    code = f"from huggingface_hub import hf_hub_download as d; print(open(d({private!r}, 'greeting.txt')).read())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "private hello"


def test_server_lifecycle_and_storage_persist(tmp_path):
    from huggingface_hub import constants

    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"), os.environ.get("HF_TOKEN"))
    server = LocalHubServer(tmp_path / "hub", {"t": "carol"})
    with server:
        endpoint = server.endpoint
        assert endpoint.startswith("http://127.0.0.1:")
        repo_id = HfApi(endpoint=endpoint, token="t").create_repo("kept").repo_id
    assert not server.running
    # Repos are on disk: a new server on the same root serves them (on another free port).
    with LocalHubServer(tmp_path / "hub", {"t": "carol"}) as again, use_local_hub(again, token="t"):
        assert HfApi().model_info(repo_id).id == repo_id  # module-level client follows the patched endpoint
        assert constants.ENDPOINT == again.endpoint
    # Everything patched by `use_local_hub` is restored.
    assert (
        constants.ENDPOINT,
        constants.HF_HUB_CACHE,
        os.environ.get("HF_ENDPOINT"),
        os.environ.get("HF_TOKEN"),
    ) == before


# --------------------------------------------------------------------------------------------------------------------
# card metadata validation (POST /api/validate-yaml and commits that write README.md), malformed requests
# --------------------------------------------------------------------------------------------------------------------

GOOD_CARD = """---
license: apache-2.0
library_name: transformers
tags:
- pmmrec
- recommendation
base_model:
- sentence-transformers/all-MiniLM-L6-v2
datasets:
- alice/interactions
language: [en]
model-index:
- name: pmmrec
  results:
  - task: {type: sequential-recommendation, name: Sequential recommendation}
    dataset: {type: alice/interactions, name: interactions, split: test}
    metrics:
    - {type: hr@10, value: 0.5, name: HR@10}
---
# A card
"""


@pytest.mark.parametrize("change,message", [
    (("license: apache-2.0", "license: not-a-license"), '"license" must be one of the Hub\'s license identifiers'),
    (("tags:\n- pmmrec\n- recommendation", "tags: {a: 1}"), '"tags" must be a string or a list of strings'),
    (("- sentence-transformers/all-MiniLM-L6-v2", "- not a/valid//id"), '"base_model" with value \'not a/valid//id\''),
    (("base_model:\n- sentence-transformers/all-MiniLM-L6-v2", "base_model: 3"), '"base_model" must be a repo id'),
    (("language: [en]", "language: [English]"), '"language" must hold ISO 639 language codes'),
    (("    - {type: hr@10, value: 0.5, name: HR@10}", "    - {name: HR@10}"), 'needs a string "type" and a "value"'),
    (("license: apache-2.0", "license: [apache-2.0"), "Invalid YAML in the metadata block"),
])
def test_validate_yaml_checks_card_metadata_like_the_hub(local_hub, monkeypatch, change, message):
    from huggingface_hub import ModelCard

    ModelCard(GOOD_CARD).validate()  # huggingface_hub's own client call; no error
    bad = GOOD_CARD.replace(*change)
    assert bad != GOOD_CARD
    status, body = _post_validate_yaml(local_hub, bad)  # the card's text as written (ModelCard would normalise it)
    assert status == 400 and any(message in e["message"] for e in body["errors"]), body
    api = _api(local_hub)
    api.create_repo("card-check", exist_ok=True)
    with pytest.raises(ValueError, match="Invalid metadata in README.md") as err:  # HfApi validates before a commit
        api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id="alice/card-check")
    assert message in str(err.value)
    # and the server refuses the commit itself (a client that skips validate-yaml)
    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "_validate_yaml", lambda self, *a, **k: None)
        with pytest.raises(HfHubHTTPError) as http_err:
            api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id="alice/card-check")
    assert http_err.value.response.status_code == 400 and message in str(http_err.value)
    assert "README.md" not in api.list_repo_files("alice/card-check")
    api.upload_file(path_or_fileobj=GOOD_CARD.encode(), path_in_repo="README.md", repo_id="alice/card-check")
    assert not local_hub.errors


def _post_validate_yaml(server, content, repo_type="model"):
    import json as json_
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.endpoint}/api/validate-yaml", method="POST",
                                     data=json_.dumps({"repoType": repo_type, "content": content}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json_.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json_.loads(err.read())


def test_validate_yaml_accepts_other_licenses_with_a_warning_and_dataset_cards(local_hub):
    status, body = _post_validate_yaml(local_hub, "---\nlicense: other\n---\n")
    assert status == 200 and body["errors"] == [] and "license_name" in body["warnings"][0]["message"]
    dataset_card = "---\nlicense: cc-by-4.0\ntags: [x]\nconfigs: [{config_name: default}]\n---\n"
    assert _post_validate_yaml(local_hub, dataset_card, "dataset")[0] == 200
    status, body = _post_validate_yaml(local_hub, dataset_card.replace("cc-by-4.0", "cc-by-5.0"), "dataset")
    assert status == 400 and '"license"' in body["errors"][0]["message"]


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "12, 12"])
def test_malformed_content_length_is_a_400_not_a_500(local_hub_server, length):
    import http.client
    import json as json_

    host, port = local_hub_server.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/api/validate-yaml")
    conn.putheader("Content-Length", length)
    conn.endheaders()
    response = conn.getresponse()
    body = json_.loads(response.read())
    conn.close()
    assert response.status == 400 and "Malformed Content-Length" in body["error"]
    assert not local_hub_server.errors  # no traceback: not a server bug
