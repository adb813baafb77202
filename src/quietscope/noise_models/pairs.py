"""Sources of ``(signal, observation)`` pixel pairs for fitting a noise model.

Each function returns two flat float32 arrays ``(s, x)`` of equal length: ``s`` the (estimated)
true signal of a pixel, ``x`` its noisy observation.
"""

from __future__ import annotations

import math

import numpy as np

from quietscope.errors import ConfigError, InputError
from quietscope.noise_models.base import as_float_array


def pairs_from_calibration(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from a calibration stack: many noisy images of one static sample.

    The signal of a pixel is its mean over the stack (PN2V's calibration protocol), paired
    with each of its noisy values.

    Parameters
    ----------
    stack : np.ndarray, shape (N, ...)
        ``N`` noisy images along axis 0.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays of ``N x`` (pixels per image) pairs.
    """
    data = as_float_array(stack, "calibration stack")
    if data.ndim < 2:
        raise InputError(
            f"calibration stack has shape {data.shape}; pass images stacked along axis 0"
        )
    n = data.shape[0]
    if n < 2:
        raise InputError(
            f"calibration stack has {n} image; need ≥2 (ideally ≥50) noisy images of a "
            "static sample"
        )
    signal = data.mean(axis=0, dtype=np.float64).astype(np.float32)
    s = np.broadcast_to(signal, data.shape).ravel()
    return s, data.astype(np.float32, copy=False).ravel()


def pairs_from_paired(noisy: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from noisy images with a clean (ground-truth) counterpart.

    Parameters
    ----------
    noisy : np.ndarray
        Noisy images.
    clean : np.ndarray
        Same shape as ``noisy``, or the shape of one of its images (``noisy.shape[1:]``)
        when ``noisy`` stacks several noisy images of the same clean image.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    x = as_float_array(noisy, "noisy")
    s = as_float_array(clean, "clean")
    if s.shape != x.shape and s.shape != x.shape[1:]:
        raise InputError(
            f"noisy has shape {x.shape} but clean has shape {s.shape}; pass a clean image "
            "of the same shape (or one clean image for a stack of noisy ones)"
        )
    s = np.broadcast_to(s, x.shape)
    return s.astype(np.float32).ravel(), x.astype(np.float32, copy=False).ravel()


def pairs_from_prediction(
    prediction: np.ndarray, data: np.ndarray, clip_percentile: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrapped pairs: a denoiser's prediction as pseudo-signal for the noisy data.

    As in Prakash et al. (2020), the pixels whose pseudo-signal lies in the lowest or
    highest ``clip_percentile`` percent are dropped: a denoiser is least reliable there.

    Parameters
    ----------
    prediction : np.ndarray
        Denoised version of ``data`` (e.g. by Noise2Void), same shape.
    data : np.ndarray
        The noisy data.
    clip_percentile : float, optional
        Percent of pixels dropped at each end of the pseudo-signal range, in ``[0, 50)``.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    s = as_float_array(prediction, "prediction")
    x = as_float_array(data, "data")
    if s.shape != x.shape:
        raise InputError(
            f"prediction has shape {s.shape} but data has shape {x.shape}; pass the "
            "prediction made for exactly this data"
        )
    if not 0 <= clip_percentile < 50:
        raise ConfigError(
            f"clip_percentile={clip_percentile} is invalid; use a percent in [0, 50), e.g. 0.5"
        )
    s, x = s.astype(np.float32).ravel(), x.astype(np.float32).ravel()
    low, high = np.percentile(s, [clip_percentile, 100 - clip_percentile])
    keep = (s >= low) & (s <= high)
    return s[keep], x[keep]


def match_variance_line(
    signal: np.ndarray,
    observation: np.ndarray,
    gain: float,
    intercept: float,
    n_bins: int = 64,
    min_count: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescale bootstrapped residuals so that their variance follows ``gain * s + intercept``.

    A bootstrapped pseudo-signal is a denoiser's prediction, not the truth: the residual
    ``x - s`` holds the noise *and* the denoiser's own error, so a noise model fitted to it is
    too wide exactly where the denoiser errs most, on bright structures (measured on BPAE at
    moderate noise: +16-19 % variance on bright structures, ``benchmarks/pn2v_variance.py``). PN2V's prior
    width is fitted as the total variance minus the noise model's, so that bias, about the
    size of the prior's own variance, leaves the prior too narrow and the MMSE estimate folds
    in too little of the observed pixel. The Poisson–Gaussian line of the data itself
    (:func:`quietscope.noise_analysis.estimate_poisson_gaussian`, from local residuals, which
    the denoiser does not enter) fixes the variance per signal level; the residuals keep
    their shape (skew, tails) and are only scaled.

    Parameters
    ----------
    signal, observation : np.ndarray
        Bootstrapped pairs (flat, raw units), e.g. from :func:`pairs_from_prediction`.
    gain, intercept : float
        The variance line ``var(x | s) = gain * s + intercept`` of the data, raw units.
    n_bins : int
        Signal quantile bins in which the residual variance is measured (fewer when there are
        fewer than ``n_bins * min_count`` pairs).
    min_count : int
        Bins with fewer pairs are skipped (the factor is interpolated across them).

    Returns
    -------
    observation : np.ndarray
        ``s + c(s) * (x - s)``, float32, with ``c`` interpolated between bin centres.
    bin_signal, bin_factor : np.ndarray
        Each bin's mean signal and factor ``c``, for logging and plots.
    """
    s = as_float_array(signal, "signal").ravel().astype(np.float64)
    x = as_float_array(observation, "observation").ravel().astype(np.float64)
    if s.shape != x.shape:
        raise InputError(f"signal has {s.size} pairs but observation has {x.size}; pass matching arrays")
    if not (np.isfinite(gain) and np.isfinite(intercept)):
        raise ConfigError(f"variance line {gain} * s + {intercept} is not finite")
    n_bins = max(1, min(int(n_bins), s.size // max(int(min_count), 1)))  # few pairs: fewer, fuller bins
    edges = np.quantile(s, np.linspace(0.0, 1.0, n_bins + 1))
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    r = x - s
    centres, factors = [], []
    for i in range(n_bins):
        sel = idx == i
        if sel.sum() < min_count:
            continue
        v_res = float(r[sel].var())
        v_line = gain * float(s[sel].mean()) + intercept
        if v_res <= 0 or v_line <= 0:
            continue
        centres.append(float(s[sel].mean()))
        factors.append(math.sqrt(v_line / v_res))
    if not centres:
        raise InputError(
            f"no signal bin has {min_count} pairs with a positive variance on the line "
            f"{gain:.4g} * s + {intercept:.4g}; the variance line does not fit these data"
        )
    bin_signal, bin_factor = np.asarray(centres), np.asarray(factors)
    c = np.interp(s, bin_signal, bin_factor)
    return (s + c * r).astype(np.float32), bin_signal, bin_factor


#: Share of the observations that must sit exactly at an end of the range for it to count as
#: clipped (a few pixels at 0 or 255 happen by chance; clipping piles many up there).
CLIP_MIN_SHARE = 1e-4


def detect_clipping(
    observation: np.ndarray, limits: tuple[float, float], min_share: float = CLIP_MIN_SHARE
) -> tuple[float | None, float | None]:
    """Which ends of a fixed value range the observations are clipped at.

    Integer camera data cannot go beyond their type's range: 8-bit images that were contrast
    stretched pile pixels up at 0 and 255 (W2S: about 0.2 %). Those values are censored
    (the true value was at or beyond the limit), which a noise model must not read as noise
    that sits exactly on the limit.

    Parameters
    ----------
    observation : np.ndarray
        Observed values (any shape).
    limits : (float, float)
        The representable range, e.g. ``(0, 255)`` for uint8.
    min_share : float
        Share of the observations at a limit from which that end counts as clipped.

    Returns
    -------
    (float or None, float or None)
        The clipped low and high limits (``None`` for an end that is not clipped).
    """
    x = as_float_array(observation, "observation").ravel()
    need = max(1, int(math.ceil(min_share * x.size)))
    lo, hi = (float(v) for v in limits)
    return (lo if int(np.count_nonzero(x <= lo)) >= need else None,
            hi if int(np.count_nonzero(x >= hi)) >= need else None)
