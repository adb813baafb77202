"""The CLI end to end on tiny data: info, train, predict (OME-Zarr and TIFF), methods."""

from __future__ import annotations

import json

import numpy as np
import tifffile
import zarr
from click.testing import CliRunner

from helpers import write_ome
from quietscope_cli.main import cli


def invoke(*args: str):
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_train_predict_info_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = (100 + 10 * rng.standard_normal((2, 40, 44))).astype(np.float32)  # t y x
    src = write_ome(tmp_path / "in.ome.zarr", data, "tyx", (1, 16, 16), scale=(1.0, 0.3, 0.3))
    info = json.loads(invoke("-q", "info", src, "--json"))
    assert info["axes"] == "tyx" and info["shape"] == [2, 40, 44] and info["scale"] == [1.0, 0.3, 0.3]

    model = str(tmp_path / "m.qs")
    out = invoke("-q", "train", src, "-o", model, "--patch", "16", "--batch", "2", "--steps", "4",
                 "--depth", "1", "--filters", "4", "--checkpoint-every", "2")
    assert "model:" in out
    minfo = json.loads(invoke("-q", "info", model, "--json"))
    assert minfo["method"]["method"] == "n2v" and minfo["axes"] == "tyx"

    out = invoke("-q", "predict", model, src, "-o", str(tmp_path / "d.ome.zarr"), "--chunks", "16,16", "--no-progress")
    assert "blocks" in out
    assert zarr.open_array(store=str(tmp_path / "d.ome.zarr" / "0"), mode="r").shape == (2, 40, 44)

    invoke("-q", "predict", model, src, "-o", str(tmp_path / "d.tif"), "--chunks", "16,16", "--no-progress", "--dtype", "uint16")
    tif = tifffile.imread(tmp_path / "d.tif")
    assert tif.shape == (2, 40, 44) and tif.dtype == np.uint16
    np.testing.assert_array_equal(
        tif, np.clip(np.rint(zarr.open_array(store=str(tmp_path / "d.ome.zarr" / "0"), mode="r")[...]), 0, 65535)
    )
    assert not any(p.name.startswith(".quietscope-") for p in tmp_path.iterdir())  # temp store removed


def test_methods_lists_the_registry():
    out = invoke("methods")
    for name in ("n2v", "n2v2", "bayes-poisson", "n2v-deconv"):
        assert name in out


def test_cli_batch_norm_and_tta_reach_the_library(tmp_path):
    rng = np.random.default_rng(1)
    src = write_ome(tmp_path / "in.ome.zarr", (100 + 10 * rng.standard_normal((40, 44))).astype(np.float32), "yx", (16, 16))
    common = ("--patch", "16", "--batch", "2", "--steps", "3", "--depth", "1", "--filters", "4")
    invoke("-q", "train", src, "-o", str(tmp_path / "plain.qs"), *common)
    invoke("-q", "train", src, "-o", str(tmp_path / "bn.qs"), *common, "--batch-norm")
    nets = {n: json.loads(invoke("-q", "info", str(tmp_path / f"{n}.qs"), "--json"))["method"]["net"] for n in ("plain", "bn")}
    assert nets["plain"]["batch_norm"] is False and nets["bn"]["batch_norm"] is True

    outs = {}
    for name, extra in (("plain", ()), ("tta", ("--tta",))):
        out = tmp_path / f"{name}.ome.zarr"
        invoke("-q", "predict", str(tmp_path / "plain.qs"), src, "-o", str(out), "--no-progress", *extra)
        outs[name] = zarr.open_array(store=str(out / "0"), mode="r")[...]
        assert zarr.open_group(store=str(out), mode="r").attrs["quietscope"]["tta"] is (name == "tta")
    assert outs["tta"].shape == outs["plain"].shape and not np.allclose(outs["tta"], outs["plain"])
