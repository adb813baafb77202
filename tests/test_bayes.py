"""Bayesian blind-spot denoising: the blind-spot network, the likelihoods, the methods."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from quietscope.errors import ConfigError, InputError
from quietscope.methods.base import available_methods, build_method
from quietscope.methods.bayes import (
    BayesGauss,
    BayesPoisson,
    gamma_poisson_posterior_mean,
    gaussian_marginal_nll,
    gaussian_posterior_mean,
    negative_binomial_nll,
)
from quietscope.nets.blindspot import BlindSpotNet

TINY_NET = {"depth": 2, "filters": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions gain nothing from threads, and on a busy 2-core machine two
    # intra-op threads per process made a training step ~25x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dependence(net: torch.nn.Module, x: torch.Tensor, pixels: list[tuple[int, ...]]) -> np.ndarray:
    """(len(pixels), n_pixels_in) bool: does any output channel at p depend on any input at q."""
    x = x.clone().requires_grad_()
    y = net(x)
    rows = []
    for p in pixels:
        deps = torch.zeros(x.shape[2:], dtype=torch.bool)
        for k in range(y.shape[1]):
            (grad,) = torch.autograd.grad(y[(0, k) + p], x, retain_graph=True)
            deps |= (grad[0] != 0).any(dim=0)
        rows.append(deps.reshape(-1).numpy())
    return np.stack(rows)


def _neighbours(p: tuple[int, ...], shape: tuple[int, ...]) -> list[int]:
    """Flat indices of the in-tile pixels at Chebyshev distance exactly 1 from ``p``."""
    out = []
    for d in itertools.product((-1, 0, 1), repeat=len(shape)):
        q = tuple(a + b for a, b in zip(p, d))
        if any(d) and all(0 <= a < s for a, s in zip(q, shape)):
            out.append(int(np.ravel_multi_index(q, shape)))
    return out


# ---- blind-spot network --------------------------------------------------------------
@pytest.mark.parametrize(
    ("ndim", "shape"),
    [(2, (8, 12)), (2, (12, 8)), (3, (4, 4, 8))],
    ids=["2d-wide", "2d-tall", "3d-nonsquare"],
)
def test_blindspot_output_never_depends_on_own_pixel_but_on_all_neighbours(ndim, shape):
    torch.manual_seed(0)
    # float64: the im2col CPU path then sums exactly the kernel window, so "no path" means 0.
    net = BlindSpotNet(ndim, in_channels=2, out_channels=2, **TINY_NET).double()
    x = torch.randn(1, 2, *shape, dtype=torch.float64)
    if ndim == 2:
        pixels = list(np.ndindex(*shape))  # every pixel
    else:  # corners (where padding meets the shifts), centre, and a few off-centre pixels
        corners = list(itertools.product(*[(0, s - 1) for s in shape]))
        pixels = corners + [tuple(s // 2 for s in shape), (1, 2, 5), (2, 0, 3)]
    dep = _dependence(net, x, pixels)
    for row, p in zip(dep, pixels):
        assert not row[np.ravel_multi_index(p, shape)], f"output {p} depends on its own input"
        # ... but on every direct neighbour, and on much of the (small) tile.
        assert row[_neighbours(p, shape)].all(), f"output {p} misses a neighbour"
        assert row.mean() > 0.5


@pytest.mark.parametrize(("ndim", "shape"), [(2, (16, 24)), (3, (8, 8, 12))])
def test_blindspot_impulse_at_centre_leaves_centre_output_unchanged(ndim, shape):
    torch.manual_seed(1)
    net = BlindSpotNet(ndim, in_channels=1, out_channels=2, **TINY_NET).double()
    x = torch.randn(1, 1, *shape, dtype=torch.float64)
    centre = (0, slice(None)) + tuple(s // 2 for s in shape)
    x_hit = x.clone()
    x_hit[centre] += 10.0
    with torch.no_grad():
        y, y_hit = net(x), net(x_hit)
    assert torch.equal(y[centre], y_hit[centre])
    changed = (y != y_hit).any(dim=1)[0]
    c = tuple(s // 2 for s in shape)
    for axis in range(ndim):
        for step in (-1, 1):
            q = list(c)
            q[axis] += step
            assert changed[tuple(q)], f"neighbour {q} did not react to the impulse"


def test_blindspot_net_rejects_tiles_off_the_pooling_grid():
    net = BlindSpotNet(2, 1, 1, depth=2, filters=4)
    assert net.downsampling_factor == 4
    with pytest.raises(InputError, match="multiple of 4"):
        net(torch.zeros(1, 1, 8, 10))
    with pytest.raises(InputError, match="channels"):
        net(torch.zeros(1, 2, 8, 8))


# ---- likelihoods and posteriors ------------------------------------------------------
def test_negative_binomial_nll_matches_scipy_nbinom():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, size=200).astype(np.float64)
    alpha = rng.uniform(0.1, 30.0, size=200)
    beta = rng.uniform(0.02, 10.0, size=200)
    expected = -stats.nbinom.logpmf(x, alpha, beta / (beta + 1))
    got = negative_binomial_nll(*(torch.from_numpy(a) for a in (x, alpha, beta))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_negative_binomial_nll_tends_to_poisson_for_a_sharp_prior_and_accepts_real_counts():
    # alpha -> inf at fixed mean alpha/beta = m: the Gamma prior is a spike, NB -> Poisson(m).
    x = torch.tensor([0.0, 1.0, 3.0, 7.0, 20.0], dtype=torch.float64)
    m = 4.2
    # NB - Poisson ~ x^2 / alpha; lgamma differences lose ~alpha * 1e-15: 1e7 balances both.
    alpha = torch.full_like(x, 1e7)
    got = negative_binomial_nll(x, alpha, alpha / m).numpy()
    np.testing.assert_allclose(got, -stats.poisson.logpmf(x.numpy(), m), rtol=2e-6)
    # Camera photon estimates are real-valued and can dip below zero (read noise).
    a, b = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    real = negative_binomial_nll(torch.tensor([2.5, 3.0, 3.5], dtype=torch.float64), a, b)
    assert torch.isfinite(real).all()
    assert real[0] != real[1] != real[2]
    assert negative_binomial_nll(torch.tensor(-1.7, dtype=torch.float64), a, b) == (
        negative_binomial_nll(torch.tensor(0.0, dtype=torch.float64), a, b)
    )


@pytest.mark.parametrize(
    ("alpha", "beta", "x"), [(2.0, 0.5, 3.0), (0.7, 3.0, 0.0), (40.0, 8.0, 11.0), (5.0, 1.0, 2.6)]
)
def test_gamma_poisson_posterior_mean_matches_numerical_integration(alpha, beta, x):
    # Unnormalised posterior: Poisson(x | lam) * Gamma(lam | alpha, beta), in log space.
    def log_post(lam):
        return (
            stats.poisson.logpmf(x, lam) if float(x).is_integer() else x * np.log(lam) - lam
        ) + stats.gamma.logpdf(lam, alpha, scale=1 / beta)

    mode = max((alpha + x - 1) / (beta + 1), 1e-3)
    ref = log_post(mode)
    upper = 50 * (alpha + x + 1) / (beta + 1)
    points = [mode]
    z, _ = integrate.quad(lambda t: np.exp(log_post(t) - ref), 0, upper, points=points, limit=200)
    m1, _ = integrate.quad(
        lambda t: t * np.exp(log_post(t) - ref), 0, upper, points=points, limit=200
    )
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = gamma_poisson_posterior_mean(t(x), t(alpha), t(beta)).item()
    assert got == pytest.approx(m1 / z, rel=1e-6)


@pytest.mark.parametrize(
    ("x", "mu", "prior_var", "noise_var"),
    [(1.3, 0.2, 0.5, 0.25), (-2.0, 1.0, 4.0, 0.01), (0.0, 0.0, 0.04, 9.0)],
)
def test_gaussian_marginal_and_posterior_match_numerical_integration(x, mu, prior_var, noise_var):
    def joint(s):  # p(x | s) p(s)
        return stats.norm.pdf(x, s, np.sqrt(noise_var)) * stats.norm.pdf(s, mu, np.sqrt(prior_var))

    lo, hi = mu - 12 * np.sqrt(prior_var), mu + 12 * np.sqrt(prior_var)
    pts = [x, mu]
    marginal, _ = integrate.quad(joint, lo, hi, points=pts, limit=200)
    first, _ = integrate.quad(lambda s: s * joint(s), lo, hi, points=pts, limit=200)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    nll = gaussian_marginal_nll(t(x), t(mu), t(prior_var), t(noise_var)).item()
    assert nll == pytest.approx(-np.log(marginal), rel=1e-7)
    assert nll == pytest.approx(
        -stats.norm.logpdf(x, mu, np.sqrt(prior_var + noise_var)), rel=1e-12
    )
    post = gaussian_posterior_mean(t(x), t(mu), t(prior_var), t(noise_var)).item()
    assert post == pytest.approx(first / marginal, rel=1e-7, abs=1e-10)


# ---- the methods -----------------------------------------------------------------------
def test_build_method_validates_configs():
    assert {"bayes-poisson", "bayes-gauss"} <= set(available_methods())
    m = build_method(
        {"method": "bayes-poisson", "spatial_ndim": 2, "gain": 2.0, "offset": 100, "net": TINY_NET}
    )
    assert isinstance(m, BayesPoisson)
    assert m.downsampling_factor == 4
    assert m.output_names == ["denoised"]
    assert m.gain == 2.0
    assert build_method({"method": "bayes-poisson", "spatial_ndim": 3}).gain == 1.0
    g = build_method({"method": "bayes-gauss", "spatial_ndim": 3, "net": {"depth": 1}})
    assert isinstance(g, BayesGauss) and g.downsampling_factor == 2 and g.learns_noise
    for bad, match in [
        ({"method": "bayes-poisson", "spatial_ndim": 2, "gain": 0}, "gain"),
        ({"method": "bayes-poisson", "spatial_ndim": 2, "net": {"n2v2": True}}, "n2v2"),
        ({"method": "bayes-gauss", "spatial_ndim": 2, "noise_sigma": -1}, "noise_sigma"),
        ({"method": "bayes-gauss", "spatial_ndim": 2, "gain": 2.0}, "gain"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_method(bad)


def test_predict_rejects_tiles_off_the_pooling_grid():
    m = build_method({"method": "bayes-poisson", "spatial_ndim": 2, "net": TINY_NET})
    with pytest.raises(InputError, match="pad the tile"):
        m.predict(torch.ones(1, 1, 16, 18))


def _poisson_pair():
    """The same network twice: on photons, and on ADU = 2.5 * photons + 100."""
    torch.manual_seed(2)
    ph = build_method({"method": "bayes-poisson", "spatial_ndim": 2, "net": TINY_NET})
    adu = build_method(
        {"method": "bayes-poisson", "spatial_ndim": 2, "gain": 2.5, "offset": 100.0,
         "net": TINY_NET}
    )
    adu.load_state_dict(ph.state_dict())  # weights *and* normalisation buffers, so set after
    ph.set_normalization([3.0], [2.0])
    adu.set_normalization([3.0 * 2.5 + 100], [2.0 * 2.5])
    return ph.double(), adu.double()


def test_bayes_poisson_works_in_photons_whatever_the_camera_units():
    ph, adu = _poisson_pair()
    g = torch.Generator().manual_seed(0)
    photons = torch.poisson(torch.full((2, 1, 16, 16), 3.0, dtype=torch.float64), generator=g)
    raw = photons * 2.5 + 100
    np.testing.assert_allclose(
        adu.predict(raw).detach().numpy(), ph.predict(photons).detach().numpy() * 2.5 + 100,
        rtol=1e-10,
    )
    # The loss is the negative-binomial likelihood of the photon counts, identical in both.
    alpha, beta = adu.prior_parameters(raw)
    expected = negative_binomial_nll(photons, alpha, beta).mean()
    loss = adu.training_loss(raw, g)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert loss.item() == pytest.approx(ph.training_loss(photons, g).item(), rel=1e-10)
    # Posterior mean with the prior from prior_parameters, back in ADU.
    post = gamma_poisson_posterior_mean(photons, alpha, beta) * 2.5 + 100
    np.testing.assert_allclose(adu.predict(raw).detach().numpy(), post.detach().numpy())


def test_bayes_poisson_prior_is_blind_but_the_posterior_folds_the_pixel_back_in():
    ph, _ = _poisson_pair()
    x = torch.poisson(torch.full((1, 1, 16, 16), 4.0, dtype=torch.float64)).requires_grad_()
    c = (0, 0, 8, 8)
    alpha, beta = ph.prior_parameters(x)
    (d_alpha,) = torch.autograd.grad(alpha[c], x, retain_graph=True)
    (d_beta,) = torch.autograd.grad(beta[c], x)
    (d_post,) = torch.autograd.grad(ph.predict(x)[c], x)
    assert d_alpha[c] == 0 and d_beta[c] == 0
    assert d_alpha[0, 0, 7, 8] != 0
    # d/dx (alpha + x) / (beta + 1) = 1 / (beta + 1) at the pixel itself.
    assert d_post[c].item() == pytest.approx(1 / (beta[c].item() + 1), rel=1e-12)


def test_bayes_gauss_is_affine_equivariant_and_blends_prior_and_pixel():
    torch.manual_seed(3)
    cfg = {"method": "bayes-gauss", "spatial_ndim": 2, "net": TINY_NET}
    a = build_method({**cfg, "noise_sigma": 0.5})
    b = build_method({**cfg, "noise_sigma": 0.5 * 7.0})
    b.load_state_dict(a.state_dict())
    a.set_normalization([1.0], [2.0])
    b.set_normalization([1.0 * 7.0 - 30.0], [2.0 * 7.0])
    a, b = a.double(), b.double()
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64) * 2 + 1
    np.testing.assert_allclose(
        b.predict(x * 7 - 30).detach().numpy(), a.predict(x).detach().numpy() * 7 - 30,
        rtol=1e-9, atol=1e-9,
    )
    mu, prior_sigma = a.prior_parameters(x)
    expected = gaussian_posterior_mean(x, mu, prior_sigma**2, torch.tensor(0.25))
    np.testing.assert_allclose(a.predict(x).detach().numpy(), expected.detach().numpy())
    assert a.noise_sigma.item() == pytest.approx(0.5)
    assert a.summary()["noise_sigma_learned"] is False


def _blobs(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Smooth synthetic image in [0, 1]: a few Gaussian blobs."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size))
    for _ in range(12):
        cy, cx = rng.uniform(0, size, 2)
        s = rng.uniform(3, 8)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return img / img.max()


def _train(method, image: np.ndarray, steps: int, batch: int = 4, patch: int = 32):
    x = torch.tensor(image, dtype=torch.float32)[None, None]
    method.set_normalization([image.mean()], [image.std()])
    opt = torch.optim.Adam(method.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ys = torch.randint(0, image.shape[0] - patch + 1, (batch,), generator=g).tolist()
        xs = torch.randint(0, image.shape[1] - patch + 1, (batch,), generator=g).tolist()
        b = torch.stack([x[0, :, i : i + patch, j : j + patch] for i, j in zip(ys, xs)])
        loss = method.training_loss(b, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = method.predict(x)[0, 0].numpy()
    return np.array(losses), out


def test_bayes_poisson_training_denoises_photon_limited_image():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clean_ph = 0.3 + 4.7 * _blobs(rng)  # peak ~5 photons
    gain, offset = 2.5, 100.0
    clean = clean_ph * gain + offset
    noisy = rng.poisson(clean_ph) * gain + offset
    m = build_method(
        {"method": "bayes-poisson", "spatial_ndim": 2, "gain": gain, "offset": offset,
         "net": {"depth": 2, "filters": 8}}
    )
    losses, out = _train(m, noisy, steps=150)
    assert losses[-20:].mean() < losses[:20].mean() - 0.1
    mse_noisy = np.mean((noisy - clean) ** 2)
    mse_out = np.mean((out - clean) ** 2)
    # Measured 0.05 of the noisy MSE; 0.25 leaves room for platform differences.
    assert mse_out < 0.25 * mse_noisy, (mse_out, mse_noisy)


def test_bayes_gauss_training_learns_the_noise_level_and_denoises():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    clean = 100 + 50 * _blobs(rng)
    sigma = 10.0
    noisy = clean + rng.normal(0, sigma, clean.shape)
    m = build_method(
        {"method": "bayes-gauss", "spatial_ndim": 2, "net": {"depth": 2, "filters": 8}}
    )
    losses, out = _train(m, noisy, steps=150)
    assert losses[-20:].mean() < losses[:20].mean() - 0.1
    assert m.noise_sigma.item() == pytest.approx(sigma, rel=0.3)
    mse_noisy = np.mean((noisy - clean) ** 2)
    mse_out = np.mean((out - clean) ** 2)
    # Measured 0.05 of the noisy MSE and sigma 10.4; the bounds leave room for platforms.
    assert mse_out < 0.3 * mse_noisy, (mse_out, mse_noisy)


@pytest.mark.parametrize("name", ["bayes-poisson", "bayes-gauss"])
def test_estimate_prior_writes_the_blind_prior_mean_and_mmse_the_posterior(name):
    torch.manual_seed(4)
    extra = {"noise_sigma": 0.7} if name == "bayes-gauss" else {"gain": 2.0, "offset": 10.0}
    m = build_method({"method": name, "spatial_ndim": 2, "net": TINY_NET, **extra}).double()
    m.set_normalization([16.0], [4.0])
    x = (torch.poisson(torch.full((1, 1, 16, 16), 3.0, dtype=torch.float64)) * 2 + 10).requires_grad_()
    first, second = m.prior_parameters(x)
    prior_mean = (first / second) * 2 + 10 if name == "bayes-poisson" else first
    post = m.predict(x)
    m.set_inference(estimate="prior")
    prior = m.predict(x)
    np.testing.assert_allclose(prior.detach().numpy(), prior_mean.detach().numpy(), rtol=1e-12)
    # The prior estimate never sees the pixel; the posterior does, and differs from the prior.
    c = (0, 0, 8, 8)
    (d_prior,) = torch.autograd.grad(prior[c], x)
    assert d_prior[c] == 0 and d_prior[0, 0, 7, 8] != 0
    assert not torch.allclose(post, prior)
    assert m.summary()["estimate"] == "prior"
    m.set_inference(estimate="mmse")
    torch.testing.assert_close(m.predict(x), post)
    with pytest.raises(ConfigError, match="mmse or prior"):
        m.set_inference(estimate="median")
