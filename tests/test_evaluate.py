"""simulate (chunked == whole, noise statistics) and evaluate (numbers, errors, CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quietscope.errors import ConfigError, InputError
from quietscope.io.reading import open_image
from quietscope.io.writing import open_level
from quietscope.metrics import mean_and_sem, psnr, range_invariant_psnr, snr, ssim
from quietscope.workflows.demo import write_ome_zarr_image
from quietscope.workflows.evaluate import evaluate, evaluate_arrays
from quietscope.workflows.simulate import channel_std, simulate_array, simulate_image


def _clean(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(10, 200, shape).astype(np.float32)


@pytest.mark.parametrize(("shape", "axes", "chunks"), [((50, 70), "yx", (16, 32)), ((2, 6, 20, 30), "czyx", (4, 8, 16))])
def test_simulate_chunked_equals_whole(tmp_path, shape, axes, chunks):
    clean = _clean(shape)
    write_ome_zarr_image(tmp_path / "c.ome.zarr", clean, axes, tuple(min(s, 64) for s in shape), scale=[1.0] * (len(shape) - 2) + [0.5, 0.25])
    res = simulate_image(tmp_path / "c.ome.zarr", tmp_path / "n.ome.zarr", 0.5, 0.1, seed=3, chunks=chunks, n_levels=1)
    noisy = np.asarray(open_level(tmp_path / "n.ome.zarr", 0, "r")[...])
    whole = simulate_array(clean, axes, 0.5, 0.1, seed=3)
    np.testing.assert_array_equal(noisy, whole)
    # different chunking, same noise
    simulate_image(tmp_path / "c.ome.zarr", tmp_path / "m.ome.zarr", 0.5, 0.1, seed=3, chunks=tuple(c + 3 for c in chunks), n_levels=1)
    np.testing.assert_array_equal(np.asarray(open_level(tmp_path / "m.ome.zarr", 0, "r")[...]), noisy)
    # axes and scale kept, std exact for small data
    img = open_image(str(tmp_path / "n.ome.zarr"))
    assert img.axes == axes and img.scale[-2:] == (0.5, 0.25)
    assert res.std_source == "exact"
    if "c" in axes:
        assert not np.array_equal(noisy[0] - clean[0], noisy[1] - clean[1])  # channels get their own noise


def test_simulated_noise_statistics(tmp_path):
    # Poisson scale 0.5 on a flat 80 -> variance 80 / 0.5 = 160; plus Gaussian (0.1 * std)^2.
    clean = np.full((256, 256), 80.0, np.float32)
    clean[:, 128:] = 20.0
    std = float(clean.std())
    noisy = simulate_array(clean, "yx", 0.5, 0.1, seed=0)
    for level, region in ((80.0, noisy[:, :128]), (20.0, noisy[:, 128:])):
        expected_var = level / 0.5 + (0.1 * std) ** 2
        assert abs(region.mean() - level) < 0.1 * np.sqrt(expected_var)
        assert region.var() == pytest.approx(expected_var, rel=0.05)
    gauss_only = simulate_array(clean, "yx", None, 0.5, seed=1)
    assert (gauss_only - clean).std() == pytest.approx(0.5 * std, rel=0.03)


def test_sampled_std_close_to_exact():
    import dask.array as da

    rng = np.random.default_rng(0)
    a = da.from_array(rng.normal(5, 3, (64, 64, 64)), chunks=(8, 16, 16))
    exact, how = channel_std(a, "zyx")
    sampled, how2 = channel_std(a, "zyx", exact_max_voxels=1000, n_sample_chunks=40)
    assert how == "exact" and how2.startswith("sampled from 40")
    assert sampled[0] == pytest.approx(exact[0], rel=0.05)


def test_simulate_requires_some_noise(tmp_path):
    write_ome_zarr_image(tmp_path / "c.ome.zarr", _clean((20, 20)), "yx", (20, 20))
    with pytest.raises(ConfigError):
        simulate_image(tmp_path / "c.ome.zarr", tmp_path / "n.ome.zarr", None, None)


def test_evaluate_matches_metric_functions(tmp_path):
    rng = np.random.default_rng(1)
    gt = _clean((3, 40, 50))  # t, y, x: three images
    pred = gt + rng.normal(0, 5, gt.shape).astype(np.float32)
    write_ome_zarr_image(tmp_path / "gt.ome.zarr", gt, "tyx", (1, 40, 50))
    write_ome_zarr_image(tmp_path / "p.ome.zarr", pred, "tyx", (1, 20, 25))
    ev = evaluate(tmp_path / "p.ome.zarr", tmp_path / "gt.ome.zarr")
    assert len(ev.rows) == 3
    for t, row in enumerate(ev.rows):
        assert row["psnr"] == pytest.approx(psnr(pred[t], gt[t]))
        assert row["ri_psnr"] == pytest.approx(range_invariant_psnr(pred[t], gt[t]))
        assert row["ssim"] == pytest.approx(ssim(pred[t], gt[t]))
        assert row["snr"] == pytest.approx(snr(pred[t], gt[t]))
    mean, sem = mean_and_sem([psnr(pred[t], gt[t]) for t in range(3)])
    assert ev.summary["psnr"]["mean"] == pytest.approx(mean) and ev.summary["psnr"]["sem"] == pytest.approx(sem)
    # one 3D image is one row, same numbers as the in-memory path
    vol_gt = _clean((8, 40, 50), seed=2)
    vol = vol_gt + rng.normal(0, 5, vol_gt.shape)
    ev3 = evaluate_arrays(vol, vol_gt, "zyx")
    assert len(ev3.rows) == 1 and ev3.rows[0]["psnr"] == pytest.approx(psnr(vol, vol_gt))
    assert ev3.rows[0]["ssim"] == pytest.approx(ssim(vol, vol_gt))


def test_evaluate_shape_mismatch_is_clear(tmp_path):
    write_ome_zarr_image(tmp_path / "gt.ome.zarr", _clean((40, 50)), "yx", (40, 50))
    write_ome_zarr_image(tmp_path / "p.ome.zarr", _clean((40, 48)), "yx", (40, 48))
    with pytest.raises(InputError, match="same spatial shape"):
        evaluate(tmp_path / "p.ome.zarr", tmp_path / "gt.ome.zarr")
    with pytest.raises(InputError, match="same shape"):
        evaluate_arrays(np.zeros((4, 4)), np.zeros((4, 5)), "yx")


def test_cli_simulate_then_evaluate(tmp_path):
    import tifffile

    from quietscope_cli.main import cli

    clean = _clean((48, 64))
    tifffile.imwrite(tmp_path / "clean.tif", clean)
    runner = CliRunner()
    r = runner.invoke(cli, ["simulate", str(tmp_path / "clean.tif"), "-o", str(tmp_path / "noisy.ome.zarr"),
                            "--poisson", "0.2", "--gauss", "0.05", "--seed", "4", "--chunks", "16,32"])
    assert r.exit_code == 0, r.output
    noisy = np.asarray(open_level(tmp_path / "noisy.ome.zarr", 0, "r")[...])
    np.testing.assert_array_equal(noisy, simulate_array(clean, "yx", 0.2, 0.05, seed=4))
    r = runner.invoke(cli, ["evaluate", str(tmp_path / "noisy.ome.zarr"), str(tmp_path / "clean.tif"),
                            "--json", str(tmp_path / "m.json"), "--per-image"])
    assert r.exit_code == 0, r.output
    assert "t0_c0" in r.output and "mean ± s.e." in r.output
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["summary"]["psnr"]["mean"] == pytest.approx(psnr(noisy, clean))
    assert data["summary"]["psnr"]["sem"] is None  # one image: no standard error
    tifffile.imwrite(tmp_path / "small.tif", clean[:40])
    r = runner.invoke(cli, ["evaluate", str(tmp_path / "noisy.ome.zarr"), str(tmp_path / "small.tif")])
    assert r.exit_code == 2 and "same spatial shape" in r.output


@pytest.mark.parametrize("shape, max_voxels", [((61, 45), 200), ((13, 30, 23), 900), ((9, 7, 40), 100)])
def test_streamed_metrics_equal_whole_image_metrics(shape, max_voxels):
    """Blocks far smaller than the image (and an offset of 10^4 over a spread of ~50) give the
    whole-image numbers: the SSIM halo and the moment sums are exact, not approximations."""
    from quietscope.metrics.streaming import block_shape_for, streamed_metrics

    rng = np.random.default_rng(3)
    gt = 1e4 + _clean(shape, seed=4).astype(np.float64)
    pred = 0.7 * gt + rng.normal(0, 4, shape) + 120.0
    assert np.prod(block_shape_for(shape, max_voxels)) < gt.size / 4  # really several blocks
    got = streamed_metrics(lambda sl: pred[sl], lambda sl: gt[sl], shape, max_voxels=max_voxels)
    assert got["psnr"] == pytest.approx(psnr(pred, gt), rel=1e-9)
    assert got["ri_psnr"] == pytest.approx(range_invariant_psnr(pred, gt), rel=1e-7)
    assert got["ssim"] == pytest.approx(ssim(pred, gt), rel=1e-9)
    assert got["snr"] == pytest.approx(snr(pred, gt), rel=1e-9)


def test_evaluate_reads_files_in_blocks(tmp_path, monkeypatch):
    """A 3D image larger than max_voxels is never read whole, and the numbers do not change."""
    from quietscope.io import reading

    rng = np.random.default_rng(5)
    gt = _clean((12, 40, 50), seed=6)
    pred = gt + rng.normal(0, 5, gt.shape).astype(np.float32)
    write_ome_zarr_image(tmp_path / "gt.ome.zarr", gt, "zyx", (4, 20, 25))
    write_ome_zarr_image(tmp_path / "p.ome.zarr", pred, "zyx", (4, 20, 25))
    largest = []
    original = reading.Image.read_tc

    def spy(self, t, spatial, channel=None):
        out = original(self, t, spatial, channel)
        largest.append(out.size)
        return out

    monkeypatch.setattr(reading.Image, "read_tc", spy)
    ev = evaluate(tmp_path / "p.ome.zarr", tmp_path / "gt.ome.zarr", max_voxels=3000)
    assert max(largest) < gt.size / 3
    row = ev.rows[0]
    assert row["psnr"] == pytest.approx(psnr(pred, gt)) and row["ssim"] == pytest.approx(ssim(pred, gt))
    assert row["ri_psnr"] == pytest.approx(range_invariant_psnr(pred, gt))


def test_one_channel_of_a_multichannel_prediction_reads_only_that_channel(tmp_path, monkeypatch):
    """``--channel`` compares one output: the other channels' data are never read."""
    from quietscope.io import reading

    gt = _clean((40, 50), seed=8)
    rng = np.random.default_rng(9)
    pred = np.stack([gt + rng.normal(0, 3, gt.shape), gt * 0 + 1e9]).astype(np.float32)  # channel 1: nonsense
    write_ome_zarr_image(tmp_path / "gt.ome.zarr", gt, "yx", (20, 25))
    write_ome_zarr_image(tmp_path / "p.ome.zarr", pred, "cyx", (1, 20, 25))
    channels_read = []
    original = reading.Image.read

    def spy(self, slices):
        out = original(self, slices)
        if "c" in self.axes:
            channels_read.append(out.shape[self.axes.index("c")])
        return out

    monkeypatch.setattr(reading.Image, "read", spy)
    ev = evaluate(tmp_path / "p.ome.zarr", tmp_path / "gt.ome.zarr", channel=0)
    assert channels_read and set(channels_read) == {1}
    assert ev.rows[0]["psnr"] == pytest.approx(psnr(pred[0], gt))
