"""Noise-model sources (calibration, pairs, bootstrap) and the ``quietscope noise-model`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from quietscope.errors import ConfigError, InputError
from quietscope.io.sample_data import synthetic_clean
from quietscope.noise_models import load_noise_model
from quietscope.workflows.noise_model import (
    calibration_pairs,
    data_range,
    fit_from_calibration,
    fit_from_pairs,
    sample_pairs,
)
from quietscope_cli.main import cli

GAIN, READ_SIGMA = 2.0, 3.0  # x = GAIN * Poisson(s / GAIN) + N(0, READ_SIGMA^2)


def poisson_gaussian(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (GAIN * rng.poisson(clean / GAIN) + rng.normal(0, READ_SIGMA, clean.shape)).astype(np.float32)


def true_std(s: np.ndarray) -> np.ndarray:
    return np.sqrt(GAIN * s + READ_SIGMA**2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nm")
    rng = np.random.default_rng(0)
    clean = synthetic_clean((64, 80), seed=0)
    stack = np.stack([poisson_gaussian(clean, rng) for _ in range(30)])
    tifffile.imwrite(d / "stack.tif", stack, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(d / "clean.tif", clean)
    tifffile.imwrite(d / "noisy.tif", stack[0])
    tifffile.imwrite(d / "clean_small.tif", clean[:48])
    return d, clean, stack


def run(args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def _std_error(model, levels) -> float:
    _, std = model.mean_std(levels)
    return float(np.max(np.abs(std / true_std(levels) - 1)))


# ---- library: pair sources -------------------------------------------------------------
def test_calibration_signal_is_the_mean_of_the_whole_stack(tmp_path):
    # frame k = base + 3k: the whole-stack mean is base + 43.5, so x - s = 3k - 43.5 exactly
    # when (and only when) s is the mean of all 30 frames and x is paired with its own pixel.
    base = np.random.default_rng(0).uniform(100, 200, (40, 50)).round()
    stack = np.stack([base + 3 * k for k in range(30)]).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "TYX"})
    s, x = calibration_pairs(tmp_path / "s.tif", max_pairs=5000, seed=1)
    assert s.size == x.size == 5000
    k = (x - s + 43.5) / 3
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert k.min() >= 0 and k.max() <= 29


def test_calibration_gmm_recovers_the_simulated_noise(files):
    d, clean, _ = files
    model = fit_from_calibration(d / "stack.tif", "gmm", n_iterations=300)
    levels = np.percentile(clean, [50, 90, 99])  # ~10, 30 and 70: background to bright
    assert _std_error(model, levels) < 0.1  # noise std within 10 % of the truth (measured 2.7 %)


def test_pairs_histogram_recovers_the_simulated_noise(files):
    d, clean, stack = files
    model = fit_from_pairs(d / "stack.tif", d / "clean.tif", "histogram", bins=64)  # clean broadcast over t
    levels = np.percentile(clean, [50, 90, 99])  # ~10, 30 and 70: background to bright
    assert _std_error(model, levels) < 0.15  # measured 3.9 %


def test_sampling_is_bounded_and_paired(tmp_path):
    clean = np.arange(600 * 700, dtype=np.float32).reshape(600, 700)  # every pixel unique
    noisy = clean + 1000  # pairs must stay aligned: x - s is exactly 1000 everywhere
    for name, arr in (("clean.zarr", clean), ("noisy.zarr", noisy)):
        z = zarr.create_array(store=str(tmp_path / name), shape=arr.shape, chunks=(100, 100), dtype=arr.dtype)
        z[...] = arr
    s, x = sample_pairs(tmp_path / "clean.zarr", tmp_path / "noisy.zarr", max_pairs=20_000)
    assert s.size == 20_000
    np.testing.assert_allclose(x - s, 1000.0)
    assert len(np.unique(s)) == 20_000  # drawn without replacement
    lo, hi = data_range(tmp_path / "noisy.zarr", max_pairs=10_000)  # a sample: inside the range
    assert 1000 <= lo < hi <= 1000 + clean.size - 1
    assert data_range(tmp_path / "noisy.zarr", max_pairs=clean.size) == (1000, 1000 + clean.size - 1)


def test_source_errors_are_clear(files, tmp_path):
    d, clean, stack = files
    one = zarr.create_array(store=str(tmp_path / "one.zarr"), shape=(1, 64, 80), dtype="float32",
                            dimension_names=["t", "y", "x"])
    one[...] = stack[:1]
    with pytest.raises(InputError, match=r"holds 1 image along t; a calibration stack needs ≥2"):
        calibration_pairs(tmp_path / "one.zarr")
    with pytest.raises(InputError, match=r"single yx image; a calibration stack needs ≥2"):
        calibration_pairs(d / "noisy.tif")
    with pytest.raises(InputError, match=r"\(48, 80\).*same shape"):
        fit_from_pairs(d / "noisy.tif", d / "clean_small.tif")
    with pytest.raises(ConfigError, match="max_pairs"):
        sample_pairs(d / "clean.tif", d / "noisy.tif", max_pairs=0)


# ---- CLI -------------------------------------------------------------------------------
def test_cli_fit_writes_a_model_and_refuses_to_overwrite(files, tmp_path):
    d, clean, _ = files
    out = tmp_path / "nm.json"
    res = run(["noise-model", "fit", "--calibration", d / "stack.tif", "-o", out, "--kind", "histogram",
               "--bins", "64", "--plot", tmp_path / "nm.png"])
    assert "histogram" in res.output and out.exists() and (tmp_path / "nm.png").stat().st_size > 10_000
    assert load_noise_model(out).bins == 64
    again = run(["noise-model", "fit", "--calibration", d / "stack.tif", "-o", out], ok=False)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    both = run(["noise-model", "fit", "-o", tmp_path / "x.json"], ok=False)
    assert both.exit_code == 2 and "exactly one of --calibration STACK or --pairs" in both.output
    bad = run(["noise-model", "fit", "--pairs", d / "noisy.tif", d / "clean_small.tif", "-o", tmp_path / "y.json"], ok=False)
    assert bad.exit_code == 2 and "error:" in bad.output and "same shape" in bad.output


def test_cli_bootstrap_then_pn2v_train_and_predict(files, tmp_path):
    d, clean, stack = files
    data = d / "noisy.tif"
    n2v = tmp_path / "n2v.qs"
    small = ["--depth", "1", "--filters", "8", "--patch", "32", "--batch", "4", "--checkpoint-every", "1000"]
    run(["train", data, "-o", n2v, "--steps", "30", *small])
    nm = tmp_path / "nm.json"
    res = run(["noise-model", "bootstrap", n2v, data, "-o", nm, "--iterations", "100", "--no-progress",
               "--plot", tmp_path / "boot.png"])
    assert "gmm" in res.output
    model = load_noise_model(nm)
    lo, hi = model.signal_range
    assert lo > clean.min() - 20 and hi < clean.max() + 20  # pseudo-signal on the data's scale
    assert json.loads(nm.read_text())["kind"] == "gmm"

    pn2v = tmp_path / "pn2v.qs"
    run(["train", data, "-o", pn2v, "--method", "pn2v", "--noise-model", nm, "--samples", "4", "--steps", "4", *small])
    out = tmp_path / "den.ome.zarr"
    res = run(["predict", pn2v, data, "-o", out, "--estimate", "mmse", "--chunks", "32,32", "--no-progress"])
    den = np.asarray(zarr.open_array(store=str(out / "0"), mode="r")[...])
    assert den.shape == clean.shape and np.isfinite(den).all()

    # The denoiser's error no longer widens the model: its std is closer to the truth.
    nm_v = tmp_path / "nm_v.json"
    run(["noise-model", "bootstrap", n2v, data, "-o", nm_v, "--iterations", "100", "--no-progress",
         "--variance-from-data"])
    levels = np.array([30.0, 60.0, 100.0])
    assert _std_error(load_noise_model(nm_v), levels) < _std_error(model, levels)
    run(["train", data, "-o", tmp_path / "pn2v_v.qs", "--method", "pn2v", "--noise-model", nm_v, "--samples", "4",
         "--steps", "2", *small])  # accepted on the data's whole range
    bad = run(["noise-model", "bootstrap", n2v, data, "-o", tmp_path / "h.json", "--kind", "histogram",
               "--variance-from-data", "--no-progress"], ok=False)
    assert bad.exit_code == 2 and "applies to GMM noise models" in bad.output

    png = tmp_path / "plot.png"
    res = run(["noise-model", "plot", nm, "-o", png, "--data", data, "--signal", d / "clean.tif"])
    assert "is covered by the model's range" in res.output and png.stat().st_size > 10_000


def test_cli_plot_refuses_data_outside_the_model(files, tmp_path):
    d, clean, _ = files
    nm = tmp_path / "nm.json"
    run(["noise-model", "fit", "--pairs", d / "noisy.tif", d / "clean.tif", "-o", nm, "--kind", "histogram"])
    bright = tmp_path / "bright.tif"
    tifffile.imwrite(bright, clean * 20)
    res = run(["noise-model", "plot", nm, "-o", tmp_path / "p.png", "--data", bright], ok=False)
    assert res.exit_code == 2 and "outside the histogram noise model's range" in res.output


def test_bootstrapped_gmm_accepts_the_brightest_pixels_it_was_not_fitted_on(tmp_path, monkeypatch):
    """The 0.5 % pairs with the highest pseudo-signal are dropped before fitting; the GMM must
    still accept those pixels' values, or PN2V training refuses the data whenever a batch
    holds one (it did, at random, on the BPAE field)."""
    from quietscope.workflows import noise_model as sources

    rng = np.random.default_rng(4)
    clean = np.tile(np.linspace(20.0, 80.0, 96, dtype=np.float32), (96, 1))
    clean[10:16, 10:17] = 2000.0  # 42 of 9216 pixels (0.46 %): all in the clipped top 0.5 %
    noisy = poisson_gaussian(clean, rng)
    data = tmp_path / "bright.tif"
    tifffile.imwrite(data, noisy)
    # A perfect denoiser stands in for N2V, so the bright pixels are surely the clipped ones.
    monkeypatch.setattr(sources, "_predicted_pairs", lambda *a, **k: (clean.ravel(), noisy.ravel()))
    model = sources.bootstrap("unused.qs", data, n_iterations=50)
    assert model.signal_range[1] < 100  # the bright pairs were not fitted on...
    model.check_range(float(noisy.min()), float(noisy.max()))  # ...yet their values are accepted
