"""Publishing PMMRec components to a (local, Hub-compatible) server and loading them back."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModel

from pmmrec_hf import PMMRecItemEncoder, PMMRecModel, PMMRecPreTrainedModel, PMMRecUserEncoder
from pmmrec_hf.hub import (
    PMMRecAuthError,
    PMMRecPublishError,
    check_component,
    looks_untrained,
    push_pmmrec_to_hub,
)
from hub_server import DEFAULT_TOKENS, LocalHubServer, hub_env
from test_model_card import IMAGE, hub_client_for, tiny_card_config, tiny_model, tiny_tokenizer

ALICE, BOB = "hf_local_alice", "hf_local_bob"
ROOT = Path(__file__).resolve().parents[1]
MODEL_CHECK_WIRED = "check_component" in inspect.getsource(PMMRecPreTrainedModel.from_pretrained)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalHubServer(tmp_path_factory.mktemp("hub"), DEFAULT_TOKENS) as hub:
        yield hub


@pytest.fixture
def hub(server):
    """The module's server, with this process pointed at it (anonymous reads unless a token is passed)."""
    with hub_client_for(server):
        yield server


def _item_inputs(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (n, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "pixel_values": torch.randn(n, 3, IMAGE, IMAGE, generator=g)}


def _batch() -> dict:
    batch = _item_inputs(6, seed=1)
    batch.update(item_ids=torch.arange(6) * 3, item_index=torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 4, 5, 1, 2, 3]]))
    return batch


@pytest.fixture(scope="module")
def published(server):
    """A tiny model published once: item encoder, user encoder and full model in three repos of alice."""
    model = tiny_model(3)
    with hub_client_for(server):
        commits = push_pmmrec_to_hub(
            model, "pub-item", "pub-user", "pub-full", token=ALICE, tokenizer=tiny_tokenizer(),
            card_data={"eval_results": [{"dataset": "org/data", "metric": "ndcg@10", "value": 0.25}]},
        )
    return model, commits


def test_publish_three_repos_and_load_each_back(published, hub):
    model, commits = published
    assert set(commits) == {"item_encoder", "user_encoder", "full_model"}
    assert {c.repo_url.repo_id for c in commits.values()} == {"alice/pub-item", "alice/pub-user", "alice/pub-full"}
    api = HfApi(token=ALICE)
    code = {"config.json", "model.safetensors", "configuration_pmmrec.py", "modeling_pmmrec.py", "losses.py",
            "README.md"}
    processors = {"tokenizer_config.json", "preprocessor_config.json"}
    assert code | processors <= set(api.list_repo_files("alice/pub-item"))
    assert code | processors <= set(api.list_repo_files("alice/pub-full"))
    user_files = set(api.list_repo_files("alice/pub-user"))
    assert code <= user_files and not processors & user_files  # the user encoder reads no text nor image
    config = json.loads(Path(api.hf_hub_download("alice/pub-item", "config.json")).read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_pmmrec.PMMRecItemEncoder"

    items, batch = _item_inputs(), _batch()
    item = PMMRecItemEncoder.from_pretrained("alice/pub-item").eval()
    assert torch.equal(item(**items).item_embeddings, model.item_encoder(**items).item_embeddings)
    user = PMMRecUserEncoder.from_pretrained("alice/pub-user").eval()
    x, mask = torch.randn(2, 5, 16), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    assert torch.equal(user(x, mask).last_hidden_state, model.user_encoder(x, mask).last_hidden_state)
    full = PMMRecModel.from_pretrained("alice/pub-full").eval()
    assert torch.equal(full(**batch).loss, model(**batch).loss)
    # assembled from the two encoder repos: the same item embeddings and user states (heads are new)
    assembled = PMMRecModel.from_encoders("alice/pub-item", "alice/pub-user").eval()
    a, b = assembled(**batch), model(**batch)
    assert torch.equal(a.item_embeddings, b.item_embeddings) and torch.equal(a.user_states, b.user_states)
    assert torch.equal(a.next_item_loss, b.next_item_loss)
    # AutoModel without trust_remote_code uses the installed package's classes
    assert type(AutoModel.from_pretrained("alice/pub-user")) is PMMRecUserEncoder
    assert not hub.errors


@pytest.mark.slow
def test_remote_code_loading_from_the_hub_without_the_package(published, server, tmp_path):
    model, _ = published
    items, batch = _item_inputs(), _batch()
    torch.save({"items": items, "batch": batch}, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save({"items": model.item_encoder(**items).item_embeddings, "loss": model(**batch).loss,
                    "users": model.user_encoder(torch.ones(1, 3, 16)).user_embeddings}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["pmmrec_hf"] = None  # hide the package
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        try:
            import pmmrec_hf  # noqa: F401
            raise SystemExit("package still importable")
        except ImportError:
            pass
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        item = AutoModel.from_pretrained("alice/pub-item", trust_remote_code=True).eval()
        assert "transformers_modules" in type(item).__module__, type(item).__module__
        assert torch.equal(item(**inputs["items"]).item_embeddings, expected["items"])
        user = AutoModel.from_pretrained("alice/pub-user", trust_remote_code=True).eval()
        assert torch.equal(user(torch.ones(1, 3, 16)).user_embeddings, expected["users"])
        full = AutoModel.from_pretrained("alice/pub-full", trust_remote_code=True).eval()
        assert type(full).__name__ == "PMMRecModel"
        assert torch.equal(full(**inputs["batch"]).loss, expected["loss"])
        tokenizer = AutoTokenizer.from_pretrained("alice/pub-item", trust_remote_code=True)
        pixels = AutoImageProcessor.from_pretrained("alice/pub-item", trust_remote_code=True)(images=[__import__("PIL.Image").Image.new("RGB", (50, 40))], return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, {IMAGE}, {IMAGE}), pixels.shape
        text = tokenizer(["red cotton t-shirt"], return_tensors="pt")
        out = item(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
        assert out.item_embeddings.shape == (1, 16)
        print("REMOTE OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(hub_env(server))  # anonymous: the repos are public
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert "REMOTE OK" in result.stdout, result.stderr[-3000:]


def test_second_push_is_a_new_commit_that_keeps_foreign_files_and_drops_stale_weights(hub):
    api = HfApi(token=ALICE)
    model = tiny_model(4)
    first = push_pmmrec_to_hub(model, item_encoder_repo="again-item", token=ALICE)["item_encoder"]
    repo = "alice/again-item"
    api.upload_file(path_or_fileobj=b"my notes", path_in_repo="notes.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b"old shard", path_in_repo="model-00001-of-00002.safetensors", repo_id=repo)
    before = [c.commit_id for c in api.list_repo_commits(repo)]
    second = push_pmmrec_to_hub(model, item_encoder_repo=repo, token=ALICE, commit_message="Retrained")["item_encoder"]
    commits = api.list_repo_commits(repo)
    assert [c.commit_id for c in commits[1:]] == before and commits[0].commit_id == second.oid != first.oid
    assert commits[0].title == "Retrained"
    files = set(api.list_repo_files(repo))
    assert "notes.md" in files  # not ours: kept
    assert "model-00001-of-00002.safetensors" not in files and "model.safetensors" in files  # our stale weights: gone


def test_revision_branch_is_created_and_main_is_untouched(hub):
    api = HfApi(token=ALICE)
    model = tiny_model(5)
    push_pmmrec_to_hub(model, user_encoder_repo="branchy", token=ALICE)
    main_head = api.list_repo_commits("alice/branchy")[0].commit_id
    info = push_pmmrec_to_hub(model, user_encoder_repo="branchy", token=ALICE, revision="experiment")
    assert "experiment" in {b.name for b in api.list_repo_refs("alice/branchy").branches}
    assert api.list_repo_commits("alice/branchy", revision="experiment")[0].commit_id == info["user_encoder"].oid
    assert api.list_repo_commits("alice/branchy")[0].commit_id == main_head
    loaded = PMMRecUserEncoder.from_pretrained("alice/branchy", revision="experiment")
    assert torch.equal(loaded.position_embeddings.weight, model.user_encoder.position_embeddings.weight)
    with pytest.raises(ValueError, match="Branch 'nope' does not exist in 'alice/branchy'"):
        push_pmmrec_to_hub(model, user_encoder_repo="branchy", token=ALICE, revision="nope", create_branch=False)


def test_private_repo_needs_a_token_to_load(hub):
    model = tiny_model(6)
    push_pmmrec_to_hub(model, user_encoder_repo="secret-user", token=ALICE, private=True)
    assert HfApi(token=ALICE).model_info("alice/secret-user").private
    with pytest.raises(OSError, match="alice/secret-user"):
        PMMRecUserEncoder.from_pretrained("alice/secret-user")  # anonymous
    with pytest.raises(OSError, match="alice/secret-user"):
        check_component("alice/secret-user", "pmmrec_user_encoder", token=BOB)  # another user
    loaded = PMMRecUserEncoder.from_pretrained("alice/secret-user", token=ALICE)
    assert torch.equal(loaded.position_embeddings.weight, model.user_encoder.position_embeddings.weight)


def test_missing_wrong_or_foreign_token_is_refused_before_any_upload(hub):
    model = tiny_model(7)
    api = HfApi(token=ALICE)
    with pytest.raises(PMMRecAuthError) as wrong:
        push_pmmrec_to_hub(model, "tok-item", "tok-user", token="hf_not_a_token")
    message = str(wrong.value)
    assert "401" in message and "token=" in message and "hf auth login" in message and "huggingface-cli login" in message
    with pytest.raises(PMMRecAuthError, match="No Hugging Face token found.*hf auth login"):
        push_pmmrec_to_hub(model, "tok-item", "tok-user")  # the fixture's environment has no token
    with pytest.raises(PMMRecAuthError, match="'bob' cannot write to 'alice/tok-item'") as foreign:
        push_pmmrec_to_hub(model, "alice/tok-item", "bob/tok-user", token=BOB)
    assert foreign.value.not_published == ["alice/tok-item", "bob/tok-user"]
    assert not api.repo_exists("alice/tok-item") and not api.repo_exists("alice/tok-user")
    assert not api.repo_exists("bob/tok-user")


def test_missing_repo_on_load_names_the_repo(hub):
    for load in (PMMRecItemEncoder.from_pretrained, PMMRecUserEncoder.from_pretrained, PMMRecModel.from_pretrained):
        with pytest.raises(OSError, match="alice/does-not-exist"):
            load("alice/does-not-exist")
    with pytest.raises(OSError, match="alice/does-not-exist"):
        PMMRecModel.from_encoders("alice/does-not-exist", "alice/does-not-exist-either")
    with pytest.raises(OSError, match="Cannot load a PMMRec model from 'alice/does-not-exist'"):
        check_component("alice/does-not-exist", "pmmrec_item_encoder")


def test_wrong_component_type_is_a_value_error_naming_both_types(published, hub, tmp_path):
    with pytest.raises(ValueError, match="expected model_type 'pmmrec_user_encoder', found 'pmmrec_item_encoder'"):
        check_component("alice/pub-item", "pmmrec_user_encoder")
    with pytest.raises(ValueError, match="expected model_type 'pmmrec', found 'pmmrec_user_encoder'.*from_encoders"):
        check_component("alice/pub-user", "pmmrec")
    published[0].user_encoder.save_pretrained(tmp_path / "user")
    with pytest.raises(ValueError, match="expected model_type 'pmmrec_item_encoder', found 'pmmrec_user_encoder'"):
        check_component(tmp_path / "user", "pmmrec_item_encoder")  # local folders too
    assert check_component("alice/pub-full", "pmmrec")["model_type"] == "pmmrec"


@pytest.mark.skipif(not MODEL_CHECK_WIRED, reason="needs the from_pretrained check in modeling_pmmrec.py (issue 5)")
def test_loaders_refuse_a_repo_of_another_component(published, hub):
    with pytest.raises(ValueError, match="expected model_type 'pmmrec_user_encoder', found 'pmmrec_item_encoder'"):
        PMMRecUserEncoder.from_pretrained("alice/pub-item")
    with pytest.raises(ValueError, match="expected model_type 'pmmrec_item_encoder', found 'pmmrec_user_encoder'"):
        PMMRecModel.from_encoders("alice/pub-user", "alice/pub-item")  # swapped
    with pytest.raises(ValueError, match="expected model_type 'pmmrec', found 'pmmrec_item_encoder'"):
        PMMRecModel.from_pretrained("alice/pub-item")


def test_network_failure_mid_push_names_the_repo_and_cleans_up(tmp_path, monkeypatch):
    """The server goes away after the first repo's commit: the error says what was and was not published."""
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))
    model = tiny_model(8)
    server = LocalHubServer(tmp_path / "hub", DEFAULT_TOKENS).start()
    original = HfApi.upload_folder

    def upload_then_crash(self, *args, **kwargs):
        info = original(self, *args, **kwargs)
        server.stop()  # the network is gone from now on
        return info

    monkeypatch.setattr(HfApi, "upload_folder", upload_then_crash)
    try:
        with pytest.raises(PMMRecPublishError) as failure:
            push_pmmrec_to_hub(model, "net-item", "net-user", "net-full", token=ALICE, endpoint=server.endpoint)
    finally:
        server.stop()
    err = failure.value
    assert not isinstance(err, PMMRecAuthError)
    assert err.repo_id == "alice/net-user" and set(err.published) == {"item_encoder"}
    assert err.not_published == ["alice/net-user", "alice/net-full"]
    message = str(err)
    assert "Publishing the user encoder to 'alice/net-user' failed" in message
    assert "Nothing was published for: 'alice/net-user', 'alice/net-full'" in message
    assert "item encoder -> 'alice/net-item'" in message
    assert not [p for p in staging_root.iterdir() if p.name.startswith("pmmrec_push_")]  # staging removed


def test_unreachable_hub_fails_before_publishing_anything(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(PMMRecPublishError, match="Could not reach the Hub.*Nothing was published for: 'i', 'u'"):
        push_pmmrec_to_hub(tiny_model(9), "i", "u", token=ALICE, endpoint=closed)
    assert not list(tmp_path.iterdir())


def test_untrained_nan_or_mismatched_models_are_refused_before_any_network_call(tmp_path):
    closed = "http://127.0.0.1:9"  # never reached: every check below fails first
    model = tiny_model(10)
    assert looks_untrained(model.item_encoder) and looks_untrained(model.user_encoder)
    with pytest.raises(ValueError, match="looks untrained"):
        push_pmmrec_to_hub(model, "i", "u", token=ALICE, endpoint=closed, require_trained=True)
    # one optimiser step makes it "trained"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()(**_batch()).loss.backward()
    optimizer.step()
    assert not looks_untrained(model.item_encoder) and not looks_untrained(model.user_encoder)
    with pytest.raises(PMMRecPublishError, match="Could not reach"):  # passes the checks, then needs the network
        push_pmmrec_to_hub(model, "i", "u", token=ALICE, endpoint=closed, require_trained=True)

    broken = tiny_model(11)
    with torch.no_grad():
        broken.user_encoder.layers[0].intermediate.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*layers.0.intermediate.weight"):
        push_pmmrec_to_hub(broken, user_encoder_repo="u", token=ALICE, endpoint=closed)

    mismatched = tiny_model(12)
    wide = tiny_card_config().user_encoder_config.to_dict()
    wide.update(hidden_size=32)
    mismatched.user_encoder = PMMRecUserEncoder(type(mismatched.user_encoder.config)(**wide))
    with pytest.raises(ValueError, match="hidden size is 16 but the user encoder's is 32"):
        push_pmmrec_to_hub(mismatched, "i", "u", token=ALICE, endpoint=closed)
    with pytest.raises(ValueError, match="no user encoder"):
        push_pmmrec_to_hub(model.item_encoder, "i", "u", token=ALICE, endpoint=closed)
    with pytest.raises(ValueError, match="Nothing to publish"):
        push_pmmrec_to_hub(model, token=ALICE, endpoint=closed)


def _load_cli():
    spec = importlib.util.spec_from_file_location("push_to_hub_example", ROOT / "examples" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_publishes_a_saved_checkpoint_with_its_tokenizer(hub, tmp_path, capsys):
    model = tiny_model(13)
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    card = {"datasets": ["alice/interactions"], "hyperparameters": {"learning_rate": 1e-4},
            "eval_results": [{"dataset": "alice/interactions", "metric": "hr@10", "value": 0.5}]}
    (tmp_path / "card.json").write_text(json.dumps(card))
    cli = _load_cli()
    code = cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--item-encoder-repo", "cli-item",
                     "--user-encoder-repo", "cli-user", "--token", ALICE, "--private", "--commit-message", "From CLI",
                     "--card-data", str(tmp_path / "card.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "item_encoder: alice/cli-item @" in out and "user_encoder: alice/cli-user @" in out
    api = HfApi(token=ALICE)
    assert api.model_info("alice/cli-item").private
    assert api.list_repo_commits("alice/cli-item")[0].title == "From CLI"
    assert "tokenizer_config.json" in api.list_repo_files("alice/cli-item")  # picked up from the checkpoint
    readme = Path(api.hf_hub_download("alice/cli-item", "README.md")).read_text()
    assert "alice/cli-user" in readme and "HR@10" in readme and "alice/interactions" in readme
    # errors are reported, not raised
    assert cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--item-encoder-repo", "x", "--token", "hf_bad"]) == 1
    assert "hf auth login" in capsys.readouterr().err


def test_published_cards_pass_the_hubs_metadata_validation_and_a_bad_licence_fails(published, hub):
    from huggingface_hub import ModelCard

    for repo in ("alice/pub-item", "alice/pub-user", "alice/pub-full"):
        ModelCard.load(repo).validate()  # the card as the Hub would check it
    with pytest.raises(ValueError, match='"license" must be one of the Hub.*Nothing was published for: '
                                         "'alice/bad-card-item'"):
        push_pmmrec_to_hub(tiny_model(5), "bad-card-item", token=ALICE, card_data={"license": "not-a-license"})
    api = HfApi(token=ALICE)
    assert not api.repo_exists("alice/bad-card-item") or "README.md" not in api.list_repo_files("alice/bad-card-item")
