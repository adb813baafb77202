"""Is the noise pixel-independent? Autocorrelation of noise residuals and its reading.

Blind-spot methods (Noise2Void and relatives) assume that the noise of a pixel cannot be
predicted from its neighbours. Camera read-out, line scanning or resampling often
correlate the noise of neighbouring pixels along one axis; then a structN2V mask along
that axis is needed (Broaddus et al. 2020). This module measures that correlation.

Without a denoised prediction, the noise is isolated by a high-pass residual. A residual
that subtracts a smoothed image either leaks signal (smoothing too wide) or removes the
low-frequency part of correlated noise (smoothing too narrow), both of which bias the
autocorrelation. Instead, :func:`raw_noise_autocorrelation` uses, for each axis, a
fourth-order difference along a *different* axis: it cancels signal that is locally cubic
there, and its autocorrelation along the measured axis equals the noise's own, exactly,
whenever the noise is not also correlated along the high-pass axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft, stats

from quietscope.errors import ConfigError, InputError
from quietscope.noise_analysis.poisson_gaussian import as_blocks

#: Default |correlation| above which neighbouring noise counts as correlated.
DEFAULT_THRESHOLD = 0.1


def _default_axes(ndim: int) -> str:
    return "zyx"[3 - ndim :]


def _check_axes(axes: str | None, ndim: int) -> str:
    if axes is None:
        return _default_axes(ndim)
    axes = axes.lower()
    if len(axes) != ndim or len(set(axes)) != ndim or not set(axes) <= set("zyx"):
        raise ConfigError(
            f"axes={axes!r} does not describe {ndim}D data; use {_default_axes(ndim)!r}"
        )
    return axes


def residual(block: np.ndarray, prediction: np.ndarray | None = None, axis: int = -2) -> np.ndarray:
    """Noise residual of one block.

    Parameters
    ----------
    block : numpy.ndarray
        2D ``(y, x)`` or 3D ``(z, y, x)`` raw data.
    prediction : numpy.ndarray, optional
        Denoised estimate of ``block`` (same shape). If given, the residual is
        ``block - prediction``.
    axis : int
        Without a prediction: axis of the high-pass. The residual is the fourth-order
        difference along ``axis`` divided by ``sqrt(70)`` (unit gain for white noise),
        which cancels signal that is cubic along that axis; it is 4 pixels shorter along
        ``axis``. Its autocorrelation along every *other* axis is that of the noise.

    Returns
    -------
    numpy.ndarray
        The residual, float64.
    """
    (b,) = as_blocks([block])
    if prediction is not None:
        p = np.asarray(prediction, dtype=np.float64)
        if p.shape != b.shape:
            raise InputError(
                f"prediction has shape {p.shape} but the data has {b.shape}; pass the "
                "prediction of exactly this block"
            )
        return b - p
    if not -b.ndim <= axis < b.ndim:
        raise ConfigError(f"axis={axis} does not exist in {b.ndim}D data; use 0..{b.ndim - 1}")
    if b.shape[axis] < 5:
        raise InputError(f"block has {b.shape[axis]} pixels along axis {axis}; at least 5 are needed")
    return np.diff(b, n=4, axis=axis) / np.sqrt(70.0)


def noise_autocorrelation(
    residuals: Sequence[np.ndarray] | np.ndarray, max_lag: int = 6
) -> np.ndarray:
    """Normalised autocorrelation of noise residuals for lags ``-max_lag..max_lag`` per axis.

    Each residual is mean-subtracted; its autocovariance is computed with zero-padded FFTs,
    summed over blocks, and divided by the number of pixel pairs at each lag (so that short
    blocks do not bias long lags towards zero), then normalised so that lag 0 is 1.

    Parameters
    ----------
    residuals : sequence of numpy.ndarray or numpy.ndarray
        Residuals of equal dimensionality (shapes may differ), each longer than
        ``max_lag`` along every axis.
    max_lag : int
        Largest lag, in pixels.

    Returns
    -------
    numpy.ndarray
        Shape ``(2 * max_lag + 1,) * ndim``; the centre (lag 0) is 1.
    """
    if max_lag < 1:
        raise ConfigError(f"max_lag={max_lag} must be at least 1 (default 6)")
    blocks = residuals if not isinstance(residuals, np.ndarray) else [residuals]
    blocks = [np.asarray(r, dtype=np.float64) for r in blocks]
    if not blocks:
        raise InputError("no residuals given; pass at least one residual array")
    ndim = blocks[0].ndim
    if any(r.ndim != ndim for r in blocks):
        raise InputError("residuals mix 2D and 3D arrays; pass residuals of one dimensionality")
    size = 2 * max_lag + 1
    total = np.zeros((size,) * ndim)
    pairs = np.zeros((size,) * ndim)
    lags = np.arange(-max_lag, max_lag + 1)
    for r in blocks:
        if min(r.shape) <= max_lag:
            raise InputError(
                f"a residual of shape {r.shape} is too short for lags up to {max_lag}; "
                "use larger blocks or a smaller max_lag"
            )
        r = r - r.mean()
        # Padding by max_lag keeps the circular correlation from wrapping into the window.
        shape = [fft.next_fast_len(n + max_lag, real=True) for n in r.shape]
        spec = fft.rfftn(r, shape)
        acov = fft.irfftn(spec * np.conj(spec), shape)
        total += acov[np.ix_(*[lags % n for n in shape])]
        pairs += functools.reduce(np.multiply, np.ix_(*[n - np.abs(lags) for n in r.shape]))
    acov = total / pairs
    centre = (max_lag,) * ndim
    if not acov[centre] > 0:
        raise InputError("the residuals are constant (zero variance); there is no noise to analyse")
    return acov / acov[centre]


def _helper_axis(k: int, ndim: int) -> int:
    """Axis of the high-pass used to measure correlation along axis ``k``.

    y is the high-pass axis for z and x, x for y: always in-plane, where sampling is fine
    enough for the difference to cancel signal.
    """
    return ndim - 1 if k == ndim - 2 else ndim - 2


def raw_noise_autocorrelation(
    blocks: Sequence[np.ndarray] | np.ndarray, max_lag: int = 6
) -> np.ndarray:
    """Noise autocorrelation window of raw blocks, without a denoised prediction.

    Along each axis the profile comes from residuals high-passed along another axis (see
    :func:`residual`; y for z and x, x for y), which is exact for noise correlated along
    that axis only and free of signal leakage. Lags that are non-zero along two or more
    axes cannot be measured this way and are NaN; pass residuals of a denoised prediction
    to :func:`noise_autocorrelation` for the full window.

    Parameters
    ----------
    blocks : sequence of numpy.ndarray or numpy.ndarray
        Raw 2D ``(y, x)`` or 3D ``(z, y, x)`` blocks.
    max_lag : int
        Largest lag, in pixels.

    Returns
    -------
    numpy.ndarray
        Shape ``(2 * max_lag + 1,) * ndim``: lag 0 is 1, the lines through lag 0 along each
        axis are measured, all other entries are NaN.
    """
    data = as_blocks(blocks, min_size=5)
    ndim = data[0].ndim
    out = np.full((2 * max_lag + 1,) * ndim, np.nan)
    for k in range(ndim):
        j = _helper_axis(k, ndim)
        acf = noise_autocorrelation([residual(b, axis=j) for b in data], max_lag)
        line = [max_lag] * ndim
        line[k] = slice(None)
        out[tuple(line)] = acf[tuple(line)]
    return out


@dataclass
class AxisCorrelation:
    """Noise correlation along one axis.

    Attributes
    ----------
    axis : str
        Axis letter (``"z"``, ``"y"`` or ``"x"``).
    correlated : bool
        Whether the lag-1 correlation reaches the threshold.
    max_lag : int
        Last lag of the unbroken run of lags ``1, 2, ...`` whose |correlation| reaches the
        threshold (0 when uncorrelated).
    extent : int
        Length, in pixels, of a correlated run: ``max_lag + 1`` (1 when uncorrelated). Noise
        made by a box of length 5 along the axis has extent 5.
    mask_length : int
        Length of a centred structN2V mask that hides every correlated neighbour on both
        sides of the blind spot: ``2 * max_lag + 1`` (odd).
    strength : float
        Lag-1 correlation (mean of lags -1 and +1).
    profile : numpy.ndarray
        Correlation at lags ``0..L`` (mean of the two signs).
    """

    axis: str
    correlated: bool
    max_lag: int
    extent: int
    mask_length: int
    strength: float
    profile: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "correlated": bool(self.correlated),
            "max_lag": int(self.max_lag),
            "extent": int(self.extent),
            "mask_length": int(self.mask_length),
            "strength": float(self.strength),
            "profile": [float(v) for v in self.profile],
        }


@dataclass
class NoiseStructure:
    """Per-axis reading of a noise autocorrelation window."""

    axes: dict[str, AxisCorrelation]
    threshold: float
    notes: list[str] = field(default_factory=list)

    @property
    def pixel_independent(self) -> bool:
        """True when no axis shows correlated noise."""
        return not any(a.correlated for a in self.axes.values())

    @property
    def correlated_axes(self) -> list[str]:
        """Letters of the correlated axes, strongest first."""
        corr = [a for a in self.axes.values() if a.correlated]
        return [a.axis for a in sorted(corr, key=lambda a: -abs(a.strength))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pixel_independent": self.pixel_independent,
            "threshold": float(self.threshold),
            "axes": {k: v.to_dict() for k, v in self.axes.items()},
            "notes": list(self.notes),
        }


def detect_structured_noise(
    acf: np.ndarray, axes: str | None = None, threshold: float = DEFAULT_THRESHOLD
) -> NoiseStructure:
    """Read, per axis, whether and how far the noise is correlated.

    Parameters
    ----------
    acf : numpy.ndarray
        Autocorrelation window from :func:`noise_autocorrelation` or
        :func:`raw_noise_autocorrelation` (odd size, lag 0 at the centre).
    axes : str, optional
        Axis letters of ``acf``'s dimensions; ``"yx"`` / ``"zyx"`` by default.
    threshold : float
        |Correlation| at which neighbouring noise counts as correlated. The estimate's own
        scatter is about ``1 / sqrt(number of pixels)``, far below the default 0.1 for a
        sample of a few 64 x 64 blocks.

    Returns
    -------
    NoiseStructure
        Per-axis :class:`AxisCorrelation`.
    """
    acf = np.asarray(acf, dtype=np.float64)
    if any(n % 2 == 0 for n in acf.shape) or len(set(acf.shape)) != 1:
        raise InputError(
            f"autocorrelation window has shape {acf.shape}; pass the equal, odd-sized window "
            "returned by noise_autocorrelation"
        )
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold={threshold} must be between 0 and 1 (default 0.1)")
    axes = _check_axes(axes, acf.ndim)
    L = acf.shape[0] // 2
    result = {}
    for k, name in enumerate(axes):
        line = [L] * acf.ndim
        line[k] = slice(None)
        p = acf[tuple(line)]
        profile = 0.5 * (p[L:] + p[L::-1])
        above = np.abs(profile[1:]) >= threshold
        # Only the unbroken run from lag 1 counts: an isolated far lag is scatter.
        run = int(np.argmin(above)) if not above.all() else L
        result[name] = AxisCorrelation(
            axis=name,
            correlated=run > 0,
            max_lag=run,
            extent=run + 1,
            mask_length=2 * run + 1,
            strength=float(profile[1]),
            profile=profile,
        )
    notes = []
    for a in result.values():
        if a.max_lag == L:
            notes.append(
                f"noise along {a.axis} is correlated up to the largest lag measured ({L}); "
                "the extent may be larger, measure with a larger max_lag"
            )
    return NoiseStructure(axes=result, threshold=threshold, notes=notes)


@dataclass
class ResidualQuality:
    """Whiteness of ``data - prediction`` and signal left in it.

    Attributes
    ----------
    lag1 : dict
        Lag-1 autocorrelation of the residual per axis letter; near 0 for a good
        prediction of pixel-independent noise; positive when structure or correlated noise
        is left in the residual.
    signal_correlation : float
        Pearson correlation between residual and prediction; far from 0 means signal
        leaked into the residual (or the prediction is biased with intensity).
    residual_mean : float
        Mean residual (0 for zero-mean noise).
    residual_std : float
        Standard deviation of the residual.
    """

    lag1: dict[str, float]
    signal_correlation: float
    residual_mean: float
    residual_std: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "lag1": {k: float(v) for k, v in self.lag1.items()},
            "signal_correlation": float(self.signal_correlation),
            "residual_mean": float(self.residual_mean),
            "residual_std": float(self.residual_std),
        }


def residual_quality(
    data: Sequence[np.ndarray] | np.ndarray,
    prediction: Sequence[np.ndarray] | np.ndarray,
    axes: str | None = None,
) -> ResidualQuality:
    """Lag-1 autocorrelation per axis of ``data - prediction`` and its correlation with the prediction.

    Parameters
    ----------
    data, prediction : numpy.ndarray or sequence of numpy.ndarray
        Raw blocks and their denoised predictions, pairwise of equal shape.
    axes : str, optional
        Axis letters; ``"yx"`` / ``"zyx"`` by default.

    Returns
    -------
    ResidualQuality
    """
    data_b = as_blocks(data, min_size=2)
    pred_b = as_blocks(prediction, min_size=2)
    if len(data_b) != len(pred_b):
        raise InputError(
            f"{len(data_b)} data blocks but {len(pred_b)} predictions; pass one prediction per block"
        )
    res = [residual(d, p) for d, p in zip(data_b, pred_b)]
    axes = _check_axes(axes, res[0].ndim)
    acf = noise_autocorrelation(res, max_lag=1)
    lag1 = {}
    for k, name in enumerate(axes):
        idx_p, idx_m = [1] * acf.ndim, [1] * acf.ndim
        idx_p[k], idx_m[k] = 2, 0
        lag1[name] = float(0.5 * (acf[tuple(idx_p)] + acf[tuple(idx_m)]))
    r_all = np.concatenate([r.ravel() for r in res])
    p_all = np.concatenate([p.ravel() for p in pred_b])
    if np.ptp(p_all) == 0 or np.ptp(r_all) == 0:
        corr = 0.0
    else:
        corr = float(stats.pearsonr(r_all, p_all).statistic)
    return ResidualQuality(
        lag1=lag1,
        signal_correlation=corr,
        residual_mean=float(r_all.mean()),
        residual_std=float(r_all.std()),
    )
