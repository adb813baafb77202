"""Image-quality metrics against known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quietscope.errors import InputError
from quietscope.metrics import affine_fit, mean_and_sem, psnr, range_invariant_psnr, snr, ssim

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def gt() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 100, (32, 32))


def test_psnr_of_known_mse(gt):
    # Range taken from the ground truth: max - min of gt, not of its dtype.
    pred = gt + np.where(np.indices(gt.shape).sum(0) % 2, 2.0, -2.0)  # MSE = 4 exactly
    expected = 10 * np.log10((gt.max() - gt.min()) ** 2 / 4)
    assert psnr(pred, gt) == pytest.approx(expected, rel=1e-12)
    assert psnr(pred, gt, data_range=200.0) == pytest.approx(10 * np.log10(200.0**2 / 4))


def test_psnr_uses_gt_range_for_integer_images():
    gt = np.array([[10, 20], [30, 40]], dtype=np.uint16)
    pred = gt + 1
    assert psnr(pred, gt) == pytest.approx(10 * np.log10(30.0**2 / 1.0))


def test_identical_images_are_perfect(gt):
    assert psnr(gt, gt) == np.inf
    assert ssim(gt, gt) == pytest.approx(1.0)
    assert snr(gt, gt) == np.inf


def test_range_invariant_psnr_ignores_affine_changes_of_prediction(gt):
    rng = np.random.default_rng(1)
    pred = gt + rng.normal(0, 5, gt.shape)
    reference = range_invariant_psnr(pred, gt)
    assert range_invariant_psnr(3.0 * pred - 70.0, gt) == pytest.approx(reference, rel=1e-10)
    # ...unlike the plain PSNR, which punishes the wrong scale.
    assert psnr(3.0 * pred - 70.0, gt) < psnr(pred, gt) - 10


def test_range_invariant_psnr_by_hand(gt):
    rng = np.random.default_rng(2)
    pred = 0.5 * gt + rng.normal(0, 3, gt.shape)
    # Standardise gt, best scale of the zero-mean prediction, peak = standardised gt range.
    g = (gt - gt.mean()) / gt.std()
    p = pred - pred.mean()
    p = p * np.sum(g * p) / np.sum(p * p)
    expected = 10 * np.log10((g.max() - g.min()) ** 2 / np.mean((g - p) ** 2))
    assert range_invariant_psnr(pred, gt) == pytest.approx(expected, rel=1e-10)


def test_ssim_on_volume_and_drops_with_noise():
    rng = np.random.default_rng(3)
    gt = np.cumsum(rng.normal(size=(8, 16, 16)), axis=2)
    mild = ssim(gt + rng.normal(0, 0.1, gt.shape), gt)
    strong = ssim(gt + rng.normal(0, 3.0, gt.shape), gt)
    assert 0 < strong < mild < 1


def test_snr_in_decibels(gt):
    pred = gt * 1.1  # error energy = 1 % of the signal energy
    assert snr(pred, gt) == pytest.approx(20.0)


def test_affine_fit_recovers_gain_and_offset(gt):
    fitted = affine_fit(0.6 * gt + 12.0, gt)
    np.testing.assert_allclose(fitted, gt, atol=1e-9)
    assert np.allclose(affine_fit(np.full_like(gt, 7.0), gt), gt.mean())


def test_mean_and_sem():
    mean, err = mean_and_sem([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert err == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert np.isnan(mean_and_sem([5.0])[1])
    with pytest.raises(InputError, match="no values"):
        mean_and_sem([])


def test_user_errors_are_clear(gt):
    with pytest.raises(InputError, match="same shape"):
        psnr(gt[:, :10], gt)
    with pytest.raises(InputError, match="constant"):
        psnr(gt, np.zeros_like(gt))
    with pytest.raises(InputError, match="window"):
        ssim(gt[:5, :5], gt[:5, :5])
    with pytest.raises(InputError, match="NaN"):
        snr(np.full_like(gt, np.nan), gt)


def test_real_w2s_noisy_needs_affine_fit_or_ri_psnr():
    # W2S noisy frames were contrast-stretched: noisy ~ 0.6 * clean + 12 (data README).
    import tifffile

    noisy_path = DATA / "w2s" / "noisy" / "fov081_ch0.tif"
    clean_path = DATA / "w2s" / "clean" / "fov081_ch0.tif"
    if not (noisy_path.exists() and clean_path.exists()):
        pytest.skip("real data not found: /work/shared/data/w2s is absent")
    noisy = tifffile.imread(noisy_path)[:128, :128].astype(np.float64)
    clean = tifffile.imread(clean_path)[:128, :128].astype(np.float64)
    plain = psnr(noisy, clean)
    fitted = psnr(affine_fit(noisy, clean), clean)
    assert fitted > plain
    # RI-PSNR is PSNR after the best affine map, with the gt range in std units.
    assert range_invariant_psnr(noisy, clean) == pytest.approx(fitted, abs=1e-6)
