"""Image-quality metrics against a ground truth, for 2D images and 3D volumes.

Unless told otherwise the data range is taken from the ground truth (``max - min``), not from
the dtype as scikit-image does, so that float and integer images compare alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.stats import sem
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from quietscope.errors import InputError


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 arrays of one shape; :class:`InputError` otherwise."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape:
        raise InputError(
            f"prediction has shape {p.shape} but ground truth has shape {g.shape}; "
            "compare images of the same shape"
        )
    if p.size == 0:
        raise InputError("images are empty; pass at least one pixel")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(g))):
        raise InputError("images contain NaN or infinite values; mask or replace them first")
    return p, g


def _gt_range(gt: np.ndarray, data_range: float | None) -> float:
    if data_range is None:
        data_range = float(gt.max() - gt.min())
        if data_range == 0:
            raise InputError("ground truth is constant, so it has no data range; pass data_range")
    elif not data_range > 0:
        raise InputError(f"data_range={data_range} is invalid; pass a positive value")
    return float(data_range)


def psnr(pred: np.ndarray, gt: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB.

    Parameters
    ----------
    pred, gt : np.ndarray
        Prediction and ground truth, same shape.
    data_range : float, optional
        Peak value; default ``gt.max() - gt.min()``.

    Returns
    -------
    float
        ``10 log10(data_range^2 / MSE)``; ``inf`` for identical images.
    """
    p, g = _pair(pred, gt)
    data_range = _gt_range(g, data_range)
    with np.errstate(divide="ignore"):  # identical images: inf dB, not a warning
        return float(peak_signal_noise_ratio(g, p, data_range=data_range))


def range_invariant_psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR after the best scaling of the prediction, as reported by CARE/HDN/denoiSplit.

    Follows ``RangeInvariantPsnr`` of denoiSplit/CAREamics (adapted there from
    juglab/ScaleInvPSNR): the ground truth is standardised (zero mean, unit std), the
    zero-mean prediction is multiplied by the factor that minimises its squared error to it,
    and the PSNR uses the standardised ground truth's range ``(max - min) / std`` as peak.
    The result is invariant to any affine change ``a * pred + b`` with ``a > 0``.

    Parameters
    ----------
    pred, gt : np.ndarray
        Prediction and ground truth, same shape; one image or volume (average a batch with
        :func:`mean_and_sem`).

    Returns
    -------
    float
        Range-invariant PSNR in dB.
    """
    p, g = _pair(pred, gt)
    std = g.std()
    if std == 0:
        raise InputError("ground truth is constant; range-invariant PSNR is undefined for it")
    g_norm = (g - g.mean()) / std
    p_zero = p - p.mean()
    denom = np.sum(p_zero * p_zero)
    # A constant prediction carries no information: the best scaled version is zero.
    scaled = p_zero * (np.sum(g_norm * p_zero) / denom) if denom > 0 else np.zeros_like(p)
    return psnr(scaled, g_norm, data_range=float(g_norm.max() - g_norm.min()))


def ssim(pred: np.ndarray, gt: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity (scikit-image, default 7-pixel window) of a 2D or 3D image.

    Parameters
    ----------
    pred, gt : np.ndarray
        Prediction and ground truth, same shape; a 3D array is treated as a volume, not as
        channels.
    data_range : float, optional
        Default ``gt.max() - gt.min()``.

    Returns
    -------
    float
        Mean SSIM, 1 for identical images.
    """
    p, g = _pair(pred, gt)
    if min(g.shape) < 7:
        raise InputError(
            f"images of shape {g.shape} are smaller than SSIM's 7-pixel window on some axis; "
            "pass a larger crop"
        )
    return float(
        structural_similarity(g, p, data_range=_gt_range(g, data_range), channel_axis=None)
    )


def snr(pred: np.ndarray, gt: np.ndarray) -> float:
    """Signal-to-noise ratio in dB: ``10 log10(sum(gt^2) / sum((gt - pred)^2))``."""
    p, g = _pair(pred, gt)
    with np.errstate(divide="ignore"):
        return float(10 * np.log10(np.sum(g**2) / np.sum((g - p) ** 2)))


def affine_fit(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The affine map ``a * pred + b`` closest to ``gt`` in least squares.

    Use it before comparing with a ground truth recorded at another gain/offset (e.g. W2S).

    Parameters
    ----------
    pred, gt : np.ndarray
        Prediction and ground truth, same shape.

    Returns
    -------
    np.ndarray
        float64 fitted prediction, shaped like ``pred``.
    """
    p, g = _pair(pred, gt)
    p_zero = p - p.mean()
    denom = np.sum(p_zero**2)
    # Closed form of the two-parameter least squares; a constant prediction gets a = 0.
    a = np.sum(p_zero * (g - g.mean())) / denom if denom > 0 else 0.0
    return a * p_zero + g.mean()


def mean_and_sem(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``std`` with ``ddof=1`` over ``sqrt(n)``).

    Parameters
    ----------
    values : iterable of float
        E.g. one metric per test image.

    Returns
    -------
    mean, sem : float
        ``sem`` is NaN for a single value.
    """
    v = np.asarray(list(values), dtype=np.float64).ravel()
    if v.size == 0:
        raise InputError("no values to average; pass at least one")
    spread = float(sem(v)) if v.size > 1 else float("nan")
    return float(v.mean()), spread
