"""``quietscope inspect-noise``: lazy block sampling, report, plots, residual of a prediction."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

from quietscope.errors import ConfigError, InputError
from quietscope.io import open_image
from quietscope.io.sample_data import find_data_dir, synthetic_clean
from quietscope.methods.modelfile import read_manifest
from quietscope.workflows.inspect_noise import (
    block_shape_for,
    inspect_noise,
    read_blocks,
    sample_blocks,
)
from quietscope_cli.main import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _camera(clean: np.ndarray, rng: np.random.Generator, gain=2.0, sigma=3.0, offset=100.0) -> np.ndarray:
    return gain * rng.poisson(clean / gain) + offset + rng.normal(0, sigma, clean.shape)


def _box(shape, rng, axis, length, sd):
    """White noise averaged over ``length`` pixels along ``axis`` (then rescaled to ``sd``)."""
    n = ndimage.uniform_filter1d(rng.normal(size=shape), length, axis=axis, mode="wrap")
    return n * sd / n.std()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 512x512 image with noise correlated along x, its clean signal, a white-noise twin."""
    d = tmp_path_factory.mktemp("inspect")
    rng = np.random.default_rng(0)
    clean = synthetic_clean((512, 512), seed=1).astype(np.float64) * 3
    structured = _box(clean.shape, rng, axis=1, length=5, sd=16.0)
    corr = np.clip(_camera(clean, rng) + structured, 0, 65535).astype(np.uint16)
    white = np.clip(_camera(clean, rng), 0, 65535).astype(np.uint16)
    paths = {
        "corr": d / "corr.tif",
        "white": d / "white.tif",
        "clean": d / "clean.tif",
        "clean_plus_structured": d / "clean_plus_structured.tif",
        "blurred": d / "blurred.tif",
        "small": d / "small.tif",
    }
    tifffile.imwrite(paths["corr"], corr)
    tifffile.imwrite(paths["white"], white)
    tifffile.imwrite(paths["clean"], (clean + 100).astype(np.float32))
    # A "denoiser" that kept the structured noise: what plain N2V does on such data.
    tifffile.imwrite(paths["clean_plus_structured"], (clean + 100 + structured).astype(np.float32))
    tifffile.imwrite(paths["blurred"], ndimage.gaussian_filter(clean + 100, 3).astype(np.float32))
    tifffile.imwrite(paths["small"], white[:64, :64])
    return paths


def _run(args):
    return CliRunner().invoke(cli, ["inspect-noise", *map(str, args)])


# ---- sampling ----------------------------------------------------------------------------


def test_sample_blocks_are_distinct_inside_and_bounded():
    s = sample_blocks((100, 300, 260), (20, 64, 64), n_blocks=10, n_timepoints=3, seed=4)
    assert len(s.t) == 10
    keys = {(t, tuple(x.start for x in sl)) for t, sl in zip(s.t, s.slices)}
    assert len(keys) == 10  # no block drawn twice
    for t, sl in zip(s.t, s.slices):
        assert 0 <= t < 3
        assert [x.stop - x.start for x in sl] == [20, 64, 64]
        assert all(0 <= x.start and x.stop <= n for x, n in zip(sl, (100, 300, 260)))
    # Same seed, same draw; more blocks than cells gives every cell once.
    assert sample_blocks((100, 300, 260), (20, 64, 64), 10, 3, seed=4).slices == s.slices
    assert len(sample_blocks((64, 64), (32, 32), 99).t) == 4


def test_block_shape_is_clipped_and_checked():
    assert block_shape_for((17, 192, 279), 128) == (17, 128, 128)
    assert block_shape_for((17, 192, 279), (8, 64, 96)) == (8, 64, 96)
    with pytest.raises(ConfigError, match="4 along z"):
        block_shape_for((17, 192, 279), (2, 64, 96))
    with pytest.raises(ConfigError, match="2 values.*3 spatial"):
        block_shape_for((17, 192, 279), (64, 64))
    with pytest.raises(ConfigError, match="at least 16"):
        block_shape_for((512, 512), 8)
    with pytest.raises(InputError, match="at least 16"):
        block_shape_for((10, 512), 128)


def test_only_the_sampled_blocks_are_read(images, monkeypatch):
    """The driver reads through Image.read_tc and never more than the sampled voxels."""
    from quietscope.io.reading import Image

    read = []
    orig = Image.read_tc

    def counting(self, t, spatial, channel=None):
        out = orig(self, t, spatial, channel)
        read.append(out.size)
        return out

    monkeypatch.setattr(Image, "read_tc", counting)
    res = inspect_noise(images["corr"], n_blocks=3, block_size=64)
    assert sum(read) == res.voxels_read == 3 * 64 * 64
    assert res.fraction_read == pytest.approx(3 * 64 * 64 / 512**2)


# ---- the command -------------------------------------------------------------------------


def test_correlated_noise_recommends_structn2v_and_writes_report(images, tmp_path):
    out = tmp_path / "rep"
    r = _run([images["corr"], "-o", out, "--blocks", 8, "--block-size", 96])
    assert r.exit_code == 0, r.output
    assert "--method n2v --struct-mask x:9" in r.output
    assert "[NO ] pixel-independent noise" in r.output
    assert "Read 8 blocks of 96x96 (yx)" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "n2v"
    assert rep["options"][-2:] == ["--struct-mask", "x:9"]
    assert rep["structure"]["axes"]["x"]["correlated"] and not rep["structure"]["axes"]["y"]["correlated"]
    assert rep["sample"]["voxels_read"] == 8 * 96 * 96
    assert rep["residual"] is None
    for name in ("mean_variance.png", "autocorrelation.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_white_noise_gives_gain_and_json_output(images, tmp_path):
    r = _run([images["white"], "-o", tmp_path / "w", "--json", "--blocks", 12, "--offset", 100])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    assert rep["structure"]["pixel_independent"]
    nm = rep["noise_model"]
    assert nm["gain"] == pytest.approx(2.0, rel=0.15)
    assert nm["offset"] == 100.0
    assert rep["method"] in ("n2v", "bayes-poisson")
    if rep["method"] == "bayes-poisson":
        assert "--gain" in rep["options"]


@pytest.mark.parametrize(
    "pred, expect",
    [
        ("clean", "the residual looks like the noise"),
        ("clean_plus_structured", "--struct-mask x:9"),
        ("blurred", "signal leaks into the residual"),
    ],
)
def test_prediction_residual_is_judged(images, tmp_path, pred, expect):
    src = "corr" if pred == "clean_plus_structured" else "white"
    r = _run([images[src], "-o", tmp_path / pred, "--prediction", images[pred], "--blocks", 6])
    assert r.exit_code == 0, r.output
    assert expect in r.output
    rep = json.loads((tmp_path / pred / "report.json").read_text())
    lag = rep["residual"]["lag1"]
    if pred == "clean":
        assert abs(lag["x"]) < 0.05 and abs(lag["y"]) < 0.05
        assert abs(rep["residual"]["signal_correlation"]) < 0.1
    elif pred == "clean_plus_structured":
        # The prediction kept the correlated noise: the residual along x is whiter than the noise.
        assert lag["x"] < rep["structure"]["axes"]["x"]["strength"] - 0.3
    else:
        assert lag["x"] > 0.3 and lag["y"] > 0.3
    assert (tmp_path / pred / "residual_autocorrelation.png").read_bytes()[:8] == PNG


def test_model_residual(images, tmp_path):
    from quietscope.workflows.train import train_model

    model = tmp_path / "m.qs"
    train_model(
        images["white"], model, {"method": "n2v", "net": {"depth": 1, "filters": 4}},
        {"patch": (16,), "batch": 2, "steps": 3, "val_fraction": 0.1}, progress=False,
    )
    r = _run([images["white"], "-o", tmp_path / "rep", "--model", model, "--blocks", 2, "--block-size", 64])
    assert r.exit_code == 0, r.output
    assert "Residual: data minus the prediction of model" in r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(rep["residual"]["lag1"]) == {"y", "x"}
    assert rep["residual"]["residual_std"] > 0


def test_3d_structured_noise_along_z(tmp_path):
    rng = np.random.default_rng(3)
    clean = synthetic_clean((24, 96, 96), seed=2).astype(np.float64) * 2
    noisy = _camera(clean, rng) + _box(clean.shape, rng, axis=0, length=3, sd=6.0)
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, noisy.astype(np.float32))
    res = inspect_noise(path, n_blocks=4, block_size=(24, 48, 48), report_dir=tmp_path / "r")
    assert res.block_shape == (24, 48, 48) and res.axes == "zyx"
    assert res.report.options[-2:] == ["--struct-mask", "z:5"]
    assert (tmp_path / "r" / "autocorrelation.png").exists()


def test_time_and_channel_axes_are_sampled(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.normal(100, 5, size=(3, 2, 64, 64)).astype(np.float32)
    data[:, 1] += 1000  # channel 1 is brighter: the analysis must read it, not channel 0
    data[:, 1] += _box((3, 64, 64), rng, axis=1, length=3, sd=20)  # and correlated along y
    path = tmp_path / "tcyx.tif"
    tifffile.imwrite(path, data)
    img = open_image(path, axes="tcyx")
    s = sample_blocks(img.spatial_shape, (32, 32), 12, img.n_timepoints, seed=0)
    assert sorted(set(s.t)) == [0, 1, 2]
    assert np.mean(read_blocks(img, s, channel=1)) > 1000 > np.mean(read_blocks(img, s, channel=0))
    res = inspect_noise(path, axes="tcyx", channel=1, n_blocks=5, block_size=32)
    assert res.voxels_read == 5 * 32 * 32 and res.channel == 1
    # Flat noise defeats the gain fit; the correlation is still measured and acted on.
    assert res.report.estimate is None
    assert any("no camera noise model" in n for n in res.report.notes)
    assert res.report.options[-2:] == ["--struct-mask", "y:5"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--model", "m.qs", "--prediction", "p.tif"], "either --model or --prediction"),
        (["--block-size", "8"], "at least 16"),
        (["--blocks", "0"], "--blocks 0"),
        (["--channel", "2"], "--channel 2"),
    ],
)
def test_errors_are_one_line(images, tmp_path, extra, match):
    r = _run([images["white"], "-o", tmp_path / "r", *extra])
    assert r.exit_code == 2
    assert r.output.startswith("quietscope: error:") and match in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_prediction_of_another_shape_is_refused(images, tmp_path):
    r = _run([images["white"], "-o", tmp_path / "r", "--prediction", images["small"]])
    assert r.exit_code == 2 and "pass the prediction of this image" in r.output


# ---- real data ---------------------------------------------------------------------------


def _real(rel: str) -> Path:
    d = find_data_dir()
    if d is None or not (d / rel).exists():
        pytest.skip(f"real data {rel} not available (shared/data absent)")
    return d / rel


def test_real_w2s_noise_is_independent_photon_limited_and_clipped(tmp_path):
    res = inspect_noise(_real("w2s/noisy/fov081_ch0.tif"), n_blocks=8, report_dir=tmp_path)
    rep = res.report
    assert rep.structure.pixel_independent
    held = {a.name: a.holds for a in rep.assumptions}
    # W2S frames were contrast-stretched into 8 bits: about 0.2 % clipped (see the data README).
    assert held["zero-mean noise"] is False
    assert rep.estimate.r2 > 0.95 and rep.estimate.gain > 0
    assert res.voxels_read == 8 * 128 * 128


def test_real_yeast_3d_is_read_by_time_point(tmp_path):
    res = inspect_noise(_real("yeast3d/yeast_mito_tzyx.tif"), n_blocks=3, block_size=(16, 64, 64))
    assert res.axes == "zyx" and res.block_shape == (16, 64, 64)
    assert res.voxels_read == 3 * 16 * 64 * 64 < res.image_voxels


#: Appended to a recommended command: a compute budget only (none of these is recommended).
_TINY_BUDGET = ["--steps", "2", "--batch", "2", "--val-every", "2", "--filters", "8"]


@pytest.mark.parametrize("shape, correlated_axis", [((40, 56), None), ((17, 32, 32), 0)])
def test_the_recommended_command_runs_on_the_data(tmp_path, monkeypatch, shape, correlated_axis):
    """The 'Command:' line inspect-noise prints trains on that data as printed, plus a tiny
    compute budget: a 17-plane stack needs a patch thinner than train's default 64."""
    rng = np.random.default_rng(7)
    noisy = _camera(synthetic_clean(shape, seed=3).astype(np.float64) * 2, rng)
    if correlated_axis is not None:
        noisy += _box(shape, rng, axis=correlated_axis, length=3, sd=6.0)
    path = tmp_path / "data.tif"
    tifffile.imwrite(path, np.clip(noisy, 0, 65535).astype(np.uint16))
    monkeypatch.chdir(tmp_path)
    r = _run([path, "-o", "rep", "--blocks", 4])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("Command: "))
    command = shlex.split(line.removeprefix("Command: "))
    assert command[:5] == ["quietscope", "train", str(path), "-o", "model.qs"]
    assert not set(_TINY_BUDGET[::2]) & set(command)
    assert command[command.index("--patch") + 1] == ",".join(str(s - s % 4) for s in shape)
    if correlated_axis is not None:
        assert command[-2:] == ["--struct-mask", "z:5"]
    t = CliRunner().invoke(cli, ["-q", *command[1:], *_TINY_BUDGET])
    assert t.exit_code == 0, t.output
    manifest = read_manifest(tmp_path / "model.qs")
    assert manifest["method"]["method"] == command[command.index("--method") + 1]
    assert len(manifest["history"]) == 2 and manifest["spatial_axes"] == "zyx"[-len(shape):]
