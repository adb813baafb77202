"""denoiSplit / μSplit: KL formulations, seeded sampling, chunked prediction, calibration, stacking."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from quietscope.errors import ConfigError, InputError
from quietscope.io.reading import open_image
from quietscope.io.stacking import open_stacked
from quietscope.methods import build_method
from quietscope.methods.denoisplit import kl_loss, neighbour_mean
from quietscope.noise_models import fit_gmm
from quietscope.workflows.calibrate import calibrate_arrays

tifffile = pytest.importorskip("tifffile")

TINY = {"net": {"depth": 2, "filters": 8}, "latent_channels": 4}


@functools.cache  # a GMM fit takes seconds; every test reads the same one
def _noise_model(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 200, 50_000).astype(np.float32)
    x = (s + rng.normal(0, 3 + 0.1 * s)).astype(np.float32)
    return fit_gmm(s, x, n_iterations=100, batch_size=5000, seed=seed).to_dict()


def _tiny(method: str = "denoisplit", **kw) -> torch.nn.Module:
    cfg = {"method": method, "spatial_ndim": 2, "in_channels": 2, **TINY, **kw}
    if method == "denoisplit" and "noise_models" not in kw:
        nm = _noise_model()
        cfg["noise_models"] = [nm, nm]
    m = build_method(cfg)
    m.set_normalization([60.0, 40.0], [30.0, 20.0])
    return m


def _structures(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Two clean structures: blobs and stripes, 0..~150."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    blobs = np.zeros(shape, np.float32)
    for _ in range(12):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        blobs += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
    stripes = 60 + 60 * np.sin(xx / 3.0 + yy / 7.0)
    return np.stack([blobs + 10, stripes]).astype(np.float32)


def _reference_usplit_kl(kls: list[torch.Tensor]) -> float:
    """juglab/uSplit ``get_kl_divergence_loss_usplit``, written out: per level and sample the
    summed KL divided by the level's latent C·H·W, batch mean (free bits 0), mean over levels."""
    per_level = [float((k.flatten(1).sum(1) / k[0].numel()).mean()) for k in kls]
    return sum(per_level) / len(per_level)


def _reference_denoisplit_kl(kls: list[torch.Tensor], free_bits: float, image_pixels: int) -> float:
    """denoiSplit: per level and sample the summed KL clamped at free bits, batch mean, summed
    over levels, divided by the image's pixels."""
    return sum(float(k.flatten(1).sum(1).clamp(min=free_bits).mean()) for k in kls) / image_pixels


def test_kl_matches_the_reference_formulas_on_a_fixed_tensor():
    from quietscope.nets.ladder_vae import LevelStats

    g = torch.Generator().manual_seed(0)
    kls = [torch.rand(3, 4, 16, 16, generator=g), torch.rand(3, 4, 8, 8, generator=g), torch.rand(3, 4, 4, 4, generator=g) * 5]
    stats = [LevelStats(k) for k in kls]
    assert float(kl_loss(stats, "mean", 0.0, 1024)) == pytest.approx(_reference_usplit_kl(kls), rel=1e-6)
    # A hand value: constant KL 0.5 everywhere -> μSplit 0.5, denoiSplit 0.5 * elements / pixels.
    half = [LevelStats(torch.full_like(k, 0.5)) for k in kls]
    assert float(kl_loss(half, "mean", 0.0, 1024)) == pytest.approx(0.5)
    assert float(kl_loss(half, "sum", 0.0, 1024)) == pytest.approx(0.5 * 4 * (256 + 64 + 16) / 1024)
    for fb in (0.0, 1.0, 100.0):
        assert float(kl_loss(stats, "sum", fb, 1024)) == pytest.approx(_reference_denoisplit_kl(kls, fb, 1024), rel=1e-6)


def test_musplit_defaults_follow_the_reference():
    mu, ds = _tiny("musplit"), _tiny()
    assert mu.config.effective_free_bits == 0.0 and ds.config.effective_free_bits == 1.0
    # Reconstruction: mean over channels (not summed); the learned log-variance floored at -5.
    out = torch.zeros(1, 4, 8, 8)
    out[:, 2:] = -20.0
    t = torch.zeros(1, 2, 8, 8) + torch.tensor([60.0, 40.0]).reshape(1, 2, 1, 1)  # = norm means: residual 0
    expected = 0.5 * (-5.0 + math.log(2 * math.pi))
    assert float(mu.reconstruction_loss(out, t)) == pytest.approx(expected, rel=1e-6)


def test_denoisplit_kl_warmup_uses_the_musplit_kl_first():
    m = _tiny(kl_warmup=2).train()
    batch = torch.from_numpy(_structures((32, 32), 0))[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        _, stats, _ = m.forward_train(batch, torch.Generator().manual_seed(0))
    assert float(m.kl_term(stats, 1024)) == pytest.approx(float(kl_loss(stats, "mean", 0.0, 1024)))
    for _ in range(2):
        m.training_loss(batch, torch.Generator().manual_seed(0))
    assert int(m.steps_seen) == 2
    assert float(m.kl_term(stats, 1024)) == pytest.approx(float(kl_loss(stats, "sum", 1.0, 1024)))


def test_validation_metrics_see_splitting():
    m = _tiny().eval()
    batch = torch.from_numpy(_structures((32, 32), 0))[None].repeat(2, 1, 1, 1)
    v = m.validation_metrics(batch)
    assert set(v) == {"select", "corr_outputs", "corr_stains"}
    assert math.isfinite(v["select"]) and -1 <= v["corr_outputs"] <= 1 and -1 <= v["corr_stains"] <= 1


def test_signal_correlation_sees_through_independent_noise():
    # Two smooth structures sharing part of their signal, plus strong independent noise: the
    # noisy images' plain correlation falls far below the clean one, the estimate does not.
    from scipy.ndimage import gaussian_filter

    from quietscope.methods.denoisplit import signal_correlation

    rng = np.random.default_rng(0)
    shared, own0, own1 = (gaussian_filter(rng.normal(size=(4, 96, 96)), (0, 3, 3)) for _ in range(3))
    clean0, clean1 = shared + 0.8 * own0, shared + 0.8 * own1
    truth = float(np.corrcoef(clean0.ravel(), clean1.ravel())[0, 1])
    sd = 1.5 * clean0.std()
    noisy0, noisy1 = clean0 + rng.normal(0, sd, clean0.shape), clean1 + rng.normal(0, sd, clean1.shape)
    plain = float(np.corrcoef(noisy0.ravel(), noisy1.ravel())[0, 1])
    est = signal_correlation(torch.from_numpy(noisy0), torch.from_numpy(noisy1))
    assert truth - plain > 0.2  # the noise hides most of the correlation ...
    assert est == pytest.approx(truth, abs=0.05)  # ... the estimate recovers it


def test_validation_select_scores_whole_fields_as_predicted_on_neighbour_foreground():
    # The criterion is the prediction of each whole field (not its centre patch), scored where
    # the pixel's neighbours, not the pixel, are bright; chunking the fields changes nothing.
    m = _tiny(context_levels=1).eval()
    m.prepare_training((16, 16))
    fields = torch.from_numpy(np.stack([_structures((32, 32), s) for s in range(3)])).float()
    fields += torch.randn(fields.shape, generator=torch.Generator().manual_seed(0)) * 5
    m.set_inference(n_samples=0)
    with torch.no_grad():
        pred = m.predict(fields.sum(1, keepdim=True))[:, :2]
    local = neighbour_mean(fields.sum(1, keepdim=True))[:, 0]
    fg = local > local.mean()
    want = np.mean([float(((fields[:, i][fg] - pred[:, i][fg]) ** 2).mean() / fields[:, i][fg].var()) for i in range(2)])
    got = m.validation_metrics(fields)
    assert got["select"] == pytest.approx(want, rel=1e-5)
    m.VAL_CHUNK = 1
    assert m.validation_metrics(fields)["select"] == pytest.approx(want, rel=1e-5)


def test_neighbour_mean_leaves_the_pixel_itself_out():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 24.0
    out = neighbour_mean(x)
    assert float(out[0, 0, 4, 4]) == 0.0  # its own value does not count
    assert float(out[0, 0, 4, 5]) == pytest.approx(1.0)  # a neighbour's mean over 24 neighbours
    assert float(out[0, 0, 4, 7]) == 0.0  # beyond the 5x5 window
    torch.testing.assert_close(neighbour_mean(torch.full((2, 1, 6, 7, 8), 3.0)), torch.full((2, 1, 6, 7, 8), 3.0))


def test_training_loss_is_finite_and_differentiable_for_both_methods():
    for name in ("denoisplit", "musplit"):
        m = _tiny(name).train()
        loss = m.training_loss(torch.from_numpy(_structures((32, 32), 0))[None].repeat(2, 1, 1, 1), torch.Generator().manual_seed(1))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in m.net.head.parameters())


def test_denoisplit_requires_one_noise_model_per_channel():
    with pytest.raises(ConfigError, match="noise model per channel"):
        build_method({"method": "denoisplit", "spatial_ndim": 2, "in_channels": 2, **TINY})
    with pytest.raises(ConfigError, match="noise_models has 1 entries"):
        build_method({"method": "denoisplit", "spatial_ndim": 2, "in_channels": 2, "noise_models": [_noise_model()], **TINY})


def test_sampling_random_without_seed_identical_with_seed():
    m = _tiny().eval()
    x = torch.from_numpy(_structures((32, 32), 1).sum(0))[None, None]
    with torch.no_grad():
        a = m.predict_samples(x, 2, seed=None)
        b = m.predict_samples(x, 2, seed=None)
        c = m.predict_samples(x, 2, seed=7)
        d = m.predict_samples(x, 2, seed=7)
    assert not torch.equal(a, b)
    assert not torch.equal(c[0], c[1])  # two samples of one call differ
    assert torch.equal(c, d)
    m.set_inference(n_samples=4, seed=3)
    with torch.no_grad():
        p1, p2 = m.predict(x), m.predict(x)
    assert p1.shape == (1, 4, 32, 32)
    assert torch.equal(p1, p2)  # seeded per call: predict is a function of its input
    assert float(p1[:, 2:].min()) >= 0 and float(p1[:, 2:].mean()) > 0
    assert m.output_names == ["ch0", "ch1", "ch0_std", "ch1_std"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A denoisplit model trained a few steps through train_model on two stacked TIFFs."""
    from quietscope.workflows.train import train_model

    d = tmp_path_factory.mktemp("dsplit")
    clean = _structures((96, 96), 2)
    rng = np.random.default_rng(0)
    noisy = clean + rng.normal(0, 5, clean.shape).astype(np.float32)
    files = []
    for i in range(2):
        tifffile.imwrite(d / f"ch{i}.tif", noisy[i])
        files.append(str(d / f"ch{i}.tif"))
    nm_files = []
    for i in range(2):
        p = d / f"nm{i}.json"
        p.write_text(json.dumps(_noise_model(i)))
        nm_files.append(str(p))
    model = d / "m.qs"
    res = train_model(
        files, model, {"method": "denoisplit", "noise_models": nm_files, **TINY},
        {"patch": (32,), "batch": 4, "steps": 6, "val_fraction": 0.0, "device": "cpu"}, progress=False,
    )
    test = _structures((75, 90), 3)
    test_noisy = (test + rng.normal(0, 5, test.shape)).astype(np.float32)
    tifffile.imwrite(d / "test_sum.tif", test_noisy.sum(0))
    for i in range(2):
        tifffile.imwrite(d / f"test_clean{i}.tif", test[i])
    return {"dir": d, "model": model, "history": res.history, "test": str(d / "test_sum.tif"), "sum": test_noisy.sum(0)}


def test_trained_model_stores_noise_models_and_stacked_data(trained):
    from quietscope.methods.modelfile import read_manifest

    man = read_manifest(trained["model"])
    assert man["method"]["in_channels"] == 2
    assert man["axes"] == "cyx"
    assert len(man["method"]["noise_models"]) == 2 and man["method"]["noise_models"][0]["kind"] == "gmm"
    assert all(math.isfinite(h["loss"]) for h in trained["history"])


def test_chunked_prediction_shape_no_nan_and_matches_whole_on_mean_path(trained, tmp_path):
    from quietscope.chunked import PredictOptions
    from quietscope.inference import method_halo, predict_tile, predict_whole
    from quietscope.methods.modelfile import load_model
    from quietscope.workflows.predict import predict

    out = tmp_path / "p.ome.zarr"
    res = predict(trained["model"], trained["test"], out, PredictOptions(chunks=(16, 16), block=(32, 32), progress=False),
                  inference={"n_samples": 0})
    img = open_image(out)
    assert img.shape == (4, 75, 90) and img.channel_names == ["ch0", "ch1", "ch0_std", "ch1_std"]
    tiled = img.read((slice(None),) * 3).astype(np.float32)
    assert np.isfinite(tiled).all()
    assert res.n_blocks == 9
    method, _ = load_model(trained["model"])
    method.set_inference(n_samples=0)
    halo = method_halo(method)
    assert res.halo == halo and all(h > 0 and h % method.downsampling_factor == 0 for h in halo)
    whole = predict_whole(lambda t: predict_tile(method, t), trained["sum"][None], halo, method.downsampling_factor)
    # The posterior-mean path is deterministic: stitched blocks equal one whole-image pass.
    assert np.abs(tiled - whole).max() <= 1e-4 * np.abs(whole).max()
    assert np.all(tiled[2:] == 0)

    # Sampling: same seed in every tile, different noise per tile -> equal only in distribution.
    out8 = tmp_path / "s.ome.zarr"
    predict(trained["model"], trained["test"], out8, PredictOptions(chunks=(16, 16), block=(32, 32), progress=False),
            inference={"n_samples": 4})
    sampled = open_image(out8).read((slice(None),) * 3)
    assert np.isfinite(sampled).all() and sampled[2:].mean() > 0


def test_calibration_recovers_known_scale_on_gaussian_errors():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 3.0, (2, 400, 400))
    clean = rng.normal(100, 10, std.shape)
    true_scale = np.array([1.7, 0.6])[:, None, None]
    pred = clean + rng.normal(size=std.shape) * std * true_scale
    res = calibrate_arrays(pred, std, clean, n_bins=30)
    for ch, k in zip(res.channels, (1.7, 0.6)):
        assert ch.scale == pytest.approx(k, rel=0.05)
        assert abs(ch.offset) < 0.05 * k * 3.0
        assert ch.ence_before > 0.3 and ch.ence_after < 0.05


def test_calibration_never_maps_a_std_to_zero():
    # Errors that grow faster than the predicted std: a free line fit has a negative offset,
    # which would turn the smallest stds into 0 ("certain"). The fit goes through the origin.
    rng = np.random.default_rng(1)
    std = rng.uniform(0.5, 3.0, (1, 300, 300))
    clean = np.zeros_like(std)
    pred = rng.normal(size=std.shape) * (2.5 * std - 1.0)
    res = calibrate_arrays(pred, std, clean, n_bins=30)
    ch = res.channels[0]
    assert np.polyfit(ch.rmv, ch.rmse, 1)[1] < -0.5  # the unconstrained offset is clearly negative
    assert ch.offset == 0.0 and ch.scale > 0
    assert min(ch.scale * r + ch.offset for r in ch.rmv) > 0.5 * ch.scale
    assert ch.ence_after < ch.ence_before


def test_calibrate_cli_writes_model_that_scales_std(trained, tmp_path):
    from click.testing import CliRunner

    from quietscope.methods.modelfile import load_model, read_manifest
    from quietscope_cli.main import cli

    out_model, report = tmp_path / "cal.qs", tmp_path / "calib.json"
    d = trained["dir"]
    r = CliRunner().invoke(cli, ["calibrate", str(trained["model"]), trained["test"], "--clean", str(d / "test_clean0.tif"),
                                 "--clean", str(d / "test_clean1.tif"), "-o", str(report), "--model-out", str(out_model),
                                 "--bins", "10", "--samples", "4"])
    assert r.exit_code == 0, r.output
    cal = read_manifest(out_model)["method"]["calibration"]
    assert len(cal) == 2 and all(c["scale"] > 0 for c in cal)
    assert json.loads(report.read_text())["channels"][0]["scale"] == pytest.approx(cal[0]["scale"])
    assert (tmp_path / "calib.png").stat().st_size > 1000
    raw, _ = load_model(trained["model"])
    calibrated, _ = load_model(out_model)
    x = torch.from_numpy(trained["sum"][:64, :64].copy())[None, None]
    with torch.no_grad():
        a, b = raw.predict(x), calibrated.predict(x)
    assert torch.equal(a[:, :2], b[:, :2])
    for c in range(2):
        expect = (a[:, 2 + c] * cal[c]["scale"] + cal[c]["offset"]).clamp(min=0)
        assert torch.allclose(b[:, 2 + c], expect, atol=1e-5)


def test_stacked_view_reads_like_the_parts(tmp_path):
    a = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    b = (a * 2).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", a)
    tifffile.imwrite(tmp_path / "b.tif", b)
    s = open_stacked([tmp_path / "a.tif", tmp_path / "b.tif"])
    assert s.axes == "cyx" and s.shape == (2, 40, 50) and s.n_channels == 2 and s.spatial_shape == (40, 50)
    assert s.dtype == np.float32 and s.n_timepoints == 1
    sp = (slice(3, 9), slice(10, 30))
    np.testing.assert_array_equal(s.read_tc(0, sp), np.stack([a[sp], b[sp]]))
    np.testing.assert_array_equal(s.read((slice(1, 2),) + sp), b[sp][None])
    for c, part in enumerate((a, b)):  # one channel alone, from the part that holds it
        np.testing.assert_array_equal(s.read_tc(0, sp, c), part[sp][None].astype(np.float32))
    with pytest.raises(InputError, match="out of range"):
        s.read_tc(0, sp, 2)
    tifffile.imwrite(tmp_path / "c.tif", a[:30])
    with pytest.raises(Exception, match="channel images differ"):
        open_stacked([tmp_path / "a.tif", tmp_path / "c.tif"])


def test_cli_train_stacks_channels(trained, tmp_path):
    from click.testing import CliRunner

    from quietscope.methods.modelfile import read_manifest
    from quietscope_cli.main import cli

    d = trained["dir"]
    out = tmp_path / "cli.qs"
    r = CliRunner().invoke(cli, [
        "train", str(d / "ch0.tif"), "--channels", str(d / "ch1.tif"), "--method", "musplit", "-o", str(out),
        "--depth", "2", "--filters", "8", "--patch", "32", "--batch", "2", "--steps", "2", "--val-fraction", "0",
        "--device", "cpu", "--param", "latent_channels=4",
        "--param", "context_levels=0",  # 96² images: no room for the recommended 128² context field
    ])
    assert r.exit_code == 0, r.output
    man = read_manifest(out)
    assert man["method"]["method"] == "musplit" and man["method"]["in_channels"] == 2 and man["axes"] == "cyx"


def test_cli_train_applies_the_recommended_options_and_logs_the_split(tmp_path):
    """``quietscope train --method musplit`` without --patch/--param: the method's recommended
    patch and lateral context are used, and the log reports the running output correlation."""
    import logging

    from click.testing import CliRunner

    from quietscope_cli.main import cli

    clean = _structures((288, 160), 3)
    files = []
    for i in range(2):
        tifffile.imwrite(tmp_path / f"ch{i}.tif", clean[i])
        files.append(str(tmp_path / f"ch{i}.tif"))
    out = tmp_path / "m.qs"
    logging.getLogger("quietscope.training.loop").setLevel(logging.INFO)
    res = CliRunner().invoke(cli, ["train", files[0], "--channels", files[1], "--method", "musplit", "-o", str(out),
                                   "--steps", "2", "--depth", "2", "--filters", "4", "--val-every", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "--patch 32 (recommended default)" in res.output
    assert "--steps 6000" not in res.output  # given on the command line: kept
    assert "--keep last (recommended default)" in res.output
    from quietscope.methods.modelfile import load_model, read_manifest

    m, _ = load_model(str(out))
    assert m.config.context_levels == 2 and int(m.context_patch) == 32
    man = read_manifest(out)
    assert man["train"]["keep"] == "last" and man["kept_step"] == 2


def test_apply_recommended_fills_only_what_the_user_left_at_its_default():
    from quietscope.workflows.train import apply_recommended

    parsed = {"patch": "64", "steps": 2000, "keep": "best", "lr": 4e-4}
    chosen, params, notes = apply_recommended("denoisplit", parsed, given={"steps"}, given_params={"latent_channels"})
    assert chosen == {"patch": "32", "steps": 2000, "keep": "last", "lr": 1e-3}  # --steps was given: kept
    assert "latent_channels" not in params and params["context_levels"] == 2
    assert "denoisplit: --keep last (recommended default)" in notes and not any("--steps" in n for n in notes)
    assert "denoisplit: --param context_levels=2 (recommended default)" in notes
    assert apply_recommended("n2v", parsed, set(), set()) == (parsed, {}, [])  # no recommendation
    assert apply_recommended("pn2v-boot", parsed, set(), set()) == (parsed, {}, [])  # a pipeline, not a method
