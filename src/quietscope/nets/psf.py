"""Point-spread functions: Gaussian construction, validation of measured PSFs, convolution.

A PSF here is a numpy array with one axis per spatial axis of the data (``(y, x)`` or
``(z, y, x)``), odd sizes, centred on its middle voxel, non-negative, summing to 1. Its
*support* per axis is the half-width ``(size - 1) // 2``: how far one voxel of the phantom
reaches into the blurred image, hence the extra halo of chunked prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from quietscope.errors import ConfigError

__all__ = [
    "convolve_psf",
    "gaussian_psf",
    "psf_support",
    "validate_psf",
]

#: Largest distance (voxels) of the PSF centroid from the middle voxel accepted as "centred".
#: A PSF off by ``d`` voxels shifts the deconvolved image by ``-d`` against the denoised one.
CENTRE_TOLERANCE = 0.5


def _per_axis_sigma(sigma: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    values = (float(sigma),) if np.isscalar(sigma) else tuple(float(s) for s in sigma)
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim:
        raise ConfigError(
            f"PSF sigma has {len(values)} values but the data has {ndim} spatial axes; "
            f"give one value or {ndim} (one per axis, {'zyx'[-ndim:]} order)"
        )
    if not all(math.isfinite(s) and s >= 0 for s in values):
        raise ConfigError(f"PSF sigma {values} must be finite and >= 0 (voxels); 0 means no blur along that axis")
    return values


def gaussian_psf(sigma: float | Sequence[float], ndim: int = 2, truncate: float = 4.0) -> np.ndarray:
    """Sampled Gaussian PSF, normalised to sum 1.

    Parameters
    ----------
    sigma : float or sequence of float
        Standard deviation in voxels: one value for all axes or one per spatial axis
        (``(y, x)`` or ``(z, y, x)``). 0 gives no blur along that axis.
    ndim : int
        Number of spatial axes (2 or 3).
    truncate : float
        The kernel is cut at ``ceil(truncate * sigma)`` voxels from the centre on each axis.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``2 * ceil(truncate * sigma) + 1`` per axis.

    Examples
    --------
    >>> gaussian_psf(1.0, ndim=2, truncate=2.0).shape
    (5, 5)
    >>> gaussian_psf((2.0, 0.5, 0.5), ndim=3, truncate=3.0).shape
    (13, 5, 5)
    """
    if ndim not in (2, 3):
        raise ConfigError(f"a PSF needs 2 or 3 spatial axes, not {ndim}")
    if not (math.isfinite(truncate) and truncate > 0):
        raise ConfigError(f"PSF truncate {truncate} must be a positive number (multiples of sigma)")
    sigmas = _per_axis_sigma(sigma, ndim)
    kernel = np.ones((1,) * ndim)
    for axis, s in enumerate(sigmas):
        radius = math.ceil(truncate * s)
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        profile = np.exp(-0.5 * (offsets / s) ** 2) if s > 0 else np.ones(1)
        shape = [1] * ndim
        shape[axis] = profile.size
        # A Gaussian is separable: the N-d kernel is the outer product of 1-d profiles.
        kernel = kernel * profile.reshape(shape)
    return kernel / kernel.sum()


def validate_psf(psf: ArrayLike, ndim: int) -> np.ndarray:
    """Check a PSF array (e.g. measured from beads) and return it normalised to sum 1.

    Parameters
    ----------
    psf : array_like
        The PSF, one axis per spatial axis of the data. Extra leading axes of size 1 (a 2D
        PSF saved as a one-plane stack) are dropped.
    ndim : int
        Number of spatial axes of the data.

    Returns
    -------
    numpy.ndarray
        float64 copy with the same shape, summing to 1.

    Raises
    ------
    ConfigError
        If the PSF has the wrong number of axes, an even size, negative or non-finite
        values, no positive value, or its centroid is more than
        :data:`CENTRE_TOLERANCE` voxels from its middle voxel.
    """
    try:
        arr = np.array(psf, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("the PSF is not a rectangular numeric array; give a TIFF with one PSF image or stack") from None
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim:
        raise ConfigError(
            f"the PSF has {arr.ndim} axes (shape {arr.shape}) but the data has {ndim} spatial axes; "
            f"give a {ndim}D PSF ({'zyx'[-ndim:]})"
        )
    if any(s % 2 == 0 for s in arr.shape):
        raise ConfigError(
            f"the PSF has shape {arr.shape}; every size must be odd so it has a middle voxel "
            "(crop or pad it by one voxel, keeping the peak in the middle)"
        )
    if not np.isfinite(arr).all():
        raise ConfigError("the PSF contains NaN or infinite values; replace them (e.g. by 0)")
    if (arr < 0).any():
        raise ConfigError(
            f"the PSF has negative values (min {arr.min():.3g}); subtract the background and clip it at 0"
        )
    total = arr.sum()
    if total <= 0:
        raise ConfigError("the PSF is all zeros; give a PSF image with the bead/spot in the middle")
    arr /= total
    centre = np.array([(s - 1) / 2 for s in arr.shape])
    grids = np.meshgrid(*[np.arange(s) for s in arr.shape], indexing="ij")
    centroid = np.array([(g * arr).sum() for g in grids])
    if np.abs(centroid - centre).max() > CENTRE_TOLERANCE:
        raise ConfigError(
            f"the PSF is not centred: its centroid {tuple(round(float(c), 2) for c in centroid)} is more than "
            f"{CENTRE_TOLERANCE} voxel from the middle voxel {tuple(float(c) for c in centre)}; "
            "shift or crop it around its peak"
        )
    return arr


def psf_support(psf: np.ndarray | torch.Tensor) -> tuple[int, ...]:
    """Half-width per axis of an odd-sized PSF: the distance one voxel's light reaches."""
    return tuple((int(s) - 1) // 2 for s in psf.shape)


def convolve_psf(
    z: torch.Tensor, psf: torch.Tensor, padding: Literal["valid", "reflect", "replicate"] = "reflect"
) -> torch.Tensor:
    """Convolve every channel of ``z`` ``(B, C, *spatial)`` with the same ``psf`` ``(*spatial)``.

    ``"valid"`` returns only voxels whose PSF support lies inside ``z`` (each axis shrinks
    by ``2 * support``); ``"reflect"`` / ``"replicate"`` pad ``z`` by the support first, so the
    output has ``z``'s shape. ``"reflect"`` mirrors without repeating the edge voxel
    (``scipy.ndimage`` mode ``"mirror"``) and falls back to ``"replicate"`` on axes too short
    to mirror.

    This is a true convolution (the kernel is flipped), so asymmetric PSFs blur the right way.
    """
    ndim = psf.ndim
    if z.ndim != ndim + 2:
        raise ValueError(f"expected a (B, C, *spatial) tensor with {ndim} spatial axes, got shape {tuple(z.shape)}")
    channels = z.shape[1]
    support = psf_support(psf)
    if padding != "valid":
        pad: list[int] = []
        for r in reversed(support):  # F.pad lists the last axis first
            pad += [r, r]
        mode = padding
        if mode == "reflect" and any(r >= s for r, s in zip(support, z.shape[2:])):
            mode = "replicate"
        if any(pad):
            z = F.pad(z, pad, mode=mode)
    elif any(2 * r >= s for r, s in zip(support, z.shape[2:])):
        raise ValueError(f"'valid' convolution of shape {tuple(z.shape[2:])} with PSF support {support} is empty")
    # torch's convN is a cross-correlation: flip the kernel to convolve.
    weight = torch.flip(psf.to(dtype=z.dtype, device=z.device), dims=tuple(range(ndim)))
    weight = weight.expand((channels, 1) + tuple(psf.shape)).contiguous()
    conv = F.conv2d if ndim == 2 else F.conv3d
    return conv(z, weight, groups=channels)
