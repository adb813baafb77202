"""The model file: self-describing, round-trips exactly, never executes code from the file."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch

from helpers import random_model
from quietscope import __version__
from quietscope.errors import ModelError
from quietscope.methods.modelfile import load_model, read_manifest


def test_round_trip_is_exact_and_self_describing(tmp_path):
    p = random_model(tmp_path / "m.qs", 2, depth=2, filters=4, mean=12.5, std=3.0)
    method, manifest = load_model(p)
    again, _ = load_model(p)
    for (k, a), (_, b) in zip(method.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert manifest["quietscope_version"] == __version__
    assert manifest["method"]["method"] == "n2v" and manifest["method"]["net"]["filters"] == 4
    assert method.norm_mean.item() == 12.5 and method.norm_std.item() == 3.0
    with zipfile.ZipFile(p) as zf:
        assert sorted(zf.namelist()) == ["manifest.json", "tensors.safetensors"]
        json.loads(zf.read("manifest.json"))


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.qs"
    torch.save({"weights": _Exploit(str(marker))}, evil)  # a zip holding data.pkl
    with pytest.raises(ModelError, match="not a quietscope model"):
        load_model(evil)
    plain = tmp_path / "evil2.qs"
    plain.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ModelError, match="refusing to load"):
        load_model(plain)
    assert not marker.exists()


def test_a_pickle_disguised_as_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    good = random_model(tmp_path / "m.qs", 2, depth=1)
    evil = tmp_path / "evil.qs"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        dst.writestr("manifest.json", src.read("manifest.json"))
        dst.writestr("tensors.safetensors", pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ModelError, match="unreadable"):
        load_model(evil)
    assert not marker.exists()


def test_manifest_is_readable_without_loading_weights(tmp_path):
    p = random_model(tmp_path / "m.qs", 3, depth=1)
    m = read_manifest(p)
    assert m["method"]["spatial_ndim"] == 3 and "torch_version" in m
