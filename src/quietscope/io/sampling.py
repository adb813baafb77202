"""Where in a large image to look: a bounded random sample of whole, non-overlapping blocks.

Noise inspection and noise-model fitting read a few blocks of a lazily opened image instead
of the whole volume; this module picks them (pure arithmetic on shapes) and reads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quietscope.errors import ConfigError, InputError
from quietscope.io.reading import Image

#: Region read at a time when sampling: whole chunks are cheap to read, single pixels are not.
_TILE_2D = (256, 256)
_TILE_3D = (16, 128, 128)

#: Smallest block edge the analysis accepts (the noise-model filters need 16 pixels).
MIN_BLOCK = 16
#: Smallest block depth along z (the autocorrelation needs a few lags).
MIN_Z_BLOCK = 4


@dataclass
class BlockSample:
    """Where the analysed blocks come from.

    Attributes
    ----------
    t : list of int
        Time point of each block.
    slices : list of tuple of slice
        Spatial slices of each block (in the image's spatial axis order).
    """

    t: list[int]
    slices: list[tuple[slice, ...]]

    def to_dict(self) -> list[dict[str, Any]]:
        """The sample as JSON-ready records (time point, start, stop per block)."""
        return [
            {"t": t, "start": [s.start for s in sl], "stop": [s.stop for s in sl]}
            for t, sl in zip(self.t, self.slices)
        ]


def block_shape_for(
    spatial_shape: Sequence[int], block_size: Sequence[int] | int
) -> tuple[int, ...]:
    """Block shape: ``block_size`` per axis (one value for all, or one per axis), clipped to the image.

    Parameters
    ----------
    spatial_shape : sequence of int
        Spatial shape of the image.
    block_size : int or sequence of int
        Wanted edge length(s).

    Returns
    -------
    tuple of int

    Raises
    ------
    ConfigError
        Wrong number of values, or a block edge below :data:`MIN_BLOCK`.
    InputError
        The image itself is smaller than :data:`MIN_BLOCK` along y or x.
    """
    nd = len(spatial_shape)
    sizes = (block_size,) * nd if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) == 1:
        sizes = sizes * nd
    if len(sizes) != nd:
        raise ConfigError(
            f"--block-size has {len(sizes)} values but the data has {nd} spatial axes; give 1 or {nd}"
        )
    if any(s < MIN_BLOCK for s in sizes[-2:]) or any(s < MIN_Z_BLOCK for s in sizes[:-2]):
        raise ConfigError(
            f"--block-size {list(sizes)} is too small; use at least {MIN_BLOCK} along y and x "
            f"and {MIN_Z_BLOCK} along z"
        )
    shape = tuple(min(int(b), int(s)) for b, s in zip(sizes, spatial_shape))
    if min(shape[-2:]) < MIN_BLOCK or min(shape[:-2], default=MIN_Z_BLOCK) < MIN_Z_BLOCK:
        raise InputError(
            f"the image is only {'x'.join(map(str, spatial_shape))} pixels; the noise analysis needs "
            f"at least {MIN_BLOCK} along y and x and {MIN_Z_BLOCK} along z"
        )
    return shape


def sample_blocks(
    spatial_shape: Sequence[int],
    block: Sequence[int],
    n_blocks: int,
    n_timepoints: int = 1,
    seed: int = 0,
) -> BlockSample:
    """Pick up to ``n_blocks`` distinct, non-overlapping blocks at random.

    The image (and its time points) is cut into a grid of whole blocks and cells are drawn
    without replacement, so no voxel is read twice and the sample spreads over the volume.

    Parameters
    ----------
    spatial_shape : sequence of int
        Spatial shape of the image.
    block : sequence of int
        Block shape (at most ``spatial_shape`` per axis).
    n_blocks : int
        Number of blocks wanted; fewer are returned when the grid has fewer cells.
    n_timepoints : int
        Time points to draw from.
    seed : int
        Seed of the draw.

    Returns
    -------
    BlockSample
    """
    if n_blocks < 1:
        raise ConfigError(f"--blocks {n_blocks} must be at least 1 (default 16)")
    counts = [max(1, s // b) for s, b in zip(spatial_shape, block)]
    # Centre the grid so that the leftover border is split between both sides.
    starts = [(s - c * b) // 2 for s, c, b in zip(spatial_shape, counts, block)]
    total = n_timepoints * math.prod(counts)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(n_blocks, total), replace=False))
    ts, slices = [], []
    for p in picks:
        t, *idx = np.unravel_index(int(p), [n_timepoints, *counts])
        ts.append(int(t))
        slices.append(
            tuple(slice(o + int(i) * b, o + (int(i) + 1) * b) for o, i, b in zip(starts, idx, block))
        )
    return BlockSample(t=ts, slices=slices)


def read_blocks(image: Image, sample: BlockSample, channel: int = 0) -> list[np.ndarray]:
    """Read one channel of each sampled block, keeping the stored dtype (clipping is detected from it)."""
    if not 0 <= channel < image.n_channels:
        raise ConfigError(
            f"--channel {channel} does not exist; the image has channels 0..{image.n_channels - 1}"
        )
    return [image.read_tc(t, sl, channel)[0] for t, sl in zip(sample.t, sample.slices)]


def covering_tiles(
    shape: tuple[int, ...], budget: int, rng: np.random.Generator
) -> list[tuple[slice, ...]]:
    """Regions ``(t, *spatial)`` of a ``(T, *spatial)`` array covering about ``budget`` voxels.

    All of it when it holds no more; else whole tiles of a regular grid drawn at random
    without replacement (reading tiles, not scattered pixels, keeps I/O chunk-sized).

    Parameters
    ----------
    shape : tuple of int
        ``(T, *spatial)``.
    budget : int
        Voxels wanted.
    rng : numpy.random.Generator
        Source of the draw.

    Returns
    -------
    list of tuple of slice
        One ``(t, *spatial)`` slice tuple per tile, in grid order.
    """
    if math.prod(shape) <= budget:
        return [tuple(slice(0, s) for s in shape)]
    spatial = shape[1:]
    base = _TILE_2D if len(spatial) == 2 else _TILE_3D
    tile = tuple(min(b, s) for b, s in zip(base, spatial))
    grid = (shape[0],) + tuple(-(-s // t) for s, t in zip(spatial, tile))
    n_tiles = math.prod(grid)
    want = min(n_tiles, max(1, -(-budget // math.prod(tile))))
    picks = rng.choice(n_tiles, size=want, replace=False)
    out = []
    for flat in np.sort(picks):
        idx = np.unravel_index(int(flat), grid)
        sl = [slice(int(idx[0]), int(idx[0]) + 1)]
        for i, t, s in zip(idx[1:], tile, spatial):
            sl.append(slice(int(i) * t, min(int(i) * t + t, s)))
        out.append(tuple(sl))
    return out
