"""Lateral contextualisation (μSplit, Ashesh et al. ICCV 2023): the same field at coarser scales.

A network that sees only a 64² patch cannot tell a nucleus from a bright patch of actin; μSplit
feeds, beside the patch, the field around it at 2×, 4×, ... coarser resolution, each
centre-cropped to the patch size ``P``: context ``k`` (``k = 1 .. K``) is the ``2**k · P`` wide
field centred on the patch, average-pooled by ``2**k`` to ``P`` pixels per axis.

The construction is written for any tile, not just a training patch, so that prediction stays
fully convolutional: around an inner region of size ``T``, context ``k`` needs a margin
``M_k = (2**k - 1) · P / 2`` on each side and has ``(T + 2 M_k) / 2**k`` pixels per axis (``P``
when ``T = P``). Training reads the margins from the image (the sampled field is ``2**K · P``);
prediction reflect-pads the tile, so inside an image the context is real data and only its
border, which the measured halo trims, sees mirrored pixels.

Pure functions on tensors ``(B, C, *spatial)``; 2D and 3D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def context_margins(patch: int, levels: int) -> list[int]:
    """Margin ``M_k = (2**k - 1) · patch / 2`` each context ``k = 1 .. levels`` needs per side.

    Raises
    ------
    ValueError
        When ``patch`` is not a multiple of ``2**(levels + 1)`` (margins and pooled sizes would
        not be whole pixels).
    """
    if levels and patch % 2 ** (levels + 1):
        raise ValueError(f"patch {patch} must be a multiple of {2 ** (levels + 1)} for {levels} context level(s)")
    return [(2**k - 1) * patch // 2 for k in range(1, levels + 1)]


def field_size(patch: int, levels: int) -> int:
    """Side of the field a training sample must cover: ``2**levels · patch``."""
    return patch * 2**levels


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad every spatial axis of ``x`` by ``pad`` on both sides, for any ``pad``.

    ``torch.nn.functional.pad(mode="reflect")`` needs ``pad < size``; larger pads (a thin probe
    tile, a margin wider than the tile) are done in steps, which equals numpy's periodic
    ``mode="reflect"`` extension.
    """
    nd = x.ndim - 2
    for axis in range(2, 2 + nd):
        left = right = pad
        while left > 0 or right > 0:
            n = x.shape[axis]
            step_l, step_r = min(left, n - 1), min(right, n - 1)
            if n == 1:  # a single pixel reflects to itself
                x = torch.cat([x] * (left + 1 + right), dim=axis)
                break
            spec = [0, 0] * nd
            spec[2 * (x.ndim - 1 - axis)] = step_l
            spec[2 * (x.ndim - 1 - axis) + 1] = step_r
            x = F.pad(x, spec, mode="reflect")
            left, right = left - step_l, right - step_r
    return x


def centre_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Central ``size`` region of the spatial axes of ``x`` (``(x - size) // 2`` cut in front)."""
    idx = [slice(None), slice(None)]
    for n, s in zip(x.shape[2:], size):
        if s > n:
            raise ValueError(f"cannot crop {tuple(x.shape[2:])} to {tuple(size)}")
        a = (n - s) // 2
        idx.append(slice(a, a + s))
    return x[tuple(idx)]


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return (F.avg_pool2d if x.ndim == 4 else F.avg_pool3d)(x, 2**k)


def contexts_from_field(field: torch.Tensor, inner: tuple[int, ...], patch: int, levels: int) -> list[torch.Tensor]:
    """Context inputs ``1 .. levels`` of the ``inner`` region at the centre of ``field``.

    ``field`` must reach at least ``M_levels`` beyond ``inner`` on every side; context ``k`` is
    the central ``inner + 2 M_k`` of it, average-pooled by ``2**k``.
    """
    out = []
    for k, m in enumerate(context_margins(patch, levels), start=1):
        out.append(_pool(centre_crop(field, tuple(s + 2 * m for s in inner)), k))
    return out


def contexts_by_reflection(x: torch.Tensor, patch: int, levels: int) -> list[torch.Tensor]:
    """Context inputs of a whole tile ``x``: its surroundings are its reflection (prediction)."""
    if not levels:
        return []
    m = context_margins(patch, levels)[-1]
    return contexts_from_field(reflect_pad(x, m), tuple(x.shape[2:]), patch, levels)
