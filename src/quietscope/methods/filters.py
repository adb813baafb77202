"""Classic denoising filters (box, Gaussian, median) run through the chunked prediction path
(driven by :mod:`quietscope.workflows.filter`).

Filters are "methods without training": they need no model file, so they do not enter the
``--method`` registry of trainable :class:`~quietscope.methods.base.Method` classes. They do
share everything else with the trained methods — block plan, halo, runner, resume ledger,
multiscale OME-Zarr output — through :func:`quietscope.chunked.run_prediction`, and serve as
the baselines of ``benchmarks/quality.py``.

Boundary handling: the prediction path pads at the volume border like ``numpy.pad(mode=
'reflect')`` (the edge voxel is not repeated), which is scipy.ndimage's ``mode="mirror"``.
Inside the volume a block's halo holds real neighbours, so with the halo equal to the filter
radius, chunked filtering equals filtering the whole array with ``mode="mirror"``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from quietscope.errors import ConfigError

log = logging.getLogger(__name__)

FILTER_KINDS = ("box", "box3d", "gaussian", "median")

#: Gaussian kernels are cut at ``truncate`` sigmas (scipy's default is 4.0; the halo follows it).
DEFAULT_TRUNCATE = 4.0


def filter_sizes(kind: str, spatial_ndim: int, size: int | None = None, sigma: float | None = None,
                 truncate: float = DEFAULT_TRUNCATE) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate filter parameters; return ``(footprint size per axis, sigma per axis)``.

    ``box`` and ``median`` are 2D in-plane filters applied per z-plane of 3D data (size 1 along
    z), since axial sampling is usually coarser; ``box3d`` filters all spatial axes; ``gaussian``
    uses ``sigma`` on the in-plane axes only for 3D data, for the same reason.

    Parameters
    ----------
    kind : {"box", "box3d", "gaussian", "median"}
    spatial_ndim : int
        2 or 3.
    size : int, optional
        Odd footprint edge for box/box3d/median.
    sigma : float, optional
        Gaussian std in voxels.
    truncate : float, optional
        Gaussian cut-off in sigmas.

    Returns
    -------
    sizes, sigmas : tuple
        One entry per spatial axis (``sizes`` is all ones for ``gaussian``, ``sigmas`` all
        zeros for the others).
    """
    if kind not in FILTER_KINDS:
        raise ConfigError(f"unknown filter kind {kind!r}; choose one of: {', '.join(FILTER_KINDS)}")
    if spatial_ndim not in (2, 3):
        raise ConfigError(f"filters need 2 or 3 spatial axes, got {spatial_ndim}")
    if kind == "gaussian":
        if sigma is None or not sigma > 0 or size is not None:
            raise ConfigError("the gaussian filter needs --sigma S > 0 (and no --size)")
        if not truncate > 0:
            raise ConfigError(f"truncate={truncate} is invalid; use a value > 0 (scipy's default is 4)")
        sig = (0.0,) * (spatial_ndim - 2) + (float(sigma),) * 2
        return (1,) * spatial_ndim, sig
    if size is None or sigma is not None:
        raise ConfigError(f"the {kind} filter needs --size N (an odd integer >= 1) and no --sigma")
    if int(size) != size or size < 1 or size % 2 == 0:
        raise ConfigError(f"--size {size} is invalid; use an odd integer >= 1 so the filter is centred")
    size = int(size)
    if kind == "box3d":
        sizes = (size,) * spatial_ndim
    else:
        sizes = (1,) * (spatial_ndim - 2) + (size, size)
    return sizes, (0.0,) * spatial_ndim


def filter_radius(kind: str, sizes: tuple[int, ...], sigmas: tuple[float, ...],
                  truncate: float = DEFAULT_TRUNCATE) -> tuple[int, ...]:
    """Voxels each output depends on beyond itself, per axis (= the halo a block needs)."""
    if kind == "gaussian":
        # scipy's kernel radius is int(truncate * sigma + 0.5); ceil is never smaller.
        return tuple(int(math.ceil(truncate * s)) if s > 0 else 0 for s in sigmas)
    return tuple(s // 2 for s in sizes)


def apply_filter(tile: np.ndarray, kind: str, sizes: tuple[int, ...], sigmas: tuple[float, ...],
                 truncate: float = DEFAULT_TRUNCATE) -> np.ndarray:
    """Filter a ``(C, *spatial)`` array per channel; float32 out, same shape.

    ``mode="mirror"`` matches the reflect padding of the prediction path at the volume border.
    """
    tile = np.asarray(tile, dtype=np.float32)
    out = np.empty_like(tile)
    for c in range(tile.shape[0]):
        # float64 accumulation keeps box/gaussian sums independent of the tile's extent.
        ch = tile[c].astype(np.float64)
        if kind in ("box", "box3d"):
            res = ndi.uniform_filter(ch, size=sizes, mode="mirror")
        elif kind == "gaussian":
            res = ndi.gaussian_filter(ch, sigma=sigmas, mode="mirror", truncate=truncate)
        elif kind == "median":
            res = ndi.median_filter(tile[c], size=sizes, mode="mirror")
        else:
            raise ConfigError(f"unknown filter kind {kind!r}; choose one of: {', '.join(FILTER_KINDS)}")
        out[c] = res
    return out


@dataclass(frozen=True)
class FilterProcessor:
    """Picklable processor factory for :func:`quietscope.chunked.run_prediction`."""

    kind: str
    sizes: tuple[int, ...]
    sigmas: tuple[float, ...]
    truncate: float = DEFAULT_TRUNCATE

    @property
    def token(self) -> str:
        text = f"filter:{self.kind}:{self.sizes}:{self.sigmas}:{self.truncate}"
        return "filter-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def halo(self) -> tuple[int, ...]:
        return filter_radius(self.kind, self.sizes, self.sigmas, self.truncate)

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        kind, sizes, sigmas, truncate = self.kind, self.sizes, self.sigmas, self.truncate
        return lambda tile: apply_filter(tile, kind, sizes, sigmas, truncate)


def filter_processor(kind: str, spatial_ndim: int, size: int | None = None, sigma: float | None = None,
                     truncate: float = DEFAULT_TRUNCATE) -> FilterProcessor:
    """Build the validated processor for one filter."""
    sizes, sigmas = filter_sizes(kind, spatial_ndim, size, sigma, truncate)
    return FilterProcessor(kind, sizes, sigmas, float(truncate))


def filter_array(array: np.ndarray, kind: str, size: int | None = None, sigma: float | None = None,
                 truncate: float = DEFAULT_TRUNCATE) -> np.ndarray:
    """Filter an in-memory 2D/3D image (spatial axes only) exactly as :func:`filter_image` does."""
    a = np.asarray(array)
    proc = filter_processor(kind, a.ndim, size, sigma, truncate)
    return proc.build()(a[None])[0]
