"""Pure shape arithmetic for chunked prediction: blocks, halos, read windows, trims.

No torch, no dask, no I/O: every function takes and returns plain integers/tuples so the
logic that decides *where* pixels come from is unit-testable in milliseconds.

Why chunked prediction equals whole-image prediction
----------------------------------------------------
Whole-image prediction pads the image by ``halo`` voxels on every side (numpy ``reflect``),
pads further so the tile ends on a multiple of the network's down-sampling factor ``f``,
predicts and crops. A block reads ``[start - halo, stop + halo)`` widened outward to
multiples of ``f`` (so its pooling grid coincides with the whole image's, which starts at
``-halo``, itself a multiple of ``f``), fetching coordinates outside the volume by the same
reflection. Every output voxel then sees exactly the same input over its receptive field in
both paths, provided ``halo`` covers the receptive-field radius.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

Shape = tuple[int, ...]
#: A network's down-sampling factor: one int for all axes, or one per spatial axis (a 3D U-Net
#: that does not pool along an anisotropic z has ``(1, 4, 4)``).
Factor = int | tuple[int, ...]


@dataclass(frozen=True)
class Block:
    """One unit of work: the output region ``[start, stop)`` (spatial axes only)."""

    index: tuple[int, ...]
    start: Shape
    stop: Shape

    @property
    def shape(self) -> Shape:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def key(self) -> str:
        """Stable name used by the resume ledger."""
        return "_".join(str(i) for i in self.index)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def per_axis(factor: Factor, ndim: int) -> Shape:
    """``factor`` as one positive int per axis (an int applies to every axis)."""
    f = (int(factor),) * ndim if isinstance(factor, (int, np.integer)) else tuple(int(v) for v in factor)
    if len(f) != ndim or any(v < 1 for v in f):
        raise ValueError(f"down-sampling factor {factor} does not fit {ndim} axes")
    return f


def halo_from_radius(radius: tuple[int, ...], factor: Factor) -> Shape:
    """Halo per axis: the receptive-field radius rounded up to the down-sampling factor."""
    f = per_axis(factor, len(radius))
    return tuple(round_up(max(int(r), 0), k) for r, k in zip(radius, f))


def choose_block_shape(
    shape: Shape,
    chunks: Shape,
    halo: Shape,
    max_voxels: int,
    target_halo_factor: float = 1.2,
    pow2_axes: Sequence[int] = (),
) -> Shape:
    """Choose a block shape: a multiple of ``chunks`` per axis, at most ``max_voxels`` with
    halo, growing the axis that reduces the halo overhead most until the overhead is below
    ``target_halo_factor`` or the block covers the volume.

    Blocks spanning several chunks amortise the halo (halo factor ``prod(b + 2h) / prod(b)``);
    memory bounds them from above. Along ``pow2_axes`` the number of chunks per block is a
    power of two (or the whole axis): a block of ``2^k`` chunks can write pyramid level ``k``
    of its own region as it finishes (``io.writing.block_local_levels``), so viewers see coarse
    levels fill in during the run instead of at its end.
    """
    ndim = len(shape)
    n = [1] * ndim  # chunks per block along each axis
    n_max = [max(1, -(-s // c)) for s, c in zip(shape, chunks)]

    def block(nn: list[int]) -> Shape:
        return tuple(min(k * c, s) for k, c, s in zip(nn, chunks, shape))

    def cost(nn: list[int]) -> int:
        return math.prod(b + 2 * h for b, h in zip(block(nn), halo))

    while True:
        current = block(n)
        if halo_factor(current, halo) <= target_halo_factor:
            break
        best, best_factor = None, halo_factor(current, halo)
        for ax in range(ndim):
            if n[ax] >= n_max[ax]:
                continue
            trial = list(n)
            trial[ax] = min(2 * n[ax], n_max[ax]) if ax in pow2_axes else n[ax] + 1
            if cost(trial) > max_voxels:
                continue
            f = halo_factor(block(trial), halo)
            if f < best_factor - 1e-12:
                best, best_factor = trial, f
        if best is None:
            break
        n = best
    return tuple(k * c for k, c in zip(n, chunks))


def halo_factor(block: Shape, halo: Shape) -> float:
    """Voxels computed per voxel written for one block."""
    return math.prod(b + 2 * h for b, h in zip(block, halo)) / math.prod(block)


def count_blocks(shape: Shape, block: Shape) -> int:
    """Number of blocks :func:`iter_blocks` yields (without generating them)."""
    return math.prod(-(-s // b) for s, b in zip(shape, block))


def iter_blocks(shape: Shape, block: Shape) -> Iterator[Block]:
    """Tile ``shape`` with blocks of shape ``block`` (the last ones clipped to the volume),
    one at a time in C order: a 10^6-block plan never sits in a list."""
    if len(shape) != len(block):
        raise ValueError(f"shape {shape} and block {block} differ in length")
    counts = [-(-s // b) for s, b in zip(shape, block)]
    for idx in product(*(range(c) for c in counts)):
        start = tuple(i * b for i, b in zip(idx, block))
        stop = tuple(min(a + b, s) for a, b, s in zip(start, block, shape))
        yield Block(tuple(idx), start, stop)


def plan_blocks(shape: Shape, block: Shape) -> list[Block]:
    """All blocks of :func:`iter_blocks` as a list (for small plans and tests)."""
    return list(iter_blocks(shape, block))


def read_window(start: Shape, stop: Shape, halo: Shape, factor: Factor) -> tuple[Shape, Shape]:
    """Region to read (may extend beyond the volume) for the output region ``[start, stop)``.

    Along each axis the window starts on a multiple of that axis's ``factor`` and has a length
    that is a multiple of it, so the network's pooling grid is the same as in whole-image
    prediction.
    """
    f = per_axis(factor, len(start))
    rstart = tuple(((a - h) // k) * k for a, h, k in zip(start, halo, f))
    rstop = tuple(round_up(b + h, k) for b, h, k in zip(stop, halo, f))
    return rstart, rstop


def whole_window(shape: Shape, halo: Shape, factor: Factor) -> tuple[Shape, Shape]:
    """The read window of whole-image prediction (the reference the blocks must reproduce)."""
    return read_window((0,) * len(shape), shape, halo, factor)


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices for coordinates ``start..stop-1`` of an axis of length ``n``.

    Matches ``numpy.pad(mode="reflect")`` for any pad width (repeated reflection, edge
    voxel not repeated), so a block near the border reads exactly what whole-image
    padding would have produced.
    """
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def trim_slices(start: Shape, stop: Shape, rstart: Shape) -> tuple[slice, ...]:
    """Slices that cut the output region out of a prediction of the read window."""
    return tuple(slice(a - r, b - r) for a, b, r in zip(start, stop, rstart))


def axes_layout(out_axes: str, spatial_axes: str, spatial_values: Sequence[int], t: int = 1, c: int = 1) -> Shape:
    """Lay per-spatial-axis values out over an image's axes, filling in ``t`` and ``c``.

    Parameters
    ----------
    out_axes : str
        The target axes, e.g. ``"tczyx"`` or ``"cyx"``.
    spatial_axes : str
        The axes ``spatial_values`` are given for, e.g. ``"zyx"``.
    spatial_values : sequence of int
        One value per spatial axis (a shape, chunks, a block...).
    t, c : int
        The value for the time and channel axes.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> axes_layout("tcyx", "yx", (256, 128), t=1, c=2)
    (1, 2, 256, 128)
    """
    return tuple(t if a == "t" else c if a == "c" else int(spatial_values[spatial_axes.index(a)]) for a in out_axes)
