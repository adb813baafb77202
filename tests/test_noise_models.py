"""Pixel noise models: fitted to Poisson-Gaussian data with known gain and read noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from quietscope.errors import InputError, ModelError
from quietscope.noise_models import (
    GMMNoiseModel,
    HistogramNoiseModel,
    NoiseModel,
    fit_gmm,
    fit_histogram,
    load_noise_model,
    noise_model_from_dict,
    pairs_from_calibration,
    pairs_from_paired,
    pairs_from_prediction,
    plot_noise_model,
)
from quietscope.noise_models.histogram import pool_sparse_rows

GAIN, READ_SIGMA = 2.0, 10.0
S_LOW, S_HIGH = 100.0, 2000.0
LEVELS = np.array([150.0, 500.0, 1000.0, 1500.0, 1900.0])


def true_std(s: np.ndarray) -> np.ndarray:
    return np.sqrt(GAIN * s + READ_SIGMA**2)


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """x = a * Poisson(s / a) + N(0, sigma^2) over a range of signals."""
    rng = np.random.default_rng(0)
    s = rng.uniform(S_LOW, S_HIGH, 50_000)
    x = GAIN * rng.poisson(s / GAIN) + rng.normal(0.0, READ_SIGMA, s.shape)
    return s, x


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny fitting batches are overhead-bound, and threads fight over the shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gmm(pairs) -> GMMNoiseModel:
    return fit_gmm(*pairs, n_gaussian=3, n_coeff=2, n_iterations=400, batch_size=2000, seed=0)


@pytest.fixture(scope="module")
def hist(pairs) -> HistogramNoiseModel:
    return fit_histogram(*pairs, bins=256)


@pytest.fixture(params=["histogram", "gmm"])
def model(request, hist, gmm) -> NoiseModel:
    return {"histogram": hist, "gmm": gmm}[request.param]


# ---- accuracy ---------------------------------------------------------------------------
def test_gmm_recovers_poisson_gaussian_mean_and_std(gmm):
    mean, std = gmm.mean_std(LEVELS)
    np.testing.assert_allclose(mean, LEVELS, rtol=0.02)
    np.testing.assert_allclose(std, true_std(LEVELS), rtol=0.10)


def test_gmm_fit_is_scale_free(pairs):
    # The same noise in units where the signal spans [0.05, 1]: same relative accuracy.
    unit = S_HIGH
    model = fit_gmm(pairs[0][:20_000] / unit, pairs[1][:20_000] / unit, n_iterations=300,
                    batch_size=2000)
    _, std = model.mean_std(LEVELS / unit)
    np.testing.assert_allclose(std * unit, true_std(LEVELS), rtol=0.10)


def test_histogram_recovers_poisson_gaussian_mean_and_std(hist):
    mean, std = hist.mean_std(LEVELS[1:-1])
    np.testing.assert_allclose(mean, LEVELS[1:-1], rtol=0.02)
    np.testing.assert_allclose(std, true_std(LEVELS[1:-1]), rtol=0.10)


@pytest.mark.parametrize("level", LEVELS)
def test_likelihood_integrates_to_one_over_x(model, level):
    lo, hi = model.observation_range
    xs = torch.linspace(lo, hi, 40_001, dtype=torch.float64)
    with torch.no_grad():
        p = model.likelihood(xs, torch.tensor(level, dtype=torch.float64))
    assert torch.trapezoid(p, xs).item() == pytest.approx(1.0, abs=0.02)


def test_closed_form_moments_match_numerical_integration(model):
    mean, std = model.mean_std(LEVELS)
    num_mean, num_std = NoiseModel.mean_std(model, LEVELS)
    # The numerical grid cuts histogram bins unevenly: allow a small fraction of a std.
    np.testing.assert_allclose(mean, num_mean, rtol=0, atol=0.02 * std.min())
    np.testing.assert_allclose(std, num_std, rtol=2e-2)


def test_gmm_single_gaussian_matches_normal_density():
    # One component, variance 50 + 400 u with u the signal normalised over [0, 100].
    span = 100.0
    weight = [[0.0, 0.0], [np.log(50 / span**2), np.log(400 / span**2)], [0.0, 0.0]]
    model = GMMNoiseModel(weight, 0.0, span, min_sigma=1e-3)
    s = torch.tensor([10.0, 60.0], dtype=torch.float64)
    x = torch.tensor([3.0, 75.0], dtype=torch.float64)
    expected = norm.logpdf(x.numpy(), loc=s.numpy(), scale=np.sqrt(50 + 400 * s.numpy() / span))
    np.testing.assert_allclose(model.log_likelihood(x, s).numpy(), expected, rtol=1e-4)


def test_histogram_rows_are_normalised_counts():
    # Four pixels with signal in row 0; bin width 1, so density = fraction of pixels.
    s = np.array([0.5, 0.5, 0.5, 0.5, 3.5])
    x = np.array([0.5, 0.5, 1.5, 3.5, 3.5])
    model = fit_histogram(s, x, bins=4, range=(0.0, 4.0), min_row_pairs=0)
    p = model.table_likelihood(torch.tensor([0.5, 1.5, 2.5, 3.5]), torch.tensor(0.5))
    np.testing.assert_allclose(p.numpy(), [0.5, 0.25, 0.0, 0.25], atol=1e-6)
    # The likelihood PN2V uses adds a 1e-4 share of a smooth component (gradients everywhere).
    full = model.likelihood(torch.tensor([0.5, 1.5, 2.5, 3.5]), torch.tensor(0.5))
    np.testing.assert_allclose(full.numpy(), p.numpy(), atol=2e-4)
    assert (model.density > 0).all()  # the floor: no zero probability, no log(0)


def test_histogram_fills_empty_signal_rows_from_neighbours():
    s = np.array([0.5, 2.5])
    x = np.array([0.5, 2.5])
    model = fit_histogram(s, x, bins=3, range=(0.0, 3.0), min_row_pairs=0)
    # Row 1 saw no pixel: it is the average of rows 0 and 2.
    np.testing.assert_allclose(model.density[1].numpy(), [0.5, 0.0, 0.5], atol=1e-6)


def test_sparse_rows_borrow_shifted_neighbours_and_dense_rows_are_untouched():
    counts = np.zeros((6, 6))
    counts[1, 1:4] = [100, 800, 100]  # dense: a peak on the diagonal
    counts[2, 2:5] = [1, 3, 1]  # sparse: borrows row 1 shifted by +1 column, then row 3 (empty)
    pooled = pool_sparse_rows(counts, 1000)
    np.testing.assert_array_equal(pooled[1], counts[1])
    np.testing.assert_array_equal(pooled[2], [0, 0, 101, 803, 101, 0])
    assert pooled[3].sum() == 0  # empty rows stay empty (interpolated later)


def test_pooling_sparse_rows_gives_a_better_model_where_data_are_scarce():
    # Poisson-Gaussian pairs, 200x fewer of them at bright signals (like a mostly dark image).
    rng = np.random.default_rng(3)
    s = np.concatenate([rng.uniform(100, 500, 200_000), rng.uniform(500, 2000, 1_000)])
    x = GAIN * rng.poisson(s / GAIN) + rng.normal(0, READ_SIGMA, s.size)
    s_test = rng.uniform(1000, 1900, 5000)
    x_test = torch.from_numpy(GAIN * rng.poisson(s_test / GAIN) + rng.normal(0, READ_SIGMA, s_test.size))
    nll = {}
    for k in (0, 1000):
        model = fit_histogram(s, x, bins=256, min_row_pairs=k)
        nll[k] = float(-model.log_likelihood(x_test, torch.from_numpy(s_test)).mean())
    assert nll[1000] < nll[0] - 2.0, nll  # measured: 11.5 -> 5.6 nats


def test_histogram_gives_a_gradient_towards_x_where_the_table_is_at_its_floor():
    rng = np.random.default_rng(1)
    s = rng.uniform(0.0, 100.0, 20000)
    model = fit_histogram(s, s + rng.normal(0, 1.0, s.size), bins=64, range=(-5.0, 105.0))
    x = torch.tensor([10.0, 90.0])
    far = torch.tensor([60.0, 40.0], requires_grad=True)  # 30-50 noise stds away: empty bins
    assert (model.table_likelihood(x, far) < 1e-6).all()
    model.log_likelihood(x, far).sum().backward()
    assert far.grad[0] < 0 and far.grad[1] > 0  # both pulled towards their observation


def test_histogram_pulls_signals_outside_its_support_back():
    # Rows 0 and 1 of 8 saw no pixel: the support is rows 2..7 (centres 2.5..7.5).
    rng = np.random.default_rng(0)
    s = rng.uniform(2.0, 8.0, 5000)
    x = s + rng.normal(0, 0.5, s.size)
    model = fit_histogram(s, np.clip(x, 0, 7.99), bins=8, range=(0.0, 8.0))
    assert model.support == pytest.approx((2.5, 7.5))
    inside = torch.tensor([3.0, 5.0, 7.5])
    xs = torch.tensor([3.2, 5.1, 7.4])
    np.testing.assert_allclose(model.log_likelihood(xs, inside).numpy(),
                               torch.log(model.table_likelihood(xs, inside)).numpy(), atol=1e-3)
    # Below the support the table's rows are copies (flat in s); the fall-off still has a gradient
    # that points up, towards signals the calibration saw, and above it one that points down.
    s_out = torch.tensor([0.6, 1.2, 7.9], requires_grad=True)
    model.log_likelihood(torch.tensor([2.5, 2.5, 7.5]), s_out).sum().backward()
    assert s_out.grad[0] > 0 and s_out.grad[1] > 0 and s_out.grad[2] < 0
    # A saved model keeps its support; a version-1 description (no support) means the whole range.
    again = noise_model_from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.support == pytest.approx(model.support)
    old = {k: v for k, v in model.to_dict().items() if k != "support"} | {"version": 1}
    assert noise_model_from_dict(old).support == pytest.approx((0.5, 7.5))


# ---- differentiability ------------------------------------------------------------------
def test_log_likelihood_has_gradient_wrt_signal(model):
    x = torch.tensor([480.0, 1010.0, 1600.0])
    s = torch.tensor([500.0, 1000.0, 1500.0], requires_grad=True)
    model.log_likelihood(x, s).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad != 0).all()


def test_log_likelihood_ignores_autocast(model):
    # Mixed-precision training must not lower raw-unit variances to 16-bit floats.
    x, s = torch.tensor([480.0, 1900.0]), torch.tensor([500.0, 1950.0])
    full = model.log_likelihood(x, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.log_likelihood(x, s)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, full)


def test_log_likelihood_broadcasts(model):
    x = torch.linspace(400, 600, 5).reshape(5, 1)
    s = torch.tensor([[450.0, 500.0, 550.0]])
    ll = model.log_likelihood(x, s)
    assert ll.shape == (5, 3)
    assert torch.isfinite(ll).all()
    # The most likely signal for an observation near 600 is the largest of the three.
    assert ll[-1].argmax() == 2


# ---- serialisation ----------------------------------------------------------------------
def test_dict_round_trip_gives_identical_likelihoods(model):
    d = json.loads(json.dumps(model.to_dict()))
    assert d["kind"] == model.kind
    again = noise_model_from_dict(d)
    assert type(again) is type(model)
    x = torch.tensor([90.0, 700.0, 1333.3, 2100.0])
    s = torch.tensor([120.0, 690.0, 1300.0, 1990.0])
    assert torch.equal(again.log_likelihood(x, s), model.log_likelihood(x, s))


def test_save_and_load_json_file(model, tmp_path):
    path = model.save(tmp_path / "nm.json")
    assert json.loads(path.read_text())["kind"] == model.kind
    again = load_noise_model(path)
    x, s = torch.tensor([500.0]), torch.tensor([510.0])
    assert torch.equal(again.likelihood(x, s), model.likelihood(x, s))


def test_load_rejects_broken_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ModelError, match="JSON"):
        load_noise_model(bad)
    with pytest.raises(ModelError, match="does not exist"):
        load_noise_model(tmp_path / "missing.json")
    with pytest.raises(ModelError, match="unknown noise model kind"):
        noise_model_from_dict({"kind": "pickle"})
    with pytest.raises(ModelError, match="weight"):
        noise_model_from_dict({"kind": "gmm", "min_signal": 0, "max_signal": 1, "min_sigma": 1})


# ---- range check ------------------------------------------------------------------------
def test_check_range_accepts_fitted_range_and_rejects_beyond(model):
    lo, hi = model.observation_range
    model.check_range(lo, hi)
    model.check_range(lo - 0.05 * (hi - lo), hi)  # a few darker pixels are tolerated
    with pytest.raises(InputError, match="refit the noise model"):
        model.check_range(lo, hi + 0.5 * (hi - lo))
    with pytest.raises(InputError, match="outside"):
        model.check_range(lo - 0.5 * (hi - lo), hi)


def test_gmm_observation_range_covers_noise_and_fitted_observations(gmm, pairs):
    lo, hi = gmm.observation_range
    assert lo <= min(S_LOW - 5 * true_std(S_LOW) * 0.9, pairs[1].min())
    assert hi >= max(S_HIGH + 5 * true_std(S_HIGH) * 0.9, pairs[1].max())
    bare = GMMNoiseModel(gmm.weight.numpy(), S_LOW, S_HIGH, gmm.min_sigma)  # no fitted range
    for got, end in zip(bare.observation_range, (S_LOW, S_HIGH)):
        sign = -1 if end == S_LOW else 1
        assert got == pytest.approx(end + sign * 5 * true_std(end), abs=0.5 * true_std(end))


def test_real_data_bootstrap_fit_accepts_its_own_data():
    # Convallaria (PN2V): real Poisson-Gaussian camera noise; a blur stands in for N2V.
    import tifffile
    from scipy.ndimage import gaussian_filter

    from quietscope.io.sample_data import find_data_dir

    root = find_data_dir()
    path = None if root is None else root / "convallaria" / "convallaria_frame0000.tif"
    if path is None or not path.exists():
        pytest.skip(f"real data not found: {path or 'shared/data'} is absent (or set QUIETSCOPE_DATA)")
    data = tifffile.imread(path)[:128, :128].astype(np.float32)
    s, x = pairs_from_prediction(gaussian_filter(data, 2), data)
    model = fit_gmm(s, x, n_iterations=200, batch_size=2000)
    model.check_range(float(data.min()), float(data.max()))
    _, std = model.mean_std(np.percentile(s, [10, 90]))
    assert std[1] > 1.5 * std[0]  # shot noise: brighter pixels are noisier
    with pytest.raises(InputError):
        model.check_range(0.0, 10 * float(data.max()))


# ---- pairs ------------------------------------------------------------------------------
def test_calibration_stack_of_one_image_is_rejected():
    with pytest.raises(InputError, match="calibration stack has 1 image; need ≥2"):
        pairs_from_calibration(np.zeros((1, 8, 8)))


def test_calibration_pairs_use_pixelwise_mean():
    stack = np.stack([np.full((2, 3), v) for v in (1.0, 2.0, 6.0)])
    s, x = pairs_from_calibration(stack)
    assert s.shape == x.shape == (18,)
    np.testing.assert_array_equal(s, 3.0)
    np.testing.assert_array_equal(np.sort(np.unique(x)), [1.0, 2.0, 6.0])


def test_paired_pairs_check_shapes():
    noisy = np.arange(12.0).reshape(3, 4)
    s, x = pairs_from_paired(noisy, noisy + 1)
    np.testing.assert_array_equal(s - x, 1.0)
    s, x = pairs_from_paired(np.stack([noisy, noisy]), noisy)  # one clean for many noisy
    assert s.shape == (24,)
    with pytest.raises(InputError, match="same shape"):
        pairs_from_paired(noisy, noisy[:, :3])


def test_prediction_pairs_drop_extreme_pseudo_signal():
    prediction = np.arange(1000.0).reshape(10, 100)
    data = prediction + 0.25
    s, x = pairs_from_prediction(prediction, data, clip_percentile=0.5)
    assert s.min() >= 5 and s.max() <= 994  # the 0.5 % at each end are gone
    assert s.size == 990
    np.testing.assert_array_equal(x - s, 0.25)
    with pytest.raises(InputError, match="shape"):
        pairs_from_prediction(prediction, data.T)


# ---- plot -------------------------------------------------------------------------------
def test_plot_writes_png(model, pairs, tmp_path):
    import matplotlib.image

    path = plot_noise_model(model, pairs[0][:5000], pairs[1][:5000], path=tmp_path / "nm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something was drawn


def test_match_variance_line_removes_the_denoisers_error_from_bootstrapped_pairs():
    """A pseudo-signal with its own error (sd 40 % of the noise's) widens a bootstrapped GMM
    by ~16 % in variance; rescaling the residuals to the data's variance line brings the
    fitted model back within 3 % of the true noise (the GMM fit itself is within ~1 %)."""
    from quietscope.noise_models import fit_gmm, match_variance_line

    rng = np.random.default_rng(0)
    a, b = 2.0, 25.0
    s0 = rng.uniform(20, 2000, 300_000)
    sd = np.sqrt(a * s0 + b)
    x = s0 + sd * rng.standard_normal(s0.size)
    s_hat = s0 + 0.4 * sd * rng.standard_normal(s0.size)  # the "denoiser" errs, independently of x
    levels = np.array([100.0, 500.0, 1000.0, 1800.0])
    truth = a * levels + b

    def var_ratio(obs):
        nm = fit_gmm(s_hat.astype(np.float32), obs.astype(np.float32), n_iterations=400, seed=0,
                     observed_range=(float(x.min()), float(x.max())))
        return nm.mean_std(levels)[1] ** 2 / truth, nm

    biased, _ = var_ratio(x)
    fixed, nm = var_ratio(match_variance_line(s_hat, x, a, b)[0])
    assert np.all(biased > 1.10)
    assert np.all(np.abs(fixed - 1) < 0.03)
    assert nm.observation_range[0] <= x.min() and nm.observation_range[1] >= x.max()


def test_match_variance_line_refuses_a_line_that_fits_nothing():
    from quietscope.noise_models import match_variance_line

    s = np.linspace(0, 10, 1000)
    with pytest.raises(InputError, match="does not fit these data"):
        match_variance_line(s, s + 1.0 * np.sin(s), gain=-5.0, intercept=-1.0)
