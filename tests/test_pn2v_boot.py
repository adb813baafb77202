"""PN2V warm-started from N2V, the SURE comparison, and the pn2v-boot keep-the-better pipeline."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import tifffile
import torch

from helpers import assert_same_weights
from quietscope.errors import ConfigError, InputError
from quietscope.io.sample_data import synthetic_clean
from quietscope.methods import build_method
from quietscope.methods.modelfile import load_model, read_manifest, save_model
from quietscope.methods.pn2v import PN2V, blind_spot_risk, prior_mean, spread_offsets, written_risk
from quietscope.noise_models import GMMNoiseModel
from quietscope.workflows import pn2v_boot
from quietscope.workflows.pn2v_boot import boot_dir, choose, train_pn2v_boot
from quietscope.workflows.train import train_model

TINY = {"depth": 1, "filters": 8}
SIGMA = 4.0
TRAIN = {"patch": (32,), "batch": 4, "val_every": 5, "checkpoint_every": 100, "pool_size": 16}


def gaussian_model(sigma: float = SIGMA, lo: float = 0.0, hi: float = 400.0) -> GMMNoiseModel:
    span = hi - lo
    return GMMNoiseModel([[0.0], [float(np.log(sigma**2 / span**2))], [0.0]], lo, hi, min_sigma=1e-3)


@pytest.fixture(autouse=True)
def _short_gmm_fit(monkeypatch):
    # The pipeline's bootstrapped GMM fit runs 2000 iterations by default (40 s of a 2-core
    # machine); what these tests check (stages, choice, records) does not depend on a converged fit.
    monkeypatch.setattr(pn2v_boot, "bootstrap", functools.partial(pn2v_boot.bootstrap, n_iterations=100))


@pytest.fixture(scope="module")
def n2v_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("boot")
    rng = np.random.default_rng(0)
    clean = synthetic_clean((96, 96), seed=0)
    path = d / "noisy.tif"
    tifffile.imwrite(path, (clean + rng.normal(0, SIGMA, clean.shape)).astype(np.float32))
    model = d / "n2v.qs"
    train_model(path, model, {"method": "n2v", "net": TINY, "masked_pixel_percentage": 2.0},
                {**TRAIN, "steps": 6}, progress=False)
    return d, path, model


def test_spread_offsets_have_zero_mean_and_unit_std():
    q = spread_offsets(64).double()
    assert abs(float(q.mean())) < 1e-7 and abs(float(q.std(correction=0)) - 1) < 1e-6
    assert torch.all(q[1:] > q[:-1])


def test_warm_start_prior_mean_equals_n2v_prediction(n2v_model):
    _, _, model = n2v_model
    n2v, _ = load_model(model)
    pn2v = build_method({"method": "pn2v", "spatial_ndim": 2, "net": TINY, "n_samples": 16,
                         "noise_model": gaussian_model().to_dict()})
    pn2v.warm_start(n2v, [3.0])
    x = torch.from_numpy(synthetic_clean((48, 48), seed=3)[None, None].astype(np.float32) * 1.0)
    pn2v.eval()
    pn2v.set_inference(estimate="prior")
    with torch.no_grad():
        a, b = pn2v.predict(x), n2v.predict(x)
        spread = pn2v._samples(pn2v.normalize(x)).std(dim=2, correction=0)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(spread.numpy(), 3.0, rtol=1e-4)
    # train() re-estimates the normalisation; a warm-started PN2V keeps N2V's.
    pn2v.set_normalization([0.0], [1.0])
    torch.testing.assert_close(pn2v.norm_mean, n2v.norm_mean)


def test_train_init_starts_at_n2v_and_records_it(n2v_model):
    d, path, model = n2v_model
    # lr tiny: after one step the prior mean is still N2V's prediction to float tolerance.
    out = d / "pn2v_init.qs"
    train_model(path, out, {"method": "pn2v", "noise_model": gaussian_model().to_dict(), "n_samples": 8,
                            "net": {"depth": 3, "filters": 4}, "masked_pixel_percentage": 2.0},
                {**TRAIN, "steps": 1, "lr": 1e-12}, progress=False, init=model)
    pn2v, manifest = load_model(out)
    n2v, _ = load_model(model)
    assert manifest["init"]["model"] == str(model) and manifest["init"]["prior_std"][0] > 0
    assert pn2v.config.net == n2v.config.net  # the init model's network, not the one given
    x = torch.from_numpy(tifffile.imread(path)[None, None, :64, :64])
    pn2v.set_inference(estimate="prior")
    with torch.no_grad():
        np.testing.assert_allclose(pn2v.predict(x).numpy(), n2v.predict(x).numpy(), rtol=1e-4, atol=1e-3)


def test_init_refuses_other_methods_and_models(n2v_model, tmp_path):
    d, path, model = n2v_model
    with pytest.raises(ConfigError, match="--init warm-starts --method pn2v"):
        train_model(path, tmp_path / "x.qs", {"method": "n2v"}, {**TRAIN, "steps": 1}, progress=False, init=model)
    n2v, _ = load_model(model)
    other = build_method({"method": "pn2v", "spatial_ndim": 2, "net": {"depth": 2, "filters": 8},
                          "noise_model": gaussian_model().to_dict()})
    with pytest.raises(ConfigError, match="network"):
        other.warm_start(n2v, [1.0])


def test_choose_keeps_pn2v_only_when_it_is_clearly_better():
    rng = np.random.default_rng(0)
    n2v = 10 + rng.normal(0, 1, 5000)
    assert choose(n2v, n2v - 0.5).kept == "pn2v"
    assert choose(n2v, n2v + 0.5).kept == "n2v"
    assert choose(n2v, n2v).kept == "n2v"  # a tie keeps N2V
    # Better on average but within the noise of the paired difference: N2V.
    noisy_better = n2v + np.where(np.arange(n2v.size) % 2 == 0, -1.01, 0.99)  # mean -0.01, s.e. 0.014
    c = choose(n2v, noisy_better, margin_se=1.0)
    assert c.kept == "n2v" and c.difference < 0 and c.difference + c.difference_se > 0


def test_choose_three_candidates_scripted():
    rng = np.random.default_rng(1)
    n2v = 10 + rng.normal(0, 1, 4000)
    worse, better, best = n2v + 0.5, n2v - 0.5, n2v - 1.0
    # Only the prior mean beats N2V: keep it.
    c = choose(n2v, worse, prior_risk=better)
    assert c.kept == "pn2v-prior" and c.label == "PN2V (prior mean)"
    assert c.prior_difference == pytest.approx(-0.5) and c.difference == pytest.approx(0.5)
    # Both beat N2V; the posterior mean is clearly lower than the prior mean: keep it.
    assert choose(n2v, best, prior_risk=better).kept == "pn2v"
    # Both beat N2V equally (a tie): the prior mean, which needs no noise model at prediction.
    assert choose(n2v, better, prior_risk=better.copy()).kept == "pn2v-prior"
    # Only the posterior mean beats N2V.
    assert choose(n2v, better, prior_risk=worse).kept == "pn2v"
    # Neither, and a tie of all three: N2V.
    assert choose(n2v, worse, prior_risk=worse).kept == "n2v"
    assert choose(n2v, n2v.copy(), prior_risk=n2v.copy()).kept == "n2v"


def test_choose_margin_decides_between_the_pn2v_estimates():
    n = 4000
    n2v = np.full(n, 10.0)
    alternate = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)  # paired s.e. of 1/sqrt(n) ~ 0.0158
    prior = n2v - 0.02 + alternate  # lower than N2V by ~1.3 s.e.
    c1, c2 = choose(n2v, n2v + 1, 1.0, prior_risk=prior), choose(n2v, n2v + 1, 2.0, prior_risk=prior)
    assert (c1.kept, c2.kept) == ("pn2v-prior", "n2v")
    assert 1.0 < -c1.prior_difference / c1.prior_difference_se < 2.0
    # Both far below N2V; the posterior mean below the prior mean by ~1.3 s.e.: replaces it at
    # margin 1, not at margin 2 (a lower mean within the noise keeps the prior mean).
    mmse = prior - 0.02 + np.where(np.arange(n) % 4 < 2, 1.0, -1.0)
    c1, c2 = choose(n2v + 1, mmse, 1.0, prior_risk=prior), choose(n2v + 1, mmse, 2.0, prior_risk=prior)
    assert (c1.kept, c2.kept) == ("pn2v", "pn2v-prior")
    assert c2.pn2v_risk < c2.prior_risk and 1.0 < -c2.posterior_vs_prior / c2.posterior_vs_prior_se < 2.0
    with pytest.raises(InputError, match="same >= 2 pixels"):
        choose(n2v, n2v, prior_risk=n2v[:-1])


def test_model_saved_with_prior_estimate_predicts_the_prior_by_default(tmp_path):
    from quietscope.inference import load_for_inference
    from quietscope.methods.modelfile import save_model
    from quietscope.workflows.info import describe

    torch.manual_seed(0)
    pn2v = build_method({"method": "pn2v", "spatial_ndim": 2, "net": TINY, "n_samples": 8,
                         "noise_model": gaussian_model().to_dict()})
    pn2v.set_normalization([200.0], [50.0])
    assert pn2v.estimate == "mmse" and pn2v.config.estimate == "mmse"  # older files: no field, mmse
    pn2v.set_default_estimate("prior")
    save_model(tmp_path / "p.qs", pn2v, {})
    x = (200 + SIGMA * torch.randn(1, 1, 32, 32))
    loaded = load_for_inference(tmp_path / "p.qs")
    assert loaded.method.estimate == "prior" and describe(tmp_path / "p.qs")["method"]["estimate"] == "prior"
    with torch.no_grad():
        got = loaded.method.predict(x)
        want = prior_mean(loaded.method._samples(loaded.method.normalize(x)).movedim(2, -1))
        torch.testing.assert_close(got, want)
        mmse = load_for_inference(tmp_path / "p.qs", inference={"estimate": "mmse"}).method.predict(x)
    assert float((mmse - want).abs().max()) > 1e-3  # --estimate mmse still overrides it
    with pytest.raises(ConfigError, match="--estimate"):
        pn2v.set_default_estimate("median")


def test_blind_spot_risk_estimates_the_true_error():
    # Gaussian noise, a PN2V whose prior samples all equal the truth: its MMSE estimate is the
    # truth (error 0) and SURE must say so; N2V predicting truth + 2 has error 4.
    torch.manual_seed(0)
    nm = gaussian_model()
    pn2v = build_method({"method": "pn2v", "spatial_ndim": 2, "net": TINY, "n_samples": 8,
                         "noise_model": nm.to_dict(), "masked_pixel_percentage": 10.0})
    truth = torch.full((32, 1, 32, 32), 200.0)
    x = truth + SIGMA * torch.randn_like(truth)
    with torch.no_grad():
        pn2v.net.head.weight.zero_()
        pn2v.net.head.bias.zero_()
    pn2v.set_normalization([200.0], [50.0])
    risk = blind_spot_risk(pn2v, x, lambda s, ch: torch.full_like(s, SIGMA**2), torch.Generator().manual_seed(0), draws=4)
    assert abs(float(risk.mean())) < 0.1 * SIGMA**2

    n2v = build_method({"method": "n2v", "spatial_ndim": 2, "net": TINY, "masked_pixel_percentage": 10.0})
    with torch.no_grad():
        for p in n2v.net.parameters():
            p.zero_()
    n2v.set_normalization([202.0], [50.0])
    risk_n = blind_spot_risk(n2v, x, lambda s, ch: torch.full_like(s, SIGMA**2), torch.Generator().manual_seed(0), draws=4)
    assert abs(float(risk_n.mean()) - 4.0) < 0.1 * SIGMA**2

    # PN2V's prior mean at 202 is N2V's prediction: same masks, so the very same per-pixel risks.
    pn2v.set_normalization([202.0], [50.0])
    risk_p = blind_spot_risk(pn2v, x, lambda s, ch: torch.full_like(s, SIGMA**2), torch.Generator().manual_seed(0),
                             draws=4, estimate="prior")
    torch.testing.assert_close(risk_p, risk_n)
    pn2v.set_default_estimate("prior")  # the model's own estimate is the default
    torch.testing.assert_close(blind_spot_risk(pn2v, x, lambda s, ch: torch.full_like(s, SIGMA**2),
                                               torch.Generator().manual_seed(0), draws=4), risk_n)


class _LinearFilter(torch.nn.Module):
    """A stand-in model whose written output uses its own pixel: ``w x + (1 - w) box3(x)``."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = w

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        box = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return self.w * x + (1 - self.w) * box


def test_written_risk_estimates_the_error_of_the_written_output():
    # Gaussian noise on a smooth image; two filters that use the pixel itself (d f_i / d x_i =
    # w + (1 - w) / 9): SURE with the Monte-Carlo divergence matches each one's true error, and
    # their difference, which a score that ignored the divergence would get the wrong way round.
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 3, 64), indexing="ij")
    truth = (200.0 + 30.0 * torch.sin(yy) * torch.cos(xx)).expand(16, 1, 64, 64)
    x = truth + SIGMA * torch.randn_like(truth)
    centre = (slice(4, 60), slice(4, 60))
    var = lambda s, ch: torch.full_like(s, SIGMA**2)  # noqa: E731
    risks, truths = [], []
    for w in (0.1, 0.6):
        m = _LinearFilter(w)
        r = written_risk(m, x, var, torch.Generator().manual_seed(3), centre, probes=4)
        risks.append(r)
        truths.append(float(((m.predict(x) - truth) ** 2)[(..., *centre)].mean()))
        assert float(r.mean()) == pytest.approx(truths[-1], rel=0.1)
        naive = float(((m.predict(x) - x) ** 2)[(..., *centre)].mean()) - SIGMA**2
        assert naive < 0.5 * truths[-1]  # without the divergence the pixel's own share looks free
    diff, true_diff = float((risks[1] - risks[0]).mean()), truths[1] - truths[0]
    assert true_diff > 3 and diff == pytest.approx(true_diff, rel=0.15)


def test_shared_variance_reference_leaves_blind_candidates_only_their_loss_difference():
    # Two blind candidates that differ only by a constant brightness offset, on a rising
    # variance line: with each candidate's own v the brighter one gains g * offset per pixel
    # for nothing; with one v per pixel (taken at a shared reference) their SURE difference is
    # exactly their paired blind-spot-loss difference, for N2V and for PN2V's prior mean alike.
    torch.manual_seed(0)
    gain, intercept, offset = 0.5, 4.0, 2.0
    line = lambda s, ch: gain * s + intercept  # noqa: E731
    truth = 200.0 + 20.0 * torch.linspace(-1, 1, 32).expand(8, 1, 32, 32)
    x = truth + torch.sqrt(line(truth, 0)) * torch.randn_like(truth)
    n2v = build_method({"method": "n2v", "spatial_ndim": 2, "net": TINY, "masked_pixel_percentage": 10.0})
    n2v.set_normalization([200.0], [50.0])
    brighter = build_method(n2v.config.model_dump())
    brighter.net.load_state_dict(n2v.net.state_dict())
    with torch.no_grad():
        brighter.net.head.bias += offset / 50.0  # normalised units: + offset in raw units
    brighter.set_normalization([200.0], [50.0])
    pn2v = build_method({"method": "pn2v", "spatial_ndim": 2, "net": TINY, "n_samples": 8, "masked_pixel_percentage": 10.0,
                         "noise_model": gaussian_model(lo=0.0, hi=600.0).to_dict()})
    pn2v.warm_start(brighter, 3.0)  # its prior mean is the brighter N2V's prediction

    def score(method, variance, estimate=None, reference=None):
        return blind_spot_risk(method, x, variance, torch.Generator().manual_seed(7), draws=3, estimate=estimate,
                               reference=reference)

    # SURE without -v is the blind-spot loss (f - x)^2.
    zero = lambda s, ch: torch.zeros_like(s)  # noqa: E731
    loss_a = score(n2v, zero)
    for cand, est in ((brighter, None), (pn2v, "prior")):
        loss_b = score(cand, zero, est)
        assert abs(float((loss_b - loss_a).mean())) > 0.1  # the candidates do differ
        shared = score(cand, line, est, reference=n2v) - score(n2v, line, reference=n2v)
        torch.testing.assert_close(shared, loss_b - loss_a, rtol=0, atol=1e-3)
        own = score(cand, line, est) - score(n2v, line)  # each its own v: the old bias, -g * offset per pixel
        torch.testing.assert_close(own - (loss_b - loss_a), torch.full_like(own, -gain * offset), rtol=0, atol=1e-3)

    # One variance per pixel for every candidate, the posterior mean's -v + 2 v df/dx included:
    # the signals the variance is evaluated at are the reference's, whatever is scored.
    seen: dict[str, list[torch.Tensor]] = {}
    for name, cand, est in (("n2v", n2v, None), ("brighter", brighter, None), ("prior", pn2v, "prior"), ("mmse", pn2v, "mmse")):
        seen[name] = []
        score(cand, lambda s, ch, got=seen[name]: got.append(s.detach().clone()) or line(s, ch), est, reference=n2v)
    for name in ("brighter", "prior", "mmse"):
        torch.testing.assert_close(torch.cat(seen[name]), torch.cat(seen["n2v"]), rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="channel"):
        score(n2v, line, reference=build_method({"method": "n2v", "spatial_ndim": 2, "in_channels": 2, "net": TINY}))


@pytest.mark.parametrize("winner", ["pn2v", "n2v"])  # "pn2v-prior": test_kept_prior_mean_is_the_files_default
def test_pipeline_keeps_the_scripted_winner_and_says_so(n2v_model, tmp_path, monkeypatch, caplog, winner):
    _, path, _ = n2v_model
    n = 1000
    step = 0.01 * (np.arange(n) % 3)
    scripted = {"pn2v": (np.full(n, 5.0), 4.0 + step, 4.5 + step),
                "n2v": (np.full(n, 5.0), np.full(n, 6.0), 5.0 + step)}[winner]
    monkeypatch.setattr(pn2v_boot, "compare", lambda *a, **k: choose(*scripted[:2], 1.0, "scripted", prior_risk=scripted[2]))
    out = tmp_path / "boot.qs"
    with caplog.at_level(logging.INFO, logger="quietscope.workflows.pn2v_boot"):
        choice = train_pn2v_boot(path, out, {"net": TINY, "masked_pixel_percentage": 2.0, "n_samples": 4},
                                 {**TRAIN, "steps": 10}, progress=False)
    assert choice.kept == winner
    method, manifest = load_model(out)
    assert isinstance(method, PN2V) == (winner != "n2v")
    if winner == "pn2v":  # the kept estimate is the model file's default
        assert method.estimate == manifest["method"]["estimate"] == "mmse"
    assert manifest["pn2v_boot"]["kept"] == winner
    rec = manifest["pn2v_boot"]
    assert (rec["n2v_steps"], rec["branch_step"], rec["pn2v_steps"], rec["steps_trained"]) == (10, 7, 3, 13)
    stages = boot_dir(out)
    assert {p.name for p in stages.iterdir()} >= {"n2v.qs", "n2v_branch.qs", "pn2v.qs", "noise_model.json", "choice.json"}
    if winner == "n2v":  # the kept N2V is the one 'train --method n2v' gives for all the steps, not the branch
        straight = train_model(path, tmp_path / "straight.qs", {"method": "n2v", "net": TINY, "masked_pixel_percentage": 2.0},
                               {**TRAIN, "steps": 10}, progress=False).method
        assert_same_weights(straight, method)
        assert read_manifest(stages / "n2v_branch.qs")["paused_at"] == 7
    assert json.loads((stages / "choice.json").read_text())["kept"] == winner
    assert f"keeping {winner.upper()}" in caplog.text
    if winner == "pn2v":
        assert "predict --estimate mmse" in caplog.text and "PN2V prior mean 4.5" in caplog.text
    assert read_manifest(stages / "pn2v.qs")["init"]["model"] == str(stages / "n2v_branch.qs")


def test_kept_prior_mean_is_the_files_default(n2v_model, tmp_path):
    # The last step of the pipeline alone (the whole run is tested above for the other two).
    _, _, model = n2v_model
    save_model(tmp_path / "pn2v.qs", build_method({"method": "pn2v", "spatial_ndim": 2, "net": TINY, "n_samples": 4,
                                                   "noise_model": gaussian_model().to_dict()}), {"train": {"steps": 3}})
    record = {"kept": "pn2v-prior"}
    pn2v_boot._write_winner(tmp_path / "boot.qs", tmp_path, "pn2v-prior", record)
    method, manifest = load_model(tmp_path / "boot.qs")
    assert isinstance(method, PN2V) and method.estimate == "prior" and manifest["method"]["estimate"] == "prior"
    assert manifest["pn2v_boot"] == record and manifest["train"] == {"steps": 3}
    assert load_model(tmp_path / "pn2v.qs")[0].estimate == "mmse"  # the stage itself is left as trained


def test_pipeline_real_comparison_runs_and_refuses_overwrite(n2v_model, tmp_path):
    _, path, _ = n2v_model
    out = tmp_path / "boot.qs"
    choice = train_pn2v_boot(path, out, {"net": TINY, "masked_pixel_percentage": 2.0, "n_samples": 4},
                             {**TRAIN, "steps": 8}, progress=False)
    assert choice.kept in ("pn2v", "n2v") and choice.n_pixels > 1000
    assert choice.prior_risk is None  # the prior mean is offered only on request (prior_candidate)
    assert np.isfinite(choice.difference) and "at N2V's prediction" in choice.variance_source
    with pytest.raises(Exception, match="--overwrite"):
        train_pn2v_boot(path, out, {}, {**TRAIN, "steps": 8}, progress=False)
    # By default the comparison scores what predict writes; re-scored, the finished run's stages
    # give the pipeline's very comparison; the masked estimates (whole image, or the held-apart
    # slab) are other numbers.
    assert choice.compared_on == "written" and "pixels of the written output" in read_manifest(out)["pn2v_boot"]["compares"]
    again = pn2v_boot.rescore(out, path)
    assert (again.kept, again.difference, again.n_pixels) == (choice.kept, choice.difference, choice.n_pixels)
    image = pn2v_boot.rescore(out, path, "image")
    assert image.compared_on == "image" and "at N2V's blind-spot prediction" in image.variance_source
    slab = pn2v_boot.rescore(out, path, "slab")
    assert slab.n_pixels == image.n_pixels and np.isfinite(slab.difference) and slab.difference != image.difference
    assert slab.compared_on == "slab" and "held-apart masked pixels" in slab.reason
    with pytest.raises(InputError, match="rescore needs the stages"):
        pn2v_boot.rescore(tmp_path / "none.qs", path)


def test_prior_mean_helper_is_the_sample_mean():
    s = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(prior_mean(s), s.mean(-1))


# ---- 8-bit, clipped data -------------------------------------------------------------------
def test_censored_gmm_gives_clipped_pixels_the_mass_beyond_the_limit():
    from scipy import stats

    nm = GMMNoiseModel([[0.0], [float(np.log(SIGMA**2 / 255.0**2))], [0.0]], 0.0, 255.0, 1e-3, clip=(0.0, 255.0))
    s = torch.tensor([2.0, 2.0, 253.0, 100.0])
    x = torch.tensor([0.0, 3.0, 255.0, 101.0])
    got = nm.log_likelihood(x, s).numpy()
    want = [stats.norm.logcdf(0.5, 2.0, SIGMA), stats.norm.logpdf(3.0, 2.0, SIGMA),
            stats.norm.logsf(254.5, 253.0, SIGMA), stats.norm.logpdf(101.0, 100.0, SIGMA)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    again = GMMNoiseModel.from_dict(json.loads(json.dumps(nm.to_dict())))
    assert again.clip == (0.0, 255.0) and again.clip_limits == (0.0, 255.0)
    assert GMMNoiseModel.from_dict({**nm.to_dict(), "clip": None}).clip_limits is None


def test_censored_fit_recovers_the_noise_of_clipped_8bit_data():
    from quietscope.noise_models import detect_clipping, fit_gmm

    rng = np.random.default_rng(0)
    s = rng.uniform(0, 40, 60_000).astype(np.float32)  # dark signals: much of the noise falls below 0
    x = np.clip(np.round(s + rng.normal(0, 6.0, s.size)), 0, 255).astype(np.float32)
    clip = detect_clipping(x, (0, 255))
    assert clip == (0.0, None)
    plain = fit_gmm(s, x, 1, 2, n_iterations=400, seed=0)
    censored = fit_gmm(s, x, 1, 2, n_iterations=400, seed=0, clip=clip, min_sigma=0.5)
    probe = np.array([5.0, 20.0, 35.0])
    _, sd_plain = plain.mean_std(probe)
    _, sd_cens = censored.mean_std(probe)
    assert np.all(np.abs(sd_cens - 6.0) < 0.4), sd_cens  # the latent noise, clipping undone
    # The plain fit reads the clipped pile at dark signals as narrower noise.
    assert abs(sd_plain[0] - 6.0) > 0.5 and abs(sd_plain[0] - 6.0) > 2 * abs(sd_cens[0] - 6.0)


def test_integer_data_fit_options_censor_only_piled_up_ends():
    from quietscope.workflows.noise_model import integer_data_fit_options

    x = np.r_[np.zeros(50), np.full(10_000, 100.0)].astype(np.float32)
    opts = integer_data_fit_options(np.uint8, x, x)
    assert opts["clip"] == (0.0, None) and opts["min_sigma"] >= 0.5
    assert integer_data_fit_options(np.float32, x, x) == {}
    assert integer_data_fit_options(np.uint16, x[50:], x[50:])["clip"] is None


def test_inspect_noise_warns_on_stretched_8bit_data():
    from quietscope.noise_analysis.report import eight_bit_warning

    rng = np.random.default_rng(0)
    block = np.clip(rng.normal(120, 60, (64, 64)), 0, 255).astype(np.uint8)
    msg = eight_bit_warning([block])
    assert msg is not None and "contrast-stretched" in msg and "affine" in msg
    assert eight_bit_warning([np.full((64, 64), 100, np.uint8)]) is None
    assert eight_bit_warning([block.astype(np.uint16)]) is None


def test_cli_pn2v_boot_refuses_resume_and_train_accepts_init(n2v_model, tmp_path):
    from click.testing import CliRunner

    from quietscope_cli.main import cli

    d, path, model = n2v_model
    r = CliRunner().invoke(cli, ["train", str(path), "-o", str(tmp_path / "b.qs"), "--method", "pn2v-boot", "--resume"])
    assert r.exit_code != 0 and "pn2v-boot" in r.output
    nm = tmp_path / "nm.json"
    gaussian_model().save(nm)
    out = tmp_path / "p.qs"
    r = CliRunner().invoke(cli, ["train", str(path), "-o", str(out), "--method", "pn2v", "--noise-model", str(nm),
                                 "--init", str(model), "--samples", "4", "--steps", "1", "--patch", "32", "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert read_manifest(out)["init"]["model"] == str(model)


def test_cli_pn2v_boot_passes_compare_on_and_leaves_the_default_to_the_library(n2v_model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from quietscope_cli.main import cli

    _, path, _ = n2v_model
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs)
        return choose(np.full(100, 5.0), np.full(100, 6.0), 1.0, "scripted")

    monkeypatch.setattr(pn2v_boot, "train_pn2v_boot", fake)
    for extra in ([], ["--compare-on", "slab"]):
        r = CliRunner().invoke(cli, ["train", str(path), "-o", str(tmp_path / "b.qs"), "--method", "pn2v-boot", *extra])
        assert r.exit_code == 0, r.output
    assert "compare_on" not in seen[0] and seen[1]["compare_on"] == "slab"
    r = CliRunner().invoke(cli, ["train", str(path), "-o", str(tmp_path / "b.qs"), "--method", "pn2v-boot", "--compare-on", "edge"])
    assert r.exit_code != 0 and "--compare-on" in r.output


def test_a_budget_too_small_to_share_names_the_least_that_shares():
    assert pn2v_boot.split_steps(5, 0.9) == (4, 1) and pn2v_boot.split_steps(2, 0.5) == (1, 1)
    with pytest.raises(ConfigError, match=r"--steps 4 .* at --n2v-fraction 0.9; use at least 5"):
        pn2v_boot.split_steps(4, 0.9)
    with pytest.raises(ConfigError, match="use at least 51"):
        pn2v_boot.split_steps(50, 0.99)
