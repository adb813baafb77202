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
from collections.abc import Callable, Iterator, Sequence
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


# ---- blocks sized by memory ----------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"`` -> ``2_000_000_000``; ``"1.5GiB"``, ``"800M"`` and plain numbers (bytes) too.

    Examples
    --------
    >>> parse_bytes("2GB"), parse_bytes("512MiB"), parse_bytes(1000)
    (2000000000, 536870912, 1000)
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise ValueError(f"{text!r} is not a memory size; write e.g. 2GB, 1.5GiB or 800MB")
        value = float(num) * _UNITS[unit]
    if not value > 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


#: Slab rule of the streamed U-Net pass (:mod:`quietscope.nets.streamed`): slabs of this many
#: planes along the first spatial axis ...
SLAB_MIN_PLANES = 8
#: ... or more, so a slab holds at least this many voxels: oneDNN runs thin, small convolutions
#: several times slower per voxel (measured: 8-row slabs of a 256² 2D tile 8x slower than the
#: whole pass, 4-plane slabs of a 64x96² 3D tile 3.6x slower; 8 planes of 128² as fast as whole).
SLAB_MIN_VOXELS = 2**17
#: Planes of context a slab reads beyond its own on each side (two 3-wide convolutions).
SLAB_HALO = 2


def slab_extent(shape: Shape) -> int | None:
    """Planes per slab of the streamed pass over a tile of spatial ``shape``; None: whole pass.

    A streamed pass holds a fixed number of planes per level whatever the tile's depth, so the
    slab does not grow with the tile: thicker slabs only cost memory (about 1.4 kB per pixel of
    a plane and slab plane, 32-filter 3D U-Net).

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the tile the net sees (first axis: z in 3D, y in 2D).

    Returns
    -------
    int or None
        Slab thickness along the first axis, or None where the tile is too thin or too small
        to cut in at least two slabs.

    Examples
    --------
    >>> slab_extent((128, 256, 256)), slab_extent((64, 96, 96)), slab_extent((256, 256))
    (8, 15, None)
    """
    n, plane = shape[0], math.prod(shape[1:])
    step = max(SLAB_MIN_PLANES, math.ceil(SLAB_MIN_VOXELS / plane))
    return step if 2 * step <= n else None


@dataclass(frozen=True)
class MemoryProfile:
    """Peak bytes of one block task: the net on one sub-tile plus the block's own buffers.

    The net's activations on a sub-tile window are ``net_bytes_per_voxel`` per window voxel; for a
    net streamed in slabs (:func:`slab_extent` not None) they are ``net_bytes_per_voxel`` per voxel
    (what stays whole: the tile's input and output) plus ``slab_bytes_per_voxel`` per voxel of one
    slab (the rolling buffers of every level and a slab's working set: a fixed number of planes
    whatever the window's depth, measured at :data:`SLAB_MIN_PLANES` and taken to grow in
    proportion with thicker slabs, which over-states it: part of it is the receptive field's
    planes); and ``whole_bytes_per_voxel`` per voxel where the window is run whole. Plus
    ``fixed_bytes`` (weights, workspaces), plus ``io_bytes_per_voxel`` times the block's
    read-window voxels (input, its float32 copy, the assembled prediction, the cast output).
    """

    net_bytes_per_voxel: float
    io_bytes_per_voxel: float = 16.0
    fixed_bytes: float = 0.0
    slab_bytes_per_voxel: float = 0.0
    whole_bytes_per_voxel: float | None = None

    def net_bytes(self, window: Shape) -> float:
        voxels = math.prod(window)
        if self.whole_bytes_per_voxel is None:
            return self.fixed_bytes + self.net_bytes_per_voxel * voxels
        step = slab_extent(window)
        if step is None:
            return self.fixed_bytes + self.whole_bytes_per_voxel * voxels
        slab = step * voxels // window[0]
        return self.fixed_bytes + self.net_bytes_per_voxel * voxels + self.slab_bytes_per_voxel * slab

    def task_bytes(self, block_window: Shape, tile_window: Shape) -> float:
        """Predicted peak of one task predicting a block window in sub-tiles of ``tile_window``."""
        return self.net_bytes(tile_window) + self.io_bytes_per_voxel * math.prod(block_window)


def subtile_cuts(length: int, halo: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Sub-tiles along one axis of a window of ``length``: ``(out_start, out_stop, read_start, read_stop)``.

    The window's outer ``halo`` voxels are context only, so the cuts fall at ``halo + k * tile``
    and each sub-tile reads ``halo`` more on each side, clipped to the window: where a sub-tile
    meets the window's edge the net sees that edge exactly as the whole window would, so every
    output voxel equals the whole-window prediction. With ``halo`` and ``tile`` multiples of the
    down-sampling factor (and ``length`` too), every read starts on the window's pooling grid.
    """
    if length <= tile + 2 * halo:
        return [(0, length, 0, length)]
    cuts = [0] + list(range(halo + tile, length - halo, tile)) + [length]
    return [(a, b, max(0, a - halo), min(length, b + halo)) for a, b in zip(cuts[:-1], cuts[1:])]


def iter_subtiles(window: Shape, halo: Shape, tile: Shape) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """The sub-tile grid of a window: ``(read, out, crop)`` slices per sub-tile.

    ``read`` cuts the sub-tile's input out of the window, ``out`` is where its result goes in the
    window, ``crop`` cuts that result out of the sub-tile's prediction.
    """
    per_axis_cuts = [subtile_cuts(n, h, t) for n, h, t in zip(window, halo, tile)]
    for combo in product(*per_axis_cuts):
        read = tuple(slice(r0, r1) for _, _, r0, r1 in combo)
        out = tuple(slice(a, b) for a, b, _, _ in combo)
        crop = tuple(slice(a - r0, b - r0) for a, b, r0, _ in combo)
        yield read, out, crop


def subtile_voxels(window: Shape, halo: Shape, tile: Shape) -> int:
    """Voxels the net computes for one window predicted in sub-tiles (separable per axis)."""
    return math.prod(sum(r1 - r0 for *_, r0, r1 in subtile_cuts(n, h, t)) for n, h, t in zip(window, halo, tile))


def _axis_compute(size: int, block: int, halo: int, f: int, tile: int) -> int:
    """Voxels computed along one axis over all blocks of that axis (sub-tiles included)."""
    total = 0
    for start in range(0, size, block):
        (rs,), (re,) = read_window((start,), (min(start + block, size),), (halo,), f)
        total += sum(r1 - r0 for *_, r0, r1 in subtile_cuts(re - rs, halo, tile))
    return total


def compute_factor(shape: Shape, block: Shape, halo: Shape, factor: Factor, tile: Shape | None = None) -> float:
    """Voxels the net computes per voxel written, over the whole plan (block halos, pooling
    alignment and sub-tile halos all counted; ``tile=None``: one tile per block)."""
    f = per_axis(factor, len(shape))
    tile = tile or tuple(10**12 for _ in shape)
    return math.prod(_axis_compute(s, b, h, k, t) / s for s, b, h, k, t in zip(shape, block, halo, f, tile))


def block_window(block: Shape, halo: Shape, factor: Factor) -> Shape:
    """Read-window extent of a block starting at 0 (its largest possible window)."""
    rs, re = read_window((0,) * len(block), block, halo, factor)
    return tuple(b - a for a, b in zip(rs, re))


def subtile_counts(length: int, halo: int, f: int) -> list[int]:
    """Sub-tile extents worth trying along one axis of a window of ``length``: for each number of
    sub-tiles, the smallest extent (a multiple of ``f``) that covers the window's output in that
    many, largest first. Other extents compute more for the same number of sub-tiles."""
    out = max(f, length - 2 * halo)
    extents: list[int] = []
    for n in range(1, -(-out // f) + 1):
        t = round_up(-(-out // n), f)
        if not extents or t < extents[-1]:
            extents.append(t)
    return extents


def _axis_window_compute(length: int, halo: int, tile: int) -> int:
    return sum(r1 - r0 for *_, r0, r1 in subtile_cuts(length, halo, tile))


def best_subtile(window: Shape, halo: Shape, factor: Factor, fits: Callable[[Shape], bool]) -> Shape | None:
    """The sub-tile of one block window that computes the fewest voxels, among those whose
    window ``fits`` (None when not even the smallest does).

    Candidates per axis are :func:`subtile_counts`. A larger window is taken not to fit where a
    smaller one does not, and fewer cuts along an axis never compute more, so for each choice
    along the leading axes the largest fitting extent along the last is found by bisection, and
    leading choices that cannot beat the best so far are skipped (this keeps terabyte-sized plans
    within a second). Where a memory profile breaks that order (a window just thin enough to
    take the whole pass, see ``slab_extent``), the tile returned still fits, but a cheaper one
    may be missed.
    """
    f = per_axis(factor, len(window))
    cands = [[(t, _axis_window_compute(w, h, t)) for t in subtile_counts(w, h, k)] for w, h, k in zip(window, halo, f)]
    last = cands[-1]
    floor_last = last[0][1]  # the fewest cuts compute least
    best: tuple[int, Shape] | None = None

    def ok(t: Shape) -> bool:
        return fits(tuple(min(a + 2 * h, w) for a, h, w in zip(t, halo, window)))

    for lead in product(*cands[:-1]):
        lead_t = tuple(t for t, _ in lead)
        lead_cost = math.prod(c for _, c in lead)
        if best is not None and lead_cost * floor_last >= best[0]:
            continue
        if not ok(lead_t + (last[-1][0],)):
            continue
        lo, hi = 0, len(last) - 1  # last[hi] fits; find the first (largest extent) that does
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(lead_t + (last[mid][0],)):
                hi = mid
            else:
                lo = mid + 1
        cost = lead_cost * last[lo][1]
        if best is None or cost < best[0]:
            best = (cost, lead_t + (last[lo][0],))
    return None if best is None else best[1]


def _block_bound(shape: Shape, combo: Sequence[tuple[int, int]], halo: Shape, f: Shape) -> float:
    """Voxels computed per voxel written by a block predicted in one tile: no sub-tiling computes less."""
    return math.prod(_axis_compute(s, b, h, k, 10**12) / s for s, (b, _), h, k in zip(shape, combo, halo, f))


def plan_memory_blocks(
    shape: Shape,
    chunks: Shape,
    halo: Shape,
    factor: Factor,
    profile: MemoryProfile,
    budget: float,
    pow2_axes: Sequence[int] = (),
    net_share: float = 0.8,
    min_gain: float = 0.01,
) -> tuple[Shape, Shape]:
    """Block (multiples of ``chunks``) and sub-tile for a per-task memory ``budget`` in bytes.

    Block and sub-tile are chosen together: for every block among ``1..8``, the powers of two
    and all chunks per axis (only powers of two, or all, along ``pow2_axes``), the sub-tile is
    the one of its window that computes the fewest voxels (:func:`best_subtile`) with the net
    within ``net_share`` of the budget and the whole task (:meth:`MemoryProfile.task_bytes`:
    net plus the block's buffers) within the budget. The plan is the pair with the fewest
    voxels computed over the whole volume (block halos, pooling alignment and sub-tile halos;
    the count is separable per axis); of those within ``min_gain`` of the least, the smallest
    block (finer progress and resume). Choosing the sub-tile for its block matters: a tile
    chosen alone (about a cube) cuts a deep block's window into uneven pieces along z, while one
    shaped to the window pays the z halo once per block.

    Returns
    -------
    (block, tile)
        The block shape and the sub-tile's output extent.

    Raises
    ------
    ValueError
        The budget cannot hold the smallest sub-tile with its halo, or one chunk's buffers.
    """
    f = per_axis(factor, len(shape))
    smallest = tuple(k + 2 * h for k, h in zip(f, halo))
    if profile.net_bytes(smallest) > net_share * budget:
        raise ValueError("the smallest sub-tile does not fit")
    options = []  # per axis: (block extent, window extent)
    for ax, (s, c, h, k) in enumerate(zip(shape, chunks, halo, f)):
        n_max = max(1, -(-s // c))
        pow2 = {2**i for i in range(n_max.bit_length())} | {n_max}
        ns = sorted(pow2 if ax in pow2_axes else pow2 | set(range(1, min(8, n_max) + 1)))
        options.append([(min(n * c, s), block_window((min(n * c, s),), (h,), k)[0]) for n in ns if n <= n_max])
    fitting = []
    least = math.inf
    # Cheapest-looking blocks first (by their cost with one sub-tile, a lower bound): once a
    # plan is found, blocks whose bound is beyond reach need no sub-tile search.
    combos = sorted((_block_bound(shape, combo, halo, f), combo) for combo in product(*options))
    for bound, combo in combos:
        if bound > least * (1 + min_gain):
            break
        win = tuple(w for _, w in combo)
        io = profile.io_bytes_per_voxel * math.prod(win)
        if io + profile.net_bytes(tuple(min(a, w) for a, w in zip(smallest, win))) > budget:
            continue
        tile = best_subtile(win, halo, f, lambda w, io=io: (profile.net_bytes(w) <= net_share * budget
                                                             and profile.net_bytes(w) + io <= budget))
        if tile is None:
            continue
        block = tuple(b for b, _ in combo)
        cost = math.prod(_axis_compute(s, b, h, k, t) / s for s, b, h, k, t in zip(shape, block, halo, f, tile))
        fitting.append((cost, math.prod(block), block, tile))
        least = min(least, cost)
    if not fitting:
        raise ValueError("one chunk with its halo does not fit")
    _, _, block, tile = min((size, cost, block, tile) for cost, size, block, tile in fitting
                            if cost <= least * (1 + min_gain))
    return block, tile
