"""Probabilistic Noise2Void: loss, estimates, chunked prediction, range checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch
from scipy import stats

from quietscope.chunked import PredictOptions
from quietscope.errors import ConfigError, InputError
from quietscope.inference import method_halo, predict_tile, predict_whole
from quietscope.io.sample_data import synthetic_clean
from quietscope.methods import build_method
from quietscope.methods.masking import n2v_mask
from quietscope.methods.pn2v import PN2V, marginal_nll, mmse_estimate, prior_mean
from quietscope.noise_models import GMMNoiseModel, fit_histogram
from quietscope.workflows.predict import predict
from quietscope.workflows.train import train_model

TINY = {"depth": 1, "filters": 8}
SIGMA = 4.0  # std of the Gaussian test noise model, raw units
LO, HI = 0.0, 400.0


def gaussian_model(sigma: float = SIGMA, lo: float = LO, hi: float = HI) -> GMMNoiseModel:
    """One-component GMM = N(x; s, sigma^2): a noise model with a closed-form density."""
    span = hi - lo
    weight = [[0.0], [math.log(sigma**2 / span**2)], [0.0]]
    return GMMNoiseModel(weight, lo, hi, min_sigma=1e-3)


def pn2v_config(ndim: int = 2, n_samples: int = 6, noise_model=None) -> dict:
    return {
        "method": "pn2v",
        "spatial_ndim": ndim,
        "net": TINY,
        "n_samples": n_samples,
        "noise_model": (noise_model or gaussian_model()).to_dict(),
    }


def noisy_image(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean = synthetic_clean(shape, seed=seed)
    return (clean + rng.normal(0, SIGMA, clean.shape)).astype(np.float32)


# ---- the probabilistic core ------------------------------------------------------------
def test_gaussian_test_model_is_the_stated_density():
    nm = gaussian_model()
    x, s = torch.tensor([10.0, 50.0, 52.0]), torch.tensor([12.0, 50.0, 40.0])
    expected = stats.norm.logpdf(x.numpy(), s.numpy(), SIGMA)
    np.testing.assert_allclose(nm.log_likelihood(x, s).numpy(), expected, rtol=1e-5)


def test_marginal_nll_matches_scipy():
    nm = gaussian_model()
    x = torch.tensor([20.0, 100.0, 37.5])
    samples = torch.tensor([[18.0, 25.0, 60.0], [100.0, 101.0, 99.0], [10.0, 200.0, 37.0]])
    got = marginal_nll(nm, x, samples).numpy()
    pdf = stats.norm.pdf(x.numpy()[:, None], samples.numpy(), SIGMA)
    np.testing.assert_allclose(got, -np.log(pdf.mean(axis=1)), rtol=1e-5)


def test_marginal_nll_stays_finite_where_every_density_underflows():
    nm = gaussian_model(sigma=0.5)
    got = marginal_nll(nm, torch.tensor([0.0]), torch.tensor([[300.0, 350.0]]))
    # log N(0; 300, 0.25) ~ -180000: exp underflows in float32, log-sum-exp does not.
    assert torch.isfinite(got).all() and got.item() > 1e5


def test_mmse_and_prior_on_a_toy_case():
    nm = gaussian_model(sigma=2.0)
    samples = torch.tensor([[10.0, 14.0], [10.0, 14.0], [0.0, 100.0]])
    x = torch.tensor([12.0, 11.0, 99.0])
    w = stats.norm.pdf(x.numpy()[:, None], samples.numpy(), 2.0)
    expected = (w * samples.numpy()).sum(1) / w.sum(1)
    got = mmse_estimate(nm, x, samples).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[0] == pytest.approx(12.0)  # equidistant samples: the midpoint
    assert 10.0 < got[1] < 12.0  # pulled toward the sample that explains x
    assert got[2] == pytest.approx(100.0, abs=1e-3)  # x rules out the sample at 0
    np.testing.assert_allclose(prior_mean(samples).numpy(), [12.0, 12.0, 50.0])


def test_training_loss_equals_an_independent_computation():
    torch.manual_seed(0)
    method = build_method(pn2v_config(n_samples=5))
    method.set_normalization([80.0], [30.0])
    method.eval()  # batch norm in eval mode: the same forward pass twice
    batch = torch.from_numpy(noisy_image((16, 16))[None, None])
    loss = method.training_loss(batch, torch.Generator().manual_seed(3))

    cfg = method.config
    x_norm = (batch - 80.0) / 30.0
    masked, mask = n2v_mask(x_norm, cfg.masked_pixel_percentage, cfg.roi_size, cfg.strategy,
                            torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = method.net(masked)[0].numpy() * 30.0 + 80.0  # (K, H, W) raw-unit samples
    m = mask[0, 0].numpy()
    x = batch[0, 0].numpy()[m]
    s = out[:, m].T  # (N, K)
    expected = -np.mean(np.log(stats.norm.pdf(x[:, None], s, SIGMA).mean(axis=1)))
    assert m.sum() >= 1
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_predict_estimates_shape_and_options(ndim):
    torch.manual_seed(0)
    method = build_method(pn2v_config(ndim=ndim, n_samples=4))
    method.set_normalization([80.0], [30.0])
    method.eval()
    shape = (8, 16, 16) if ndim == 3 else (16, 24)
    x = torch.from_numpy(noisy_image(shape)[None, None])
    with torch.no_grad():
        samples = method._samples(method.normalize(x)).movedim(2, -1)
        mmse = method.predict(x)
        method.set_inference(estimate="prior")
        prior = method.predict(x)
    assert mmse.shape == prior.shape == x.shape
    torch.testing.assert_close(prior, samples.mean(-1))
    flat = mmse_estimate(method.noise_model, x.reshape(-1), samples.reshape(-1, 4))
    torch.testing.assert_close(mmse, flat.reshape(x.shape))
    with pytest.raises(ConfigError, match="mmse or prior"):
        method.set_inference(estimate="median")


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="noise_model"):
        build_method({"method": "pn2v", "spatial_ndim": 2})
    with pytest.raises(ConfigError, match="unknown noise model kind"):
        build_method({"method": "pn2v", "spatial_ndim": 2, "noise_model": {"kind": "lut"}})
    with pytest.raises(ConfigError, match="n_samples"):
        build_method({**pn2v_config(), "n_samples": 1})


# ---- with training and the chunked pipeline ---------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("pn2v")
    data = noisy_image((75, 93), seed=1)  # odd sizes: partial edge blocks
    path = d / "noisy.tif"
    tifffile.imwrite(path, data)
    model = d / "m.qs"
    res = train_model(
        path, model, pn2v_config(n_samples=6),
        {"patch": (32,), "batch": 4, "steps": 12, "val_every": 6, "checkpoint_every": 100, "pool_size": 16},
        progress=False,
    )
    return d, path, data, model, res


@pytest.mark.parametrize("estimate", ["mmse", "prior"])
def test_chunked_prediction_equals_whole_image(trained, estimate):
    d, path, data, model, res = trained
    out = d / f"pred_{estimate}.ome.zarr"
    r = predict(model, path, out, PredictOptions(chunks=(32, 32), block=(32, 32), progress=False, overwrite=True),
                inference={"estimate": estimate})
    assert r.n_blocks == 9
    import zarr

    chunked = np.asarray(zarr.open_array(store=str(out / "0"), mode="r")[...])
    method = res.method.eval()
    method.set_inference(estimate=estimate)
    whole = predict_whole(lambda t: predict_tile(method, t), data[None], method_halo(method),
                          method.downsampling_factor)[0]
    assert chunked.shape == data.shape
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=0)
    if estimate == "mmse":  # the centre pixel re-enters: the MMSE moves from the prior toward x
        method.set_inference(estimate="prior")
        prior = predict_whole(lambda t: predict_tile(method, t), data[None], method_halo(method),
                              method.downsampling_factor)[0]
        assert np.abs(chunked - data).mean() < 0.95 * np.abs(prior - data).mean()


def test_noise_model_not_covering_the_data_fails_clearly(tmp_path):
    data = noisy_image((48, 48)) + 5000.0  # another intensity scale than the model's 0..400
    path = tmp_path / "bright.tif"
    tifffile.imwrite(path, data)
    with pytest.raises(InputError, match=r"outside the gmm noise model's range.*refit"):
        train_model(path, tmp_path / "m.qs", pn2v_config(), {"patch": (16,), "batch": 2, "steps": 2}, progress=False)


def test_range_check_sees_tails_beyond_the_mean(tmp_path):
    rng = np.random.default_rng(0)
    clean = np.full((64, 64), 100.0)
    nm = fit_histogram(clean, clean + rng.normal(0, 3, clean.shape), bins=32)  # covers ~85..115
    method = build_method(pn2v_config(noise_model=nm))
    method.set_normalization([100.0], [3.0])  # the mean is inside
    batch = torch.full((1, 1, 8, 8), 100.0)
    batch[0, 0, 0, 0] = 300.0  # a tail far outside
    with pytest.raises(InputError, match="outside the histogram noise model's range"):
        method.training_loss(batch, torch.Generator().manual_seed(0))


def test_memory_hint_scales_with_samples():
    a = build_method(pn2v_config(n_samples=8))
    b = build_method(pn2v_config(n_samples=64))
    assert isinstance(a, PN2V) and b.memory_per_voxel == 8 * a.memory_per_voxel


def test_training_data_beyond_a_histogram_support_are_flagged():
    # Histogram fitted on signals 100-500 (noise std 10); data reaching 2000 are beyond it.
    rng = np.random.default_rng(0)
    s = rng.uniform(100, 500, 200_000)
    hist = fit_histogram(s, s + rng.normal(0, 10, s.size), bins=128, range=(0.0, 2100.0))
    method = build_method(pn2v_config(noise_model=hist))
    assert method.data_coverage_warning(110.0, 490.0) is None  # inside (noise allowance included)
    msg = method.data_coverage_warning(110.0, 2000.0)
    assert msg is not None and "calibrate over the data's whole intensity range" in msg
    assert method.data_coverage_warning(20.0, 450.0) is not None  # far below the first signal
    # A GMM extrapolates: no warning.
    assert build_method(pn2v_config()).data_coverage_warning(-1e6, 1e6) is None
