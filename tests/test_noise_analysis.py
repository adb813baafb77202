"""Noise analysis: Poisson–Gaussian fit, noise correlation, report and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from quietscope.errors import ConfigError, InputError, OutputError
from quietscope.noise_analysis import (
    analyse_noise,
    build_report,
    detect_structured_noise,
    estimate_poisson_gaussian,
    noise_autocorrelation,
    plot_autocorrelation,
    plot_mean_variance,
    raw_noise_autocorrelation,
    residual,
    residual_quality,
)
from quietscope.noise_analysis.poisson_gaussian import dark_level

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def structured_signal(shape: tuple[int, ...], rng: np.random.Generator, peak: float) -> np.ndarray:
    """Smooth blobs plus a ramp over the last half along x, zero elsewhere (dark background)."""
    img = np.zeros(shape)
    pts = rng.integers(0, np.array(shape)[None], size=(12, len(shape)))
    img[tuple(pts.T)] = rng.uniform(0.3, 1.0, 12)
    s = ndimage.gaussian_filter(img, rng.uniform(4, 8))
    s /= s.max()
    s += 0.5 * np.clip(np.linspace(-1, 1, shape[-1]), 0, None)
    return peak * s / s.max()


def poisson_gaussian(s, gain, sigma, offset, rng):
    return gain * rng.poisson(s / gain) + offset + rng.normal(0, sigma, s.shape)


# ---- Poisson–Gaussian ------------------------------------------------------------------


@pytest.mark.parametrize(
    "gain, sigma, offset, peak",
    [
        (2.0, 5.0, 100.0, 600.0),  # photon-noise dominated, moderate counts
        (0.5, 3.0, 400.0, 2000.0),  # small gain, large offset
        (4.0, 2.0, 100.0, 60.0),  # low counts (<= 15 photons)
    ],
)
def test_poisson_gaussian_recovers_gain_and_read_noise(gain, sigma, offset, peak):
    rng = np.random.default_rng(1)
    blocks = [poisson_gaussian(structured_signal((128, 128), rng, peak), gain, sigma, offset, rng) for _ in range(4)]
    est = estimate_poisson_gaussian(blocks)
    assert est.gain == pytest.approx(gain, rel=0.10)
    assert est.read_noise_sigma == pytest.approx(sigma, rel=0.10)
    assert est.offset == pytest.approx(offset, abs=max(1.0, 0.2 * sigma))
    assert est.offset_source == "dark-level"
    assert est.r2 > 0.95
    assert est.intercept == pytest.approx(est.read_noise_sigma**2 - est.gain * est.offset, rel=1e-6, abs=1e-6)
    true_photons = np.mean([(b.mean() - offset) / gain for b in blocks])
    assert est.mean_photons == pytest.approx(true_photons, rel=0.12)
    json.dumps(est.to_dict())
    # With the offset known, read noise no longer depends on finding truly dark pixels.
    assert estimate_poisson_gaussian(blocks, offset=offset).read_noise_sigma == pytest.approx(sigma, rel=0.10)


def test_poisson_gaussian_3d_and_user_offset():
    rng = np.random.default_rng(2)
    blocks = [poisson_gaussian(structured_signal((12, 64, 64), rng, 500.0), 3.0, 4.0, 200.0, rng) for _ in range(3)]
    est = estimate_poisson_gaussian(blocks, offset=200.0)
    assert est.offset == 200.0 and est.offset_source == "user"
    assert est.gain == pytest.approx(3.0, rel=0.10)
    assert est.read_noise_sigma == pytest.approx(4.0, rel=0.10)


def test_poisson_gaussian_robust_to_noise_correlated_across_the_highpass():
    # Noise correlated along x does not bias a fit whose high-pass runs along y.
    rng = np.random.default_rng(3)
    blocks = []
    for _ in range(4):
        s = structured_signal((128, 128), rng, 400.0)
        corr = ndimage.uniform_filter1d(rng.normal(0, 3 * np.sqrt(5), s.shape), 5, axis=-1)
        blocks.append(poisson_gaussian(s, 2.0, 4.0, 100.0, rng) + corr)
    est = estimate_poisson_gaussian(blocks, axis=0)
    assert est.gain == pytest.approx(2.0, rel=0.10)
    assert est.read_noise_sigma == pytest.approx(5.0, rel=0.10)  # sqrt(4² + 3²)


def test_dark_level_is_not_biased_by_selecting_dark_pixels():
    rng = np.random.default_rng(4)
    blocks = [100.0 + rng.normal(0, 10, (96, 96)) for _ in range(3)]
    # A plain low percentile would be ~23 ADU low; the ring ranking is unbiased.
    assert dark_level(blocks, percentile=1.0) == pytest.approx(100.0, abs=2.0)


def test_poisson_gaussian_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(InputError, match="single intensity level"):
        estimate_poisson_gaussian([np.full((64, 64), 7.0)])
    bad = rng.normal(size=(64, 64))
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        estimate_poisson_gaussian(bad)
    with pytest.raises(InputError, match="at least 16"):
        estimate_poisson_gaussian([rng.normal(size=(8, 64))])
    with pytest.raises(InputError, match="dimensions"):
        estimate_poisson_gaussian([rng.normal(size=(2, 3, 16, 16))])
    with pytest.raises(ConfigError, match="n_bins"):
        estimate_poisson_gaussian([rng.normal(size=(64, 64))], n_bins=2)
    with pytest.raises(ConfigError, match="axis"):
        estimate_poisson_gaussian([rng.normal(size=(64, 64))], axis=2)


def test_clipped_pixels_are_counted():
    rng = np.random.default_rng(6)
    s = structured_signal((128, 128), rng, 200.0)
    x = np.clip(np.round(poisson_gaussian(s, 2.0, 8.0, 10.0, rng)), 0, 255).astype(np.uint8)
    est = estimate_poisson_gaussian([x])
    expected = np.count_nonzero((x == 0) | (x == 255)) / x.size
    assert expected > 0.001
    assert est.clipped_fraction == pytest.approx(expected)


# ---- correlation -----------------------------------------------------------------------


def _box_correlated(shape, rng, axis, length, sd):
    """White noise averaged over ``length`` pixels along ``axis`` (rescaled to std ``sd``)."""
    return ndimage.uniform_filter1d(rng.normal(0, sd * np.sqrt(length), shape), length, axis=axis)


def test_noise_autocorrelation_of_known_noise():
    rng = np.random.default_rng(7)
    n = _box_correlated((200, 200), rng, axis=0, length=3, sd=1.0)
    acf = noise_autocorrelation([n[:100], n[100:]], max_lag=4)
    assert acf.shape == (9, 9)
    assert acf[4, 4] == 1.0
    # A length-3 box gives 2/3 at lag 1, 1/3 at lag 2, 0 beyond, along y only.
    np.testing.assert_allclose(acf[5:, 4], [2 / 3, 1 / 3, 0, 0], atol=0.03)
    np.testing.assert_allclose(acf[4, 5:], 0, atol=0.03)
    np.testing.assert_allclose(acf, acf[::-1, ::-1], atol=1e-9)  # even function


def test_structured_noise_along_x_is_detected_with_its_extent():
    rng = np.random.default_rng(8)
    blocks = [
        structured_signal((96, 96), rng, 1000.0) + 100 + _box_correlated((96, 96), rng, -1, 5, 10.0)
        for _ in range(4)
    ]
    st = detect_structured_noise(raw_noise_autocorrelation(blocks), "yx")
    assert st.correlated_axes == ["x"]
    assert not st.pixel_independent
    assert 4 <= st.axes["x"].extent <= 6
    assert st.axes["x"].mask_length == 2 * st.axes["x"].max_lag + 1
    assert st.axes["x"].strength == pytest.approx(0.8, abs=0.05)
    assert not st.axes["y"].correlated and abs(st.axes["y"].strength) < 0.05


@pytest.mark.parametrize("peak", [50.0, 3000.0])
def test_pixel_independent_noise_on_structured_signal_reports_no_structure(peak):
    rng = np.random.default_rng(9)
    blocks = [poisson_gaussian(structured_signal((96, 96), rng, peak), 2.0, 3.0, 100.0, rng) for _ in range(4)]
    acf = raw_noise_autocorrelation(blocks)
    st = detect_structured_noise(acf)
    assert st.pixel_independent and st.correlated_axes == []
    assert all(a.extent == 1 for a in st.axes.values())
    # In contrast, subtracting a Gaussian-smoothed image leaks this signal into the residual.
    smooth = [b - ndimage.gaussian_filter(b, 3) for b in blocks]
    if peak > 1000:
        assert not detect_structured_noise(noise_autocorrelation(smooth)).pixel_independent


def test_structured_noise_along_z_in_3d():
    rng = np.random.default_rng(10)
    shape = (20, 48, 48)
    blocks = [
        structured_signal(shape, rng, 300.0) + 100 + _box_correlated(shape, rng, 0, 3, 8.0) for _ in range(2)
    ]
    acf = raw_noise_autocorrelation(blocks, max_lag=4)
    assert acf.shape == (9, 9, 9)
    assert np.isnan(acf[5, 5, 4]) and acf[4, 4, 4] == 1.0  # off-axis lags are not measured
    st = detect_structured_noise(acf, "zyx")
    assert st.correlated_axes == ["z"]
    assert st.axes["z"].extent == 3
    white = [poisson_gaussian(structured_signal(shape, rng, 300.0), 2.0, 3.0, 100.0, rng) for _ in range(2)]
    assert detect_structured_noise(raw_noise_autocorrelation(white, max_lag=4), "zyx").pixel_independent


def test_residual_variants_and_errors():
    rng = np.random.default_rng(11)
    b = rng.normal(size=(32, 40))
    np.testing.assert_allclose(residual(b, np.ones_like(b)), b - 1)
    r = residual(b, axis=-1)
    assert r.shape == (32, 36)
    assert r.var() == pytest.approx(b.var(), rel=0.15)  # unit gain for white noise
    ramp = np.add.outer(np.arange(32.0) ** 3, np.arange(40.0) ** 2)
    np.testing.assert_allclose(residual(ramp, axis=0), 0, atol=1e-6)  # cubic signal cancels
    with pytest.raises(InputError, match="shape"):
        residual(b, np.ones((32, 39)))
    with pytest.raises(InputError, match="too short"):
        noise_autocorrelation([b[:4]], max_lag=6)
    with pytest.raises(ConfigError, match="axes"):
        detect_structured_noise(np.ones((5, 5)), axes="zyx")
    with pytest.raises(InputError, match="odd"):
        detect_structured_noise(np.ones((4, 4)))


def test_residual_quality_flags_leaked_signal():
    rng = np.random.default_rng(12)
    s = structured_signal((96, 96), rng, 200.0)
    d = s + rng.normal(0, 5, s.shape)
    good = residual_quality(d, s)
    assert max(abs(v) for v in good.lag1.values()) < 0.05
    assert abs(good.signal_correlation) < 0.05
    assert good.residual_std == pytest.approx(5, rel=0.05)
    blurred = ndimage.gaussian_filter(d, 4)  # over-smoothed: structure left in the residual
    bad = residual_quality([d], [blurred], axes="yx")
    assert min(bad.lag1.values()) > 0.2
    # Rescaling the prediction puts signal into the residual.
    scaled = residual_quality(d, 0.7 * s)
    assert scaled.signal_correlation > 0.5


# ---- report ----------------------------------------------------------------------------


def test_report_recommends_n2v_for_independent_noise():
    rng = np.random.default_rng(13)
    blocks = [
        np.round(poisson_gaussian(structured_signal((96, 96), rng, 600.0), 2.0, 4.0, 100.0, rng)).astype(np.uint16)
        for _ in range(3)
    ]
    rep = analyse_noise(blocks)
    assert rep.method == "n2v" and "--struct-mask" not in rep.options
    holds = {a.name: a.holds for a in rep.assumptions}
    assert holds == {"pixel-independent noise": True, "zero-mean noise": True, "Poisson-dominated noise": True}
    d = json.loads(rep.to_json())
    assert d["method"] == "n2v" and d["noise_model"]["gain"] == pytest.approx(2.0, rel=0.1)
    text = rep.to_text()
    assert "Recommended method: n2v" in text and "pn2v" in text and "[yes] pixel-independent" in text


def test_report_recommends_struct_mask_for_correlated_noise():
    rng = np.random.default_rng(14)
    blocks = [
        poisson_gaussian(structured_signal((96, 96), rng, 1000.0), 2.0, 2.0, 100.0, rng)
        + _box_correlated((96, 96), rng, -1, 5, 20.0)
        for _ in range(3)
    ]
    rep = analyse_noise(blocks)
    x = rep.structure.axes["x"]
    assert rep.method == "n2v"
    assert rep.options[-2:] == ["--struct-mask", f"x:{x.mask_length}"]
    assert 7 <= x.mask_length <= 11
    assert "[NO ] pixel-independent" in rep.to_text()
    # The gain fit ran its high-pass along y, across the correlation, so it is still right.
    assert rep.estimate.highpass_axis == 0
    assert rep.estimate.gain == pytest.approx(2.0, rel=0.1)


def test_report_recommends_bayes_poisson_at_low_counts():
    rng = np.random.default_rng(15)
    blocks = [poisson_gaussian(structured_signal((96, 96), rng, 40.0), 4.0, 1.5, 100.0, rng) for _ in range(3)]
    rep = analyse_noise(blocks)
    e = rep.estimate
    assert e.mean_photons < 20
    assert rep.method == "bayes-poisson"
    i = rep.options.index("--gain")
    assert float(rep.options[i + 1]) == pytest.approx(e.gain, rel=1e-3)
    assert float(rep.options[rep.options.index("--offset") + 1]) == pytest.approx(e.offset, rel=1e-3)
    # The same estimate with a much lower threshold no longer counts as low-light.
    assert build_report(e, rep.structure, low_photon_count=0.01).method == "n2v"


def test_report_flags_clipping_and_untrusted_fit():
    rng = np.random.default_rng(16)
    s = structured_signal((128, 128), rng, 200.0)
    x = np.clip(np.round(poisson_gaussian(s, 2.0, 8.0, 10.0, rng)), 0, 255).astype(np.uint8)
    rep = analyse_noise([x])
    assert {a.name: a.holds for a in rep.assumptions}["zero-mean noise"] is False
    est = estimate_poisson_gaussian([s + rng.normal(0, 3, s.shape)])  # no Poisson part
    structure = detect_structured_noise(raw_noise_autocorrelation([s]))
    assert est.gain == pytest.approx(0.0, abs=0.05)
    bad = build_report(est, structure)
    assert "--gain" not in " ".join(bad.options)


# ---- plots -----------------------------------------------------------------------------


def test_plots_write_png(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(17)
    blocks = [poisson_gaussian(structured_signal((64, 64), rng, 300.0), 2.0, 3.0, 100.0, rng) for _ in range(2)]
    est = estimate_poisson_gaussian(blocks)
    p1 = plot_mean_variance(est, tmp_path / "mv.png")
    acf2 = raw_noise_autocorrelation(blocks, max_lag=3)
    p2 = plot_autocorrelation(acf2, "yx", tmp_path / "acf2.png")
    vol = structured_signal((12, 32, 32), rng, 100.0)
    acf3 = noise_autocorrelation(residual(vol + rng.normal(0, 1, vol.shape), vol), max_lag=3)
    p3 = plot_autocorrelation(acf3, None, tmp_path / "acf3.png")
    shapes = [matplotlib.image.imread(p).shape for p in (p1, p2, p3)]
    assert all(s[2] in (3, 4) for s in shapes)
    assert shapes[2][1] > 2 * shapes[1][1]  # three panels for 3D
    with pytest.raises(OutputError, match="does not exist"):
        plot_mean_variance(est, tmp_path / "missing" / "mv.png")


# ---- real data -------------------------------------------------------------------------


def test_w2s_gain_matches_noisy_minus_clean():
    import tifffile

    noisy_path = DATA / "w2s" / "noisy" / "fov081_ch0.tif"
    if not noisy_path.exists():
        pytest.skip(f"real data not found at {noisy_path.parent}")
    noisy = tifffile.imread(noisy_path).astype(float)
    clean = tifffile.imread(DATA / "w2s" / "clean" / "fov081_ch0.tif").astype(float)
    # Reference line from the true noise: noisy minus an affine fit of the 400-frame mean.
    design = np.stack([clean.ravel(), np.ones(clean.size)], axis=1)
    pred = design @ np.linalg.lstsq(design, noisy.ravel(), rcond=None)[0]
    res = noisy.ravel() - pred
    ok = (noisy.ravel() > 0) & (noisy.ravel() < 255)
    idx = np.digitize(pred[ok], np.percentile(pred[ok], np.linspace(1, 99, 15)))
    mv = np.array([(pred[ok][idx == k].mean(), res[ok][idx == k].var()) for k in range(1, 15)])
    ref_gain = np.polyfit(mv[:, 0], mv[:, 1], 1)[0]
    blocks = [noisy[i : i + 256, j : j + 256] for i in (0, 256) for j in (0, 256)]
    est = estimate_poisson_gaussian(blocks)
    assert est.gain == pytest.approx(ref_gain, rel=0.15)
    assert detect_structured_noise(raw_noise_autocorrelation(blocks)).pixel_independent
