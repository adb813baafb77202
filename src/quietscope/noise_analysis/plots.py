"""PNG figures of the noise analysis (matplotlib, Agg canvas: no display needed).

Figures are built on :class:`matplotlib.figure.Figure` directly rather than through
``pyplot``, so plotting never touches global state or an interactive backend and is safe
from worker threads.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quietscope.errors import InputError, OutputError
from quietscope.noise_analysis.correlation import _check_axes
from quietscope.noise_analysis.poisson_gaussian import PoissonGaussianEstimate

#: Diverging map for correlations; unmeasured lags (NaN) in light grey.
_CMAP = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"folder {path.parent} does not exist; create it or choose another path")
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_mean_variance(estimate: PoissonGaussianEstimate, path: str | Path) -> Path:
    """Binned noise variance against local mean, with the fitted line.

    Parameters
    ----------
    estimate : PoissonGaussianEstimate
        Result of :func:`~quietscope.noise_analysis.poisson_gaussian.estimate_poisson_gaussian`.
    path : str or pathlib.Path
        Output PNG file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    m, v, n = estimate.bins_mean, estimate.bins_var, estimate.bins_count
    # Marker area grows with the bin's pixel count: big points carry the fit.
    sizes = 15 + 85 * np.sqrt(n / max(n.max(), 1))
    ax.scatter(m, v, s=sizes, alpha=0.7, label="intensity bins")
    xs = np.linspace(min(m.min(), estimate.offset), m.max(), 100)
    ax.plot(
        xs,
        estimate.variance(xs),
        color="C3",
        label=(
            f"gain {estimate.gain:.3g}, read noise {estimate.read_noise_sigma:.3g}, "
            f"r² {estimate.r2:.3f}"
        ),
    )
    ax.axvline(estimate.offset, color="0.5", linestyle=":", label=f"offset {estimate.offset:.4g}")
    ax.set_xlabel("local mean (ADU)")
    ax.set_ylabel("noise variance (ADU²)")
    ax.set_title("Mean–variance (Poisson–Gaussian fit)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_autocorrelation(acf: np.ndarray, axes: str | None, path: str | Path) -> Path:
    """Heat map of the noise autocorrelation around lag 0.

    2D windows give one panel; 3D windows give the three central planes (``yx`` at z-lag 0,
    ``zx`` at y-lag 0, ``zy`` at x-lag 0). Unmeasured lags (NaN) are grey. The colour
    scale is symmetric and set by the largest correlation away from lag 0, so that weak
    correlations are visible; lag 0 (always 1) is off the scale.

    Parameters
    ----------
    acf : numpy.ndarray
        Odd-sized window with lag 0 at the centre.
    axes : str or None
        Axis letters of ``acf`` (``"yx"`` / ``"zyx"`` when None).
    path : str or pathlib.Path
        Output PNG file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    acf = np.asarray(acf, dtype=float)
    if acf.ndim not in (2, 3) or any(s % 2 == 0 for s in acf.shape):
        raise InputError(
            f"autocorrelation window has shape {acf.shape}; pass the odd-sized 2D or 3D window "
            "from noise_autocorrelation"
        )
    axes = _check_axes(axes, acf.ndim)
    c = tuple(s // 2 for s in acf.shape)
    if acf.ndim == 2:
        planes = [(acf, axes)]
    else:
        planes = [
            (acf[c[0]], axes[1] + axes[2]),
            (acf[:, c[1]], axes[0] + axes[2]),
            (acf[:, :, c[2]], axes[0] + axes[1]),
        ]
    off = acf.copy()
    off[c] = np.nan
    lim = max(float(np.nanmax(np.abs(off))) if np.isfinite(off).any() else 0.0, 0.1)
    fig = Figure(figsize=(4.2 * len(planes), 4.0))
    for i, (img, names) in enumerate(planes):
        ax = fig.add_subplot(1, len(planes), i + 1)
        ry, rx = img.shape[0] // 2, img.shape[1] // 2
        im = ax.imshow(
            np.ma.masked_invalid(img),
            cmap=_CMAP,
            vmin=-lim,
            vmax=lim,
            extent=(-rx - 0.5, rx + 0.5, ry + 0.5, -ry - 0.5),
            interpolation="nearest",
        )
        ax.set_xlabel(f"lag along {names[1]} (pixels)")
        ax.set_ylabel(f"lag along {names[0]} (pixels)")
        ax.set_title(f"{names} plane")
        fig.colorbar(im, ax=ax, shrink=0.8, label="correlation")
    fig.suptitle("Noise autocorrelation (lag 0 = 1, off scale)")
    fig.tight_layout()
    return _save(fig, path)
