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


def test_z_pool_auto_keeps_full_z_resolution_on_anisotropic_stacks(tmp_path):
    """--z-pool auto: a stack whose z step is 5x its pixel size trains a U-Net that does not
    pool z (so a 6-plane patch is fine at depth 2); a near-isotropic one pools z as before."""
    rng = np.random.default_rng(2)
    data = (100 + 10 * rng.standard_normal((12, 32, 32))).astype(np.float32)
    common = ("--batch", "2", "--steps", "2", "--depth", "2", "--filters", "4", "--checkpoint-every", "2")
    aniso = write_ome(tmp_path / "aniso.ome.zarr", data, "zyx", (6, 16, 16), scale=(2.0, 0.4, 0.4))
    iso = write_ome(tmp_path / "iso.ome.zarr", data, "zyx", (6, 16, 16), scale=(0.5, 0.4, 0.4))
    invoke("-q", "train", aniso, "-o", str(tmp_path / "a.qs"), "--patch", "6,16,16", *common)
    invoke("-q", "train", iso, "-o", str(tmp_path / "i.qs"), "--patch", "8,16,16", *common)
    assert json.loads(invoke("-q", "info", str(tmp_path / "a.qs"), "--json"))["method"]["net"]["z_pool"] is False
    assert json.loads(invoke("-q", "info", str(tmp_path / "i.qs"), "--json"))["method"]["net"]["z_pool"] is True

    runner = CliRunner()
    r = runner.invoke(cli, ["-q", "train", iso, "-o", str(tmp_path / "x.qs"), "--patch", "6,16,16", *common])
    assert r.exit_code == 2 and "must be a multiple of (4, 4, 4)" in r.output
    r = runner.invoke(cli, ["-q", "train", aniso, "-o", str(tmp_path / "b.qs"), "--patch", "8,16,16", "--method",
                            "bayes-poisson", "--z-pool", "no", *common])
    assert r.exit_code == 2 and "always down-samples z" in r.output
    flat = write_ome(tmp_path / "flat.ome.zarr", data[0], "yx", (16, 16))
    r = runner.invoke(cli, ["-q", "train", flat, "-o", str(tmp_path / "f.qs"), "--patch", "16", "--z-pool", "no", *common])
    assert r.exit_code == 2 and "3D data only" in r.output


def test_outputs_in_folders_that_do_not_exist_yet(tmp_path):
    """The model's folder is created before training (it used to fail at the first checkpoint,
    after the training time was spent); TIFF outputs get their folder like OME-Zarr ones."""
    rng = np.random.default_rng(3)
    src = write_ome(tmp_path / "in.ome.zarr", (100 + 10 * rng.standard_normal((32, 32))).astype(np.float32), "yx", (16, 16))
    model = tmp_path / "models" / "run1" / "m.qs"
    invoke("-q", "train", src, "-o", str(model), "--patch", "16", "--batch", "2", "--steps", "2", "--depth", "1",
           "--filters", "4", "--checkpoint-every", "1")
    assert model.exists()
    out = tmp_path / "results" / "d.tif"
    invoke("-q", "predict", str(model), src, "-o", str(out), "--no-progress")
    assert tifffile.imread(out).shape == (32, 32)
