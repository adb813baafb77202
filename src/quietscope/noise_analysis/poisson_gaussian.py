"""Estimate the Poisson–Gaussian camera noise model from the data alone.

Model, in camera units (ADU)::

    x = a * Poisson(s / a) + offset + N(0, sigma**2)

so a pixel whose mean is ``mu = s + offset`` has variance ``a * (mu - offset) + sigma**2``,
a straight line in ``mu``: ``var = a * mu + b`` with ``b = sigma**2 - a * offset``.

The line is measured as in Foi et al. (2008), *Practical Poissonian-Gaussian noise modeling
and fitting for single-image raw-data*: a high-pass residual that cancels smooth signal
estimates the local noise variance, a local mean estimates the local intensity, residuals are
binned by local mean and a robust straight line is fitted to the binned variances.

Offset and read noise are not separately identifiable from the line (only ``b`` is); see
:func:`estimate_poisson_gaussian` for how they are separated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, optimize, signal, stats

from quietscope.errors import ConfigError, InputError

#: Fourth-order finite difference; cancels any signal that is cubic along the axis. Its
#: squared weights sum to 70, so dividing by sqrt(70) keeps white noise at unit gain.
_HIGHPASS = np.array([1.0, -4.0, 6.0, -4.0, 1.0]) / np.sqrt(70.0)
#: Sum over lags of the squared autocorrelation of high-pass filtered white noise: the
#: factor by which correlated residuals inflate the variance of a mean of their squares.
_SQ_CORR = float(np.sum(np.correlate(_HIGHPASS, _HIGHPASS, "full") ** 2))
#: Local mean: Savitzky–Golay smoothing (9 pixels, quadratic) along y and x. It is exact
#: for locally quadratic signal, so the mean of a pixel on the curved flank of a blob is
#: not pulled up or down (a box mean is, by the curvature, biasing the line). Its weights
#: are quadratic in the offset, which the high-pass annihilates: mean and residual of a
#: pixel are uncorrelated.
_SMOOTH = signal.savgol_coeffs(9, 2)
#: Noise variance of the local mean relative to that of one pixel.
_MEAN_VAR = float(np.sum(_SMOOTH**2)) ** 2
#: Border lost to the filters, in pixels.
_MARGIN = len(_SMOOTH) // 2
#: Residuals beyond this many robust standard deviations are edges, not noise.
_CLIP = 4.0
#: Second moment of a standard normal truncated at +-_CLIP; undoes the clip's bias.
_CLIP_VAR = float(stats.truncnorm(-_CLIP, _CLIP).var())


@dataclass
class PoissonGaussianEstimate:
    """Fitted Poisson–Gaussian noise model, in the data's units (ADU).

    Attributes
    ----------
    gain : float
        ``a``: ADU per detected photon (slope of variance against mean).
    read_noise_sigma : float
        ``sigma``: standard deviation of the signal-independent (read) noise, ADU.
    offset : float
        Camera offset: the mean value of a pixel that received no photons, ADU.
    intercept : float
        ``b`` of ``var = a * mean + b``; equals ``sigma**2 - a * offset``.
    r2 : float
        Weighted coefficient of determination of the line on the binned variances.
    bins_mean, bins_var : numpy.ndarray
        Local mean and noise variance of each intensity bin (the points of the fit).
    bins_count : numpy.ndarray
        Number of pixels in each bin.
    offset_source : str
        ``"user"`` (given) or ``"dark-level"`` (estimated from the darkest pixels).
    data_mean : float
        Mean intensity of the sample, ADU.
    clipped_fraction : float
        Fraction of pixels at the integer dtype's floor (with a camera offset) or ceiling;
        clipped noise is no longer zero-mean.
    highpass_axis : int
        Axis along which the residual was taken (noise must be uncorrelated along it).
    n_pixels : int
        Number of pixels that entered the fit.
    notes : list of str
        Caveats found while fitting (plain sentences).
    """

    gain: float
    read_noise_sigma: float
    offset: float
    intercept: float
    r2: float
    bins_mean: np.ndarray
    bins_var: np.ndarray
    bins_count: np.ndarray
    offset_source: str = "dark-level"
    data_mean: float = float("nan")
    clipped_fraction: float = 0.0
    highpass_axis: int = -2
    n_pixels: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def mean_photons(self) -> float:
        """Mean detected photons per pixel of the sample, ``(data_mean - offset) / gain``."""
        if not self.gain > 0:
            return float("nan")
        return (self.data_mean - self.offset) / self.gain

    def variance(self, mean: np.ndarray | float) -> np.ndarray | float:
        """Noise variance predicted by the fitted line at intensity ``mean`` (ADU)."""
        return self.gain * np.asarray(mean, dtype=float) + self.intercept

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (floats and lists only)."""
        return {
            "gain": float(self.gain),
            "read_noise_sigma": float(self.read_noise_sigma),
            "offset": float(self.offset),
            "intercept": float(self.intercept),
            "r2": float(self.r2),
            "offset_source": self.offset_source,
            "data_mean": float(self.data_mean),
            "mean_photons": _finite_or_none(self.mean_photons),
            "clipped_fraction": float(self.clipped_fraction),
            "highpass_axis": int(self.highpass_axis),
            "n_pixels": int(self.n_pixels),
            "bins_mean": [float(v) for v in self.bins_mean],
            "bins_var": [float(v) for v in self.bins_var],
            "bins_count": [int(v) for v in self.bins_count],
            "notes": list(self.notes),
        }


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def as_blocks(blocks: Sequence[np.ndarray] | np.ndarray, min_size: int = 1) -> list[np.ndarray]:
    """Validate a sample of 2D ``(y, x)`` / 3D ``(z, y, x)`` blocks; return them as float64.

    A single array is accepted as a one-block sample. All blocks must have the same number
    of dimensions, be finite, and measure at least ``min_size`` pixels along y and x.
    """
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    out = []
    for i, b in enumerate(blocks):
        a = np.asarray(b)
        if a.ndim not in (2, 3):
            raise InputError(
                f"block {i} has {a.ndim} dimensions; pass 2D (y, x) or 3D (z, y, x) blocks "
                "of a single channel and time point"
            )
        if min(a.shape[-2:]) < min_size:
            raise InputError(
                f"block {i} has shape {a.shape}; blocks must measure at least {min_size} "
                "pixels along y and x, read larger blocks"
            )
        if not (np.issubdtype(a.dtype, np.number) and not np.iscomplexobj(a)):
            raise InputError(f"block {i} has dtype {a.dtype}; pass real-valued intensity data")
        a = a.astype(np.float64, copy=False)
        if not np.all(np.isfinite(a)):
            raise InputError(f"block {i} contains NaN or infinite values; mask or crop them out first")
        out.append(a)
    if not out:
        raise InputError("no blocks given; pass at least one 2D or 3D block of the image")
    if len({a.ndim for a in out}) > 1:
        raise InputError("blocks mix 2D and 3D arrays; pass blocks of one dimensionality")
    return out


def _inplane(ndim: int, size: int) -> tuple[int, ...]:
    # z is often sampled more coarsely than y/x, so smoothing stays within each plane.
    return (1,) * (ndim - 2) + (size, size)


def _crop(a: np.ndarray, margin: int) -> np.ndarray:
    """Drop ``margin`` pixels at each in-plane border, where filters see the padding."""
    sl = (slice(None),) * (a.ndim - 2) + (slice(margin, a.shape[-2] - margin),) * 2
    return a[sl]


def local_mean_and_residual(block: np.ndarray, axis: int = -2) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel local mean and unit-gain high-pass residual of one block.

    The residual is the fourth-order difference along ``axis`` divided by ``sqrt(70)``:
    it cancels signal that is locally cubic along that axis, and its variance equals the
    pixel noise variance as long as the noise is not correlated along ``axis`` (noise
    correlated along other axes does not matter). The local mean is a 9 x 9 in-plane
    quadratic Savitzky–Golay smoothing. Both are cropped by 4 pixels at the in-plane
    borders.

    Parameters
    ----------
    block : numpy.ndarray
        2D ``(y, x)`` or 3D ``(z, y, x)`` float array.
    axis : int
        Axis of the high-pass: y or x (-2 or -1).

    Returns
    -------
    mean, residual : numpy.ndarray
        Arrays of equal shape, ``block.shape`` minus 8 along y and x.
    """
    r = ndimage.correlate1d(block, _HIGHPASS, axis=axis, mode="reflect")
    m = ndimage.correlate1d(block, _SMOOTH, axis=-2, mode="reflect")
    m = ndimage.correlate1d(m, _SMOOTH, axis=-1, mode="reflect")
    return _crop(m, _MARGIN), _crop(r, _MARGIN)


def robust_variance(r: np.ndarray, scale: np.ndarray | float | None = None) -> float:
    """Variance of zero-mean noise samples ``r``, insensitive to a few large outliers.

    Samples beyond 4 standard deviations are dropped, as residuals at edges are signal,
    not noise; the second moment of the rest is corrected for the clip. The standard
    deviation is ``scale`` (per sample, e.g. from a first fit: the noise of a bin that spans
    a range of intensities is not homogeneous) or, if not given, the MAD of ``r``.
    """
    r = np.ravel(r)
    if scale is None:
        scale = 1.4826 * float(np.median(np.abs(r)))
        if scale == 0.0:
            # Mostly exact zeros (photon counting at very low counts): no outlier scale.
            return float(np.mean(r * r))
    kept = r[np.abs(r) <= _CLIP * np.ravel(scale)]
    if kept.size == 0:
        return float(np.mean(r * r))
    return float(np.mean(kept * kept)) / _CLIP_VAR


def dark_level(blocks: Sequence[np.ndarray], percentile: float = 1.0) -> float:
    """Mean value of the darkest pixels of the sample: the camera offset if some pixels saw no light.

    Pixels are ranked by the mean of a 9 x 9 in-plane ring around them that excludes their
    own 3 x 3 neighbourhood; the raw values of the ``percentile`` % lowest-ranked pixels are
    averaged. Because the ranking never looks at a pixel's own noise, selecting the lowest
    ones does not bias their mean low (a plain low percentile of a smoothed image would).

    Parameters
    ----------
    blocks : sequence of numpy.ndarray
        Float blocks, each at least 9 x 9 in-plane.
    percentile : float
        Share of pixels (in %) taken as dark; the sample must contain at least that much
        background for the result to be the offset.

    Returns
    -------
    float
        The dark level, in the data's units.
    """
    rank, raw = [], []
    for b in blocks:
        u9 = ndimage.uniform_filter(b, size=_inplane(b.ndim, 9), mode="reflect")
        u3 = ndimage.uniform_filter(b, size=_inplane(b.ndim, 3), mode="reflect")
        rank.append(_crop((81.0 * u9 - 9.0 * u3) / 72.0, 4).ravel())
        raw.append(_crop(b, 4).ravel())
    rank_all, raw_all = np.concatenate(rank), np.concatenate(raw)
    k = max(1, int(round(rank_all.size * percentile / 100.0)))
    darkest = np.argpartition(rank_all, k - 1)[:k]
    return float(raw_all[darkest].mean())


def clipped_fraction(blocks: Sequence[np.ndarray], dtype: np.dtype, offset: float) -> float:
    """Fraction of pixels sitting on the integer dtype's floor (when there is an offset) or ceiling."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        return 0.0
    info = np.iinfo(dtype)
    n = sum(b.size for b in blocks)
    # With a camera offset, a true reading of the floor is impossible: it is clipped noise.
    # Without one (photon counting), zeros are genuine.
    low = sum(int(np.count_nonzero(b <= info.min)) for b in blocks) if offset >= 1.0 else 0
    high = sum(int(np.count_nonzero(b >= info.max)) for b in blocks)
    return (low + high) / n


def fit_line(
    mean: np.ndarray, var: np.ndarray, count: np.ndarray
) -> tuple[float, float, float]:
    """Robust weighted fit of ``var = a * mean + b`` to binned variances.

    Each bin is weighted by the standard error of a variance from ``count`` samples,
    ``var * sqrt(2 / count)`` (taken from the line itself, so low bins are not favoured),
    inflated by the correlation of neighbouring high-pass residuals (their squares are
    correlated over ~2.6 pixels), and a Huber loss limits the pull of bins spoiled by edges or clipping.

    Returns
    -------
    a, b, r2 : float
        Slope, intercept and weighted coefficient of determination.
    """
    mean, var, count = (np.asarray(v, dtype=float) for v in (mean, var, count))
    floor = 1e-6 * max(float(np.max(np.abs(var))), 1e-300)
    se = np.maximum(var, floor) * np.sqrt(2.0 * _SQ_CORR / count)
    a, b = np.polyfit(mean, var, 1, w=1.0 / se)
    for _ in range(3):
        se = np.maximum(a * mean + b, floor) * np.sqrt(2.0 * _SQ_CORR / count)
        res = optimize.least_squares(
            lambda p: (p[0] * mean + p[1] - var) / se, x0=[a, b], loss="huber", f_scale=2.0
        )
        a, b = (float(v) for v in res.x)
    w = 1.0 / se**2
    fitted = a * mean + b
    vbar = np.sum(w * var) / np.sum(w)
    ss_tot = float(np.sum(w * (var - vbar) ** 2))
    r2 = 1.0 - float(np.sum(w * (var - fitted) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    return a, b, r2


def _bin_edges(m: np.ndarray, r: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """Edges of intensity bins for the mean-variance fit.

    Half of the candidate edges are equally spaced (to reach bright, rare intensities), half
    are quantiles (narrow bins where pixels are dense, usually near the dark level that
    pins down the read noise). A bin narrower than 4 standard deviations of the local
    mean's own noise is merged with the next: it would split pixels of one intensity by
    noise alone, and pixels whose mean is high by chance do not have a higher variance,
    which flattens the fitted line (regression dilution).
    """
    cand = np.unique(
        np.concatenate(
            [
                np.linspace(lo, hi, n_bins // 2 + 1),
                np.percentile(m, np.linspace(0.1, 99.9, n_bins - n_bins // 2 + 1)),
            ]
        )
    )
    kept = [cand[0]]
    for e in cand[1:]:
        sel = (m >= kept[-1]) & (m < e)
        if np.count_nonzero(sel) < 2:
            continue
        sd_mean = np.sqrt(robust_variance(r[sel]) * _MEAN_VAR)
        if e - kept[-1] >= 4.0 * sd_mean:
            kept.append(e)
    if kept[-1] < cand[-1]:
        if len(kept) > 1:
            kept[-1] = cand[-1]
        else:
            kept.append(cand[-1])
    return np.asarray(kept)


def _check_options(n_bins: int, min_count: int, dark_percentile: float) -> None:
    if n_bins < 3:
        raise ConfigError(f"n_bins={n_bins} is too few for a line fit; use at least 3 (default 24)")
    if min_count < 2:
        raise ConfigError(f"min_count={min_count} must be at least 2 (default 200)")
    if not 0 < dark_percentile < 50:
        raise ConfigError(f"dark_percentile={dark_percentile} must be between 0 and 50 (default 1)")


def _binned_variance_line(
    data: list[np.ndarray], axis: int, n_bins: int, min_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Local noise variance binned by local mean, and the line fitted through it (two passes)."""
    means, resid = [], []
    for b in data:
        m, r = local_mean_and_residual(b, axis)
        means.append(m.ravel())
        resid.append(r.ravel())
    m_all, r_all = np.concatenate(means), np.concatenate(resid)

    lo, hi = np.percentile(m_all, [0.1, 99.9])
    if not hi > lo:
        raise InputError(
            "the sample has a single intensity level, so gain cannot be measured; "
            "pass blocks that include both background and bright structure"
        )
    edges = _bin_edges(m_all, r_all, lo, hi, n_bins)
    n_bins = edges.size - 1
    idx = np.digitize(m_all, edges[1:-1])
    inside = (m_all >= lo) & (m_all <= hi)
    members = [np.flatnonzero(inside & (idx == k)) for k in range(n_bins)]
    members = [sel for sel in members if sel.size >= min_count]
    if len(members) < 3:
        raise InputError(
            f"only {len(members)} intensity bins have {min_count}+ pixels, too few to fit the "
            "mean-variance line; pass more or larger blocks spanning background to bright signal"
        )
    bins_mean = np.array([m_all[sel].mean() for sel in members])
    bins_count = np.array([sel.size for sel in members])
    # Pass 1 clips each bin at its own MAD; pass 2 clips each pixel at the noise the first
    # line predicts for its own mean, since a wide bin mixes pixels of different variance.
    bins_var = np.array([robust_variance(r_all[sel]) for sel in members])
    a, b, _ = fit_line(bins_mean, bins_var, bins_count)
    bins_var = np.array(
        [
            robust_variance(
                r_all[sel], np.sqrt(np.maximum(a * m_all[sel] + b, 0.25 * v))
            )
            for sel, v in zip(members, bins_var)
        ]
    )
    return bins_mean, bins_var, bins_count, fit_line(bins_mean, bins_var, bins_count)


def estimate_poisson_gaussian(
    blocks: Sequence[np.ndarray] | np.ndarray,
    *,
    offset: float | None = None,
    axis: int = -2,
    n_bins: int = 24,
    min_count: int = 200,
    dark_percentile: float = 1.0,
) -> PoissonGaussianEstimate:
    """Estimate gain, read noise and offset of Poisson–Gaussian camera noise.

    The variance-vs-mean line (slope = gain ``a``, intercept ``b``) is fitted to local noise
    variances binned by local mean (see :func:`local_mean_and_residual`,
    :func:`robust_variance`, :func:`fit_line`).

    The line alone cannot separate offset from read noise, because only
    ``b = sigma**2 - a * offset`` is identified. It is resolved thus:

    * with ``offset`` given (e.g. from a dark frame or the camera's data sheet),
      ``sigma**2 = b + a * offset``;
    * otherwise the offset is taken as the **dark level** of the sample, the mean of the
      ``dark_percentile`` % darkest pixels (:func:`dark_level`). At a pixel that saw no
      light the variance is pure read noise, so ``sigma**2`` is the fitted line evaluated
      at the dark level. This assumes at least ``dark_percentile`` % of the sample is truly
      dark; background autofluorescence makes the offset come out too high and ``sigma``
      too large. Pass ``offset`` when the sample has no background.

    If ``sigma**2`` comes out negative it is reported as 0 with a note.

    Parameters
    ----------
    blocks : sequence of numpy.ndarray or numpy.ndarray
        Sample of 2D ``(y, x)`` or 3D ``(z, y, x)`` blocks, raw camera values (not
        rescaled), each at least 16 x 16 in-plane. Together they should span from
        background to the brightest structures.
    offset : float, optional
        Known camera offset (ADU). Estimated from the dark level when omitted.
    axis : int
        In-plane axis (-2 = y or -1 = x) of the high-pass residual. The noise must not be
        correlated along it (use an axis where
        :func:`~quietscope.noise_analysis.correlation.detect_structured_noise` finds no
        structure); correlation along other axes does not bias the estimate.
    n_bins : int
        Number of intensity bins between the 0.1 and 99.9 percentiles: half of the
        edges equally spaced, half at quantiles; bins narrower than the noise of the local
        mean are merged, so fewer may be used.
    min_count : int
        Bins with fewer pixels are ignored.
    dark_percentile : float
        Share (%) of pixels taken as dark when ``offset`` is not given.

    Returns
    -------
    PoissonGaussianEstimate
        The fitted model and the binned points it was fitted to.

    Raises
    ------
    InputError
        If the blocks are unusable or span too narrow an intensity range for a line fit.
    ConfigError
        If an option is out of range.
    """
    _check_options(n_bins, min_count, dark_percentile)
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    dtype = np.asarray(blocks[0]).dtype if len(blocks) else np.dtype(float)
    data = as_blocks(blocks, min_size=16)
    ndim = data[0].ndim
    if axis not in (ndim - 2, ndim - 1, -2, -1):
        # z is often sampled too coarsely for a difference to cancel the signal.
        raise ConfigError(f"axis={axis} is not an in-plane axis; use -2 (y) or -1 (x)")
    bins_mean, bins_var, bins_count, (a, b, r2) = _binned_variance_line(data, axis, n_bins, min_count)

    notes: list[str] = []
    if offset is None:
        offset_value, source = dark_level(data, dark_percentile), "dark-level"
    else:
        offset_value, source = float(offset), "user"
    read_var = b + a * offset_value
    if read_var < 0:
        notes.append(
            f"the fitted line is negative at the offset ({read_var:.3g} ADU^2): read noise "
            "set to 0; the offset is probably too high (pass the camera's offset)"
        )
    if a <= 0:
        notes.append("variance does not grow with intensity: the noise is not Poisson-like")
    return PoissonGaussianEstimate(
        gain=a,
        read_noise_sigma=float(np.sqrt(max(read_var, 0.0))),
        offset=offset_value,
        intercept=b,
        r2=r2,
        bins_mean=bins_mean,
        bins_var=bins_var,
        bins_count=bins_count,
        offset_source=source,
        data_mean=sum(float(x.sum()) for x in data) / sum(x.size for x in data),
        clipped_fraction=clipped_fraction(data, dtype, offset_value),
        highpass_axis=axis % ndim,
        n_pixels=int(bins_count.sum()),
        notes=notes,
    )
