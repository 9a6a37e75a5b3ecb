"""Catalogue files carry their dtype and a sha256 checksum: an altered file (values, ids, swapped rows,
dtype), a NaN/inf row or an older file without a checksum is refused or flagged at load, naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pmmrec_hf.recommend import CATALOGUE_FORMAT, catalogue_checksum, load_catalogue_file, save_catalogue_file

IDS = [f"i{k}" for k in range(4)]


def _embeddings(dtype=torch.float32) -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).reshape(4, 3).to(dtype)


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def _rewrite(path, tensor, **changes):
    """The file with its tensor replaced and metadata entries changed (None: removed), as a tamperer would."""
    metadata = {**_metadata(path), **changes}
    save_file({"item_embeddings": tensor}, str(path), metadata={k: v for k, v in metadata.items() if v is not None})


def test_the_file_records_dtype_and_checksum_and_round_trips_bit_exactly(tmp_path):
    path = tmp_path / "c.safetensors"
    save_catalogue_file(str(path), IDS, _embeddings())
    meta = _metadata(path)
    assert meta["format"] == CATALOGUE_FORMAT == "pmmrec_catalogue/2" and meta["dtype"] == "float32"
    assert meta["sha256"] == catalogue_checksum(IDS, _embeddings()) and len(meta["sha256"]) == 64
    ids, embeddings = load_catalogue_file(str(path))
    assert ids == IDS and torch.equal(embeddings, _embeddings())


@pytest.mark.parametrize("tamper", ["swapped rows", "changed value", "swapped ids"])
def test_an_altered_catalogue_is_refused(tmp_path, tamper):
    path = tmp_path / "c.safetensors"
    save_catalogue_file(str(path), IDS, _embeddings())
    tensor = load_file(str(path))["item_embeddings"]
    if tamper == "swapped rows":
        _rewrite(path, tensor[[1, 0, 2, 3]].contiguous())
    elif tamper == "changed value":
        tensor[2, 1] += 1e-3
        _rewrite(path, tensor)
    else:
        _rewrite(path, tensor, item_ids=json.dumps([IDS[1], IDS[0], *IDS[2:]]))
    with pytest.raises(ValueError, match=rf"{path}: the checksum does not match the ids and embeddings"):
        load_catalogue_file(str(path))


def test_a_dtype_that_is_not_the_recorded_one_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_catalogue_file(str(path), IDS, _embeddings())
    _rewrite(path, _embeddings(torch.float16))
    with pytest.raises(ValueError, match=rf"{path}: the tensor is float16 but the file says float32"):
        load_catalogue_file(str(path))


def test_non_finite_rows_are_refused_naming_rows_ids_and_file(tmp_path):
    path = tmp_path / "c.safetensors"
    bad = _embeddings()
    bad[1, 0], bad[3, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"2 row\(s\) hold NaN or inf: row\(s\) 1 \('i1'\), 3 \('i3'\)"):
        save_catalogue_file(str(path), IDS, bad)  # never written
    assert not path.exists()
    save_catalogue_file(str(path), IDS, _embeddings())
    _rewrite(path, bad, sha256=catalogue_checksum(IDS, bad))  # even with a matching checksum
    with pytest.raises(ValueError, match=rf"{path}: 2 row\(s\) hold NaN or inf: row\(s\) 1 \('i1'\), 3 \('i3'\)"):
        load_catalogue_file(str(path))


def test_a_float16_catalogue_loads_into_the_recommender_as_float32(tmp_path):
    from pmmrec_hf.recommend import Recommender
    from pmmrec_hf.sasrec import SASRecConfig, SASRecModel

    path = tmp_path / "c.safetensors"
    half = _embeddings(torch.float16)
    save_catalogue_file(str(path), IDS, half)
    assert _metadata(path)["dtype"] == "float16"
    assert load_catalogue_file(str(path))[1].dtype == torch.float16  # the file's dtype, as stored
    model = SASRecModel(SASRecConfig(num_items=4, hidden_size=3, intermediate_size=8, num_attention_heads=1,
                                     max_position_embeddings=4, num_hidden_layers=1))
    rec = Recommender(model)
    with pytest.warns(UserWarning, match=r"a float16 catalogue; converted to float32 \(exactly\)"):
        rec.load_catalogue(str(path))
    assert rec.item_embeddings.dtype == torch.float32 and torch.equal(rec.item_embeddings, half.float())


def test_a_version_1_file_without_checksum_loads_with_a_warning(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"item_embeddings": _embeddings()}, str(path),
              metadata={"format": "pmmrec_catalogue/1", "item_ids": json.dumps(IDS), "num_items": "4"})
    with pytest.warns(UserWarning, match="has no checksum; its integrity is not checked"):
        ids, embeddings = load_catalogue_file(str(path))
    assert ids == IDS and torch.equal(embeddings, _embeddings())
