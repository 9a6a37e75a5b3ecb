"""Bad input gets a clear error naming the file, row, field or option, or a counted skip (issue 12, requirements 4-7).

One test per behaviour of the "Bad input and interruptions" table of docs/formats.md, each run the way a user meets
it (the ``pmmrec-prepare`` command line, ``from_pretrained``, ``load_prepared``, a push to a local Hub server).
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models

from tiny_models import tiny_config, tiny_user_config  # noqa: E402

from pmmrec_hf import (  # noqa: E402
    PMMRecItemEncoderConfig,
    PMMRecModel,
    PMMRecUserEncoder,
    PMMRecUserEncoderConfig,
)
from pmmrec_hf.data import cli, load_items, load_prepared, make_synthetic_dataset, prepare_dataset  # noqa: E402
from pmmrec_hf.data.prepare import push_prepared_to_hub  # noqa: E402
from pmmrec_hf.hub import PMMRecAuthError  # noqa: E402
from pmmrec_hf.atomic_io import write_marker  # noqa: E402
from pmmrec_hf.metrics import target_ranks  # noqa: E402
import hub_server  # noqa: E402 (tests/hub_server.py)
from hub_server import use_local_hub  # noqa: E402

local_hub_server = hub_server.local_hub_server
TOKEN = "hf_local_alice"

ITEMS = [("i1", "Alpha"), ("i2", "Beta"), ("i3", "Gamma"), ("i4", "Delta")]
# two users of four interactions each: every import of these keeps both
INTERACTIONS = [(u, i, str(t)) for u in ("u1", "u2") for t, i in enumerate(("i1", "i2", "i3", "i4"), start=1)]


def _tables(folder: Path, interactions=INTERACTIONS, items=ITEMS, time_header="timestamp") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    inter = folder / "interactions.csv"
    pd.DataFrame(interactions, columns=["user_id", "item_id", time_header]).to_csv(inter, index=False)
    item_file = folder / "items.csv"
    pd.DataFrame(items, columns=["item_id", "title"]).to_csv(item_file, index=False)
    return inter, item_file


def _prepare_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main([*args, "--no-progress"])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the importer


@pytest.mark.parametrize(
    "case, options, reason",
    [
        ("header-only interactions", [], r"interactions table .*interactions\.csv has no rows"),
        ("header-only items", [], r"items table .*items\.csv has no rows"),
        ("all timestamps bad", [], r"no interaction has a readable time in column 'timestamp' "
                                   r"\(interactions_bad_time=8, e\.g\. \['soon', 'later', 'never'\]\)"),
        ("time format matches nothing", ["--time-format", "%d/%m/%Y"],
         r"time_format '%d/%m/%Y' \(CLI --time-format\) matches none of them"),
        ("no known item", [], r"no interaction names an item of the items table .*items\.csv "
                              r"\(interactions_unknown_item=8\); check item_col"),
        ("every user too short", ["--min-length", "5"], r"every user has fewer than min_length=5 interactions "
                                                        r"\(users_too_short=2"),
    ],
)
def test_import_that_keeps_nothing_fails_naming_the_reason(tmp_path, capsys, case, options, reason):
    interactions, items = INTERACTIONS, ITEMS
    if case == "header-only interactions":
        interactions = []
    elif case == "header-only items":
        items = []
    elif case == "no known item":
        items = [("x" + item[1:], title) for item, title in ITEMS]
    elif case == "all timestamps bad":
        interactions = [(u, i, ("soon", "later", "never", "tomorrow")[k % 4]) for k, (u, i, _) in enumerate(INTERACTIONS)]
    elif case == "time format matches nothing":
        interactions = [(u, i, f"2024-01-0{t}") for u, i, t in INTERACTIONS]
    inter, item_file = _tables(tmp_path / "src", interactions, items)
    out = tmp_path / "out"
    code, err = _prepare_cli(capsys, "--interactions", str(inter), "--items", str(item_file), "--text-cols", "title",
                             "--output", str(out), *options)
    assert code == 1
    assert err.startswith(f"pmmrec-prepare: error: the import keeps nothing, so nothing was written to {out}: ")
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(reason, err), err
    assert not out.exists()  # no unreadable items.parquet left behind


def test_out_of_range_timestamps_are_counted_as_bad_times_never_stored_wrapped(tmp_path):
    rows = [("u1", "i1", "1"), ("u1", "i2", "inf"), ("u1", "i2", "2"), ("u1", "i3", "1e30"), ("u1", "i3", "3"),
            ("u1", "i4", "-1e30"), ("u1", "i4", "9.3e18"), ("u1", "i4", "-inf"), ("u1", "i4", "4")]
    inter, items = _tables(tmp_path / "src", rows)
    result = prepare_dataset(inter, items, tmp_path / "out", text_cols=["title"], progress=False, verbose=False)
    assert result.counts["interactions_bad_time"] == 5
    test = load_prepared(tmp_path / "out", split="test")
    assert test["timestamps"] == [[1, 2, 3, 4]] and test["item_ids"] == [["i1", "i2", "i3", "i4"]]
    # a numeric (float) column, e.g. from Parquet, takes the same path
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"timestamp": "float64"})
    frame.to_parquet(tmp_path / "src" / "inter.parquet", index=False)
    result = prepare_dataset(tmp_path / "src" / "inter.parquet", items, tmp_path / "out2", text_cols=["title"],
                             progress=False, verbose=False)
    assert result.counts["interactions_bad_time"] == 5
    assert load_prepared(tmp_path / "out2", split="test")["timestamps"] == [[1, 2, 3, 4]]


def test_recbole_preset_honours_encoding_and_a_decode_error_names_file_encoding_and_option(tmp_path, capsys):
    source = tmp_path / "recbole"
    source.mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"u{u}\ti{i}\t{i}" for u in (1, 2) for i in (1, 2, 3, 4)]
    (source / "shop.inter").write_text("\n".join(lines) + "\n", encoding="latin-1")
    items = ["item_id:token\ttitle:token_seq"] + [f"i{i}\tCafé crème {i}" for i in (1, 2, 3, 4)]
    (source / "shop.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    base = ["--preset", "recbole", "--source", str(source)]
    code, err = _prepare_cli(capsys, *base, "--output", str(tmp_path / "bad"))
    assert code == 1
    assert f"{source / 'shop.item'}: line 2" in err and "not valid utf-8" in err and "--encoding latin-1" in err
    assert len(err.strip().splitlines()) == 1
    code, err = _prepare_cli(capsys, *base, "--output", str(tmp_path / "good"), "--encoding", "latin-1")
    assert code == 0, err
    items_ds, _ = load_items(tmp_path / "good", decode_images=False)
    assert items_ds["text"] == [f"Café crème {i}" for i in (1, 2, 3, 4)]
    code, err = _prepare_cli(capsys, *base, "--output", str(tmp_path / "x"), "--encoding", "no-such-codec")
    assert code == 1 and "encoding 'no-such-codec' (CLI: --encoding) is not a known text encoding" in err


@pytest.mark.parametrize(
    "template, message",
    [
        ("{title:d}", "text_template (CLI: --text-template) '{title:d}' cannot format text values: ValueError: "
                      "Unknown format code 'd'"),
        ("{title", "text_template (CLI: --text-template) '{title' is not a valid template: "),
        ("{titel}. {item_id}", "items.csv: missing column 'titel' (named by text_template (CLI: --text-template) "
                               "'{titel}. {item_id}'; did you mean {title}?)"),
    ],
)
def test_bad_text_template_is_an_error_naming_the_template_and_option(tmp_path, capsys, template, message):
    inter, items = _tables(tmp_path / "src")
    code, err = _prepare_cli(capsys, "--interactions", str(inter), "--items", str(items), "--text-template", template,
                             "--output", str(tmp_path / "out"))
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_an_error_naming_it(tmp_path, capsys):
    inter, items = _tables(tmp_path / "src")
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    for output, what in ((target, "is a file"), (target / "sub", f"is inside {target}, which is a file")):
        code, err = _prepare_cli(capsys, "--interactions", str(inter), "--items", str(items), "--text-cols", "title",
                                 "--output", str(output))
        assert code == 1
        assert err.strip() == f"pmmrec-prepare: error: output folder (CLI --output) {output} {what}, not a folder; give a folder path"
    assert target.read_text() == "mine"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_paths_from_the_data_stay_inside_the_image_root_unless_allowed(tmp_path, capsys):
    root = tmp_path / "src"
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok.png").write_bytes(_png())
    secret = tmp_path / "secret.png"  # outside the image root
    secret.write_bytes(_png())
    inter, _ = _tables(root)
    for bad in ("../secret.png", str(secret)):
        items = root / "items.csv"
        pd.DataFrame({"item_id": ["i1", "i2", "i3", "i4"], "title": ["a", "b", "c", "d"],
                      "image": ["img/ok.png", bad, "img/ok.png", None]}).to_csv(items, index=False)
        code, err = _prepare_cli(capsys, "--interactions", str(inter), "--items", str(items), "--text-cols", "title",
                                 "--image-col", "image", "--output", str(tmp_path / "out"))
        assert code == 1
        assert (f"{items}: item 'i2': image path {bad!r} (from column 'image') is outside the image root {root}"
                in err), err
        assert "--allow-outside-paths" in err and not (tmp_path / "out").exists()
    # a pattern filled with a row's value is confined too
    evil = root / "evil.csv"
    pd.DataFrame({"item_id": ["i1", "i2", "i3", "i4"], "title": ["a", "b", "c", "d"],
                  "file": ["ok", "../../secret", "ok", "ok"]}).to_csv(evil, index=False)
    code, err = _prepare_cli(capsys, "--interactions", str(inter), "--items", str(evil), "--text-cols", "title",
                             "--image-pattern", "img/{file}.png", "--output", str(tmp_path / "out"))
    assert code == 1 and "item 'i2': image path 'img/../../secret.png' (from image_pattern 'img/{file}.png')" in err
    # trusted data: the opt-out reads it
    code, err = _prepare_cli(capsys, "--interactions", str(inter), "--items", str(items), "--text-cols", "title",
                             "--image-col", "image", "--output", str(tmp_path / "out"), "--allow-outside-paths")
    assert code == 0, err
    loaded, index = load_items(tmp_path / "out", decode_images=False)
    assert loaded[index["i2"]]["image"]["bytes"] == secret.read_bytes()


def test_metadata_file_entries_stay_inside_the_dataset_folder_unless_allowed(tmp_path):
    folder = tmp_path / "data"
    make_synthetic_dataset(num_items=20, num_users=12, seed=3, output_dir=folder)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (folder / "test.parquet").rename(outside / "test.parquet")
    metadata_path = folder / "pmmrec_dataset.json"
    original = json.loads(metadata_path.read_text())
    for entry in ("../elsewhere/test.parquet", str(outside / "test.parquet")):
        metadata = json.loads(json.dumps(original))
        metadata["files"]["test"] = [entry]
        metadata_path.write_text(json.dumps(metadata))
        write_marker(folder)  # edited by hand, then marked complete: the confinement check is what refuses it
        with pytest.raises(ValueError) as err:
            load_prepared(folder)
        assert str(err.value) == (
            f"{folder.resolve() / 'pmmrec_dataset.json'}: files['test'][0] = {entry!r} points outside the dataset "
            "folder; refused (pass allow_outside_paths=True to load_prepared / load_items for trusted data)"
        )
        assert len(load_prepared(folder, split="test", allow_outside_paths=True)) == 12
    metadata = json.loads(json.dumps(original))
    metadata["files"]["items"] = ["../../items.parquet"]
    metadata_path.write_text(json.dumps(metadata))
    write_marker(folder)
    with pytest.raises(ValueError, match=r"files\['items'\]\[0\] = '../../items.parquet' points outside"):
        load_items(folder)


def test_dataset_metadata_that_is_not_json_is_an_error_naming_its_path(tmp_path):
    folder = tmp_path / "data"
    make_synthetic_dataset(num_items=20, num_users=12, seed=3, output_dir=folder)
    (folder / "pmmrec_dataset.json").write_text('{"format": "pmmrec_hf.prepared", ')
    write_marker(folder)  # damaged by hand but marked complete: the JSON error is what is left to report
    with pytest.raises(ValueError, match=rf"^{folder / 'pmmrec_dataset.json'}: not valid JSON"):
        load_prepared(folder)


# --------------------------------------------------------------------------------------------------
# the Hub


def test_push_to_hub_without_a_usable_token_is_a_one_line_error_saying_to_log_in(tmp_path, capsys, local_hub_server):
    inter, items = _tables(tmp_path / "src")
    args = ["--interactions", str(inter), "--items", str(items), "--text-cols", "title", "--push-to-hub", "alice/shop"]
    with use_local_hub(local_hub_server):  # anonymous: no token anywhere
        code, err = _prepare_cli(capsys, *args, "--output", str(tmp_path / "a"))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "pushing the dataset to 'alice/shop' needs a Hugging Face token with write access" in err
    assert "hf auth login" in err and "--token" in err
    assert not (tmp_path / "a").exists()  # refused before the import's work
    with use_local_hub(local_hub_server):  # a token the server answers 401 to
        code, err = _prepare_cli(capsys, *args, "--output", str(tmp_path / "b"), "--token", "hf_not_a_token")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "refused to push the dataset to 'alice/shop' (HTTP 401" in err and "hf auth login" in err
    assert f"the prepared folder {tmp_path / 'b'} is complete" in err
    assert (tmp_path / "b" / "pmmrec_dataset.json").is_file()


def test_private_push_onto_an_existing_public_dataset_repo_warns_like_the_model_push(tmp_path, local_hub_server, caplog):
    from huggingface_hub import HfApi

    make_synthetic_dataset(num_items=20, num_users=12, seed=3, output_dir=tmp_path / "data")
    with use_local_hub(local_hub_server, token=TOKEN):
        api = HfApi(token=TOKEN)
        api.create_repo("alice/open-data", repo_type="dataset", private=False)
        with caplog.at_level(logging.WARNING, logger="pmmrec_hf.hub"):
            push_prepared_to_hub(tmp_path / "data", "alice/open-data", token=TOKEN, private=True)
        warnings = [r.getMessage() for r in caplog.records if r.name == "pmmrec_hf.hub"]
        assert warnings == ["'alice/open-data' already exists and is public: private=True does not change an existing "
                            "repo, the upload is public (make it private first with HfApi().update_repo_settings)."]
        assert api.repo_info("alice/open-data", repo_type="dataset").private is False
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pmmrec_hf.hub"):  # a new repo: created private, no warning
            push_prepared_to_hub(tmp_path / "data", "alice/closed-data", token=TOKEN, private=True)
        assert not [r for r in caplog.records if r.name == "pmmrec_hf.hub"]
        assert api.repo_info("alice/closed-data", repo_type="dataset").private is True
    with pytest.raises(PMMRecAuthError, match="needs a Hugging Face token"):
        push_prepared_to_hub(tmp_path / "data", "alice/open-data", token=False)


# --------------------------------------------------------------------------------------------------
# configs and checkpoints


def test_config_json_that_is_not_json_is_an_error_naming_its_path(tmp_path):
    folder = tmp_path / "user"
    PMMRecUserEncoder(tiny_user_config()).save_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "pmmrec_user_encoder",')
    with pytest.raises(ValueError) as err:
        PMMRecUserEncoder.from_pretrained(folder)
    assert f"{folder / 'config.json'} is not valid JSON" in str(err.value)
    with pytest.raises(OSError, match=str(folder / "config.json")):
        PMMRecUserEncoderConfig.from_pretrained(folder)  # transformers' own reader names it too


def test_unknown_activation_is_an_error_naming_the_field_and_the_allowed_values(tmp_path):
    with pytest.raises(ValueError) as err:
        PMMRecUserEncoderConfig(hidden_act="gelu_fancy")
    assert str(err.value).startswith("`hidden_act` must be one of ['gelu', ") and "'relu'" in str(err.value)
    assert str(err.value).endswith("got 'gelu_fancy'.")
    with pytest.raises(ValueError, match=r"^`fusion_hidden_act` must be one of \[.*'gelu'.*\], got 'swoosh'\.$"):
        tiny_config(item_kw={"fusion_hidden_act": "swoosh"})
    folder = tmp_path / "user"  # the same from a saved config.json
    PMMRecUserEncoder(tiny_user_config()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_fancy"}))
    with pytest.raises(ValueError, match="`hidden_act` must be one of"):
        PMMRecUserEncoder.from_pretrained(folder)


def test_config_field_typo_warns_naming_the_field_and_the_close_match(tmp_path, caplog):
    logger = "pmmrec_hf.configuration_pmmrec"
    with caplog.at_level(logging.WARNING, logger=logger):
        config = PMMRecUserEncoderConfig(hidden_size=16, intermediate_size=32, num_hiden_layers=4)
    messages = [r.getMessage() for r in caplog.records if r.name == logger]
    assert messages == ["PMMRecUserEncoderConfig: unknown field 'num_hiden_layers' (did you mean 'num_hidden_layers'?); "
                        "it is kept as an attribute but no part of pmmrec_user_encoder uses it."]
    assert config.num_hidden_layers == 2 and config.num_hiden_layers == 4  # kept, as transformers does
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger):
        PMMRecItemEncoderConfig(text_config=tiny_config().item_encoder_config.text_config, modality="text",
                                hidden_size=16, fusion_num_attention_heads=2, fusion_droput=0.2)
    assert [r.getMessage() for r in caplog.records if r.name == logger][0].startswith(
        "PMMRecItemEncoderConfig: unknown field 'fusion_droput' (did you mean 'fusion_dropout'?)")
    # a normal save / load round trip of every component warns about nothing
    caplog.clear()
    model = PMMRecModel(tiny_config())
    with caplog.at_level(logging.WARNING, logger=logger):
        model.save_pretrained(tmp_path / "full")
        PMMRecModel.from_pretrained(tmp_path / "full")
        model.user_encoder.save_pretrained(tmp_path / "user")
        PMMRecUserEncoder.from_pretrained(tmp_path / "user")
    assert not [r for r in caplog.records if r.name == logger]
    # and a typo in a saved config.json warns when it is loaded
    config = json.loads((tmp_path / "user" / "config.json").read_text())
    (tmp_path / "user" / "config.json").write_text(json.dumps({**config, "max_position_embedings": 50}))
    with caplog.at_level(logging.WARNING, logger=logger):
        PMMRecUserEncoder.from_pretrained(tmp_path / "user")
    assert any("unknown field 'max_position_embedings' (did you mean 'max_position_embeddings'?)" in r.getMessage()
               for r in caplog.records)


def test_from_pretrained_with_a_config_still_checks_the_component(tmp_path):
    model = PMMRecModel(tiny_config())
    model.save_pretrained(tmp_path / "full")
    model.user_encoder.save_pretrained(tmp_path / "user")
    user_config = model.config.user_encoder_config
    with pytest.raises(ValueError, match=r"holds a PMMRec full model, not a PMMRec user encoder.*found 'pmmrec'"):
        PMMRecUserEncoder.from_pretrained(tmp_path / "full", config=user_config)
    with pytest.raises(ValueError, match=r"the config= given is a PMMRecConfig \(model_type 'pmmrec'\); "
                                         r"PMMRecUserEncoder needs model_type 'pmmrec_user_encoder'"):
        PMMRecUserEncoder.from_pretrained(tmp_path / "user", config=model.config)
    loaded = PMMRecUserEncoder.from_pretrained(tmp_path / "user", config=user_config)  # the right pair loads
    for (name, a), (_, b) in zip(model.user_encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    (tmp_path / "user" / "config.json").unlink()  # weights alone + config=: still accepted
    assert isinstance(PMMRecUserEncoder.from_pretrained(tmp_path / "user", config=user_config), PMMRecUserEncoder)


# --------------------------------------------------------------------------------------------------
# ranking with ties


def test_near_tied_scores_rank_with_hand_computed_tie_semantics():
    # u = (+1 x 32, -1 x 32); item 0 = all ones (score 0), item k = ones + 2**-20 on coordinate k-1: items 1..32 score
    # +2**-20, items 33..64 score -2**-20 (exact in float32 and float64). All 65 are within the float32 band of each
    # other, rows all differ: every comparison goes through the float64 refinement or the exact path.
    dim = 64
    user = torch.cat([torch.ones(32), -torch.ones(32)])[None]
    items = torch.ones(1 + dim, dim)
    items[1:] += torch.eye(dim) * 2.0**-20
    targets = torch.tensor([0, 5, 40])
    users = user.expand(3, dim).contiguous()
    # target 0: 32 items above -> 33; target 5: 31 exact ties with distinct rows, counted pessimistically -> 32;
    # target 40: 32 above, item 0 above, 31 ties -> 65 (the last place)
    for chunk_size in (65536, 7):
        assert target_ranks(users, items, targets, chunk_size=chunk_size).tolist() == [33, 32, 65]
    # history removes items from the count: target 5 without items 1..4 above it -> 28
    assert target_ranks(user, items, [5], history=[[1, 2, 3, 4]]).tolist() == [28]


def test_near_tied_ranks_equal_the_exactly_computed_ranks():
    gen = torch.Generator().manual_seed(7)
    dim, num_items = 48, 3000
    items = torch.randn(dim, generator=gen) + 1e-6 * torch.randn(num_items, dim, generator=gen)
    items[10] = items[20]  # an exact duplicate row still ties
    users = torch.randn(6, dim, generator=gen)
    users[5] = users[0]
    targets = torch.tensor([20, 0, 1, 2999, 1500, 10])
    # exact reference: products of float32 values are exact in float64, math.fsum sums them exactly
    exact = [[math.fsum((users[u].double() * items[i].double()).tolist()) for i in range(num_items)] for u in range(6)]
    expected = [1 + sum(1 for i in range(num_items) if i != t and exact[u][i] >= exact[u][t])
                for u, t in enumerate(targets.tolist())]
    assert target_ranks(users, items, targets, chunk_size=1024).tolist() == expected
    assert expected[0] == expected[5]  # items 10 and 20 are the same row: the same user ranks them the same
