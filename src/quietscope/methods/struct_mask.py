"""structN2V masks (Broaddus et al. 2020, *Removing structured noise with self-supervised
blind-spot networks*).

When the noise of neighbouring pixels is correlated along an axis, a blind-spot network
can predict a masked pixel's noise from its correlated neighbours. structN2V therefore
hides a whole line segment around each blind spot: the pixels under a small centred
boolean kernel are replaced by random values, so that they carry no information about
the noise at the centre.

Replacement values follow structN2V and CAREamics: uniform random values over the value
range of the patch (per sample and channel); the blind spot itself is left to the N2V
replacement, and kernel pixels that fall outside the patch are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from quietscope.errors import ConfigError, InputError

_SPEC = re.compile(r"^\s*([a-zA-Z])\s*:\s*([+-]?\d+)\s*$")


def struct_mask(ndim: int, axis: int, length: int) -> np.ndarray:
    """Centred line kernel: ``length`` pixels along ``axis``, the blind spot in the middle.

    Parameters
    ----------
    ndim : int
        Number of spatial dimensions (2 or 3).
    axis : int
        Spatial axis of the line (``0..ndim-1``; negative counts from the end).
    length : int
        Number of pixels along the axis, blind spot included; odd, so the line is centred.

    Returns
    -------
    numpy.ndarray
        Boolean kernel, ``length`` along ``axis`` and 1 along the other axes, all True.

    Raises
    ------
    ConfigError
        If ``ndim``, ``axis`` or ``length`` is invalid.
    """
    if ndim not in (2, 3):
        raise ConfigError(f"struct mask for {ndim}D data is not supported; use 2 or 3 dimensions")
    if not -ndim <= axis < ndim:
        raise ConfigError(
            f"struct mask axis {axis} does not exist in {ndim}D data; use 0..{ndim - 1}"
        )
    _check_length(length)
    shape = [1] * ndim
    shape[axis] = length
    return np.ones(shape, dtype=bool)


def _check_length(length: int) -> None:
    if length < 1:
        raise ConfigError(
            f"struct mask length {length} must be a positive odd number of pixels, e.g. 5"
        )
    if length % 2 == 0:
        raise ConfigError(
            f"struct mask length {length} is even, so it cannot be centred on the blind spot; "
            f"use {length + 1}"
        )


def parse_struct_mask(text: str, axes: str = "yx") -> tuple[int, int]:
    """Parse ``"AXIS:LENGTH"`` (e.g. ``"x:5"``) into ``(axis_index, length)``.

    Parameters
    ----------
    text : str
        Axis letter, colon, odd positive length. Case and spaces do not matter.
    axes : str
        Spatial axis letters of the data, e.g. ``"yx"`` or ``"zyx"``.

    Returns
    -------
    tuple of int
        Index of the axis within ``axes`` and the mask length.

    Raises
    ------
    ConfigError
        If the text is malformed, names an axis not in ``axes``, or the length is not a
        positive odd number.
    """
    match = _SPEC.match(str(text))
    if match is None:
        raise ConfigError(
            f"struct mask {text!r} is not AXIS:LENGTH; write e.g. 'x:5' (axis letter, colon, odd length)"
        )
    letter, length = match.group(1).lower(), int(match.group(2))
    axes = axes.lower()
    if letter not in axes:
        raise ConfigError(
            f"struct mask axis {letter!r} is not an axis of the data; use one of {', '.join(axes)}"
        )
    _check_length(length)
    return axes.index(letter), length


def load_struct_mask(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Load a structN2V kernel from a small ``.npy`` or ``.tif`` file of 0/1 values.

    Parameters
    ----------
    path : str or pathlib.Path
        File holding the kernel; every size must be odd so its middle pixel is the blind spot.
    ndim : int, optional
        Number of spatial dimensions of the data; the kernel must have as many.

    Returns
    -------
    numpy.ndarray
        Boolean kernel.

    Raises
    ------
    InputError
        If the file is missing, unreadable, or does not hold a valid kernel.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"struct mask file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            # No pickles: a mask file must not be able to run code.
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            raise InputError(
                f"struct mask file {path} is neither .npy nor .tif; save the kernel as one of them"
            )
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cannot read struct mask file {path} ({exc}); save it with numpy.save or tifffile"
        ) from None
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise InputError(
            f"struct mask in {path} has {arr.ndim} dimensions; save a 2D (y, x) or 3D (z, y, x) kernel"
        )
    if ndim is not None and arr.ndim != ndim:
        raise InputError(
            f"struct mask in {path} is {arr.ndim}D but the data is {ndim}D; save a {ndim}D kernel"
        )
    if any(s % 2 == 0 for s in arr.shape):
        raise InputError(
            f"struct mask in {path} has shape {arr.shape}; every size must be odd so that the "
            "kernel is centred on the blind spot (pad it by one row/column of zeros)"
        )
    if arr.dtype == bool:
        mask = arr
    else:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1))):
            raise InputError(
                f"struct mask in {path} holds values other than 0 and 1; save a boolean kernel"
            )
        mask = arr.astype(bool)
    if not mask.any():
        raise InputError(f"struct mask in {path} is all zeros; set the pixels to hide to 1")
    return mask


def apply_struct_mask(
    patch: torch.Tensor,
    coords: torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    generator: torch.Generator | None = None,
    include_center: bool = False,
) -> torch.Tensor:
    """Hide the pixels under ``mask`` around each blind spot behind random values.

    For each coordinate, the mask is centred on it; the covered pixels inside the patch
    (the centre only if ``include_center``) get values drawn uniformly from
    ``[min, max]`` of their own sample and channel, independently per pixel and channel.
    All channels are masked at the same positions.

    Parameters
    ----------
    patch : torch.Tensor
        Batch ``(B, C, *spatial)``, 2 or 3 spatial dimensions. Not modified.
    coords : torch.Tensor
        Integer ``(N, 1 + ndim)``: batch index followed by the spatial position of each
        blind spot.
    mask : numpy.ndarray or torch.Tensor
        Boolean kernel with odd sizes and ``ndim`` dimensions (:func:`struct_mask`).
    generator : torch.Generator, optional
        Source of the random values (on the patch's device).
    include_center : bool
        Also replace the blind spot. False by default, as in structN2V: the blind spot
        gets the N2V replacement instead.

    Returns
    -------
    torch.Tensor
        A masked copy of ``patch``.
    """
    ndim = patch.ndim - 2
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    kern = torch.as_tensor(np.asarray(mask, dtype=bool))
    if kern.ndim != ndim or any(s % 2 == 0 for s in kern.shape):
        raise ConfigError(
            f"struct mask of shape {tuple(kern.shape)} does not fit {ndim}D patches; "
            f"use an odd-sized {ndim}D kernel"
        )
    coords = torch.as_tensor(coords, dtype=torch.long, device=patch.device)
    if coords.ndim != 2 or coords.shape[1] != ndim + 1:
        raise ValueError(
            f"coords must have shape (N, {ndim + 1}) (batch index, position); "
            f"got {tuple(coords.shape)}"
        )
    out = patch.clone()
    if coords.shape[0] == 0:
        return out
    centre = torch.tensor(kern.shape) // 2
    offsets = torch.nonzero(kern) - centre
    if not include_center:
        offsets = offsets[(offsets != 0).any(dim=1)]
    if offsets.shape[0] == 0:
        return out
    offsets = offsets.to(patch.device)
    # Every (blind spot, kernel offset) pair; the batch column gets offset 0.
    pos = coords[:, None, 1:] + offsets[None, :, :]
    batch = coords[:, None, 0].expand(-1, offsets.shape[0])
    pos, batch = pos.reshape(-1, ndim), batch.reshape(-1)
    spatial = torch.tensor(patch.shape[2:], device=patch.device)
    inside = ((pos >= 0) & (pos < spatial)).all(dim=1)
    pos, batch = pos[inside], batch[inside]
    flat = patch.flatten(2)
    lo, hi = flat.amin(dim=2), flat.amax(dim=2)  # (B, C)
    u = torch.rand(
        (pos.shape[0], patch.shape[1]), generator=generator, device=patch.device, dtype=patch.dtype
    )
    values = lo[batch] + u * (hi - lo)[batch]  # (M, C)
    index = (batch[:, None], torch.arange(patch.shape[1], device=patch.device)[None, :]) + tuple(
        pos[:, a, None] for a in range(ndim)
    )
    out[index] = values
    return out
