"""Measure a method's receptive field by pushing impulses through it (as stardist does).

The halo of chunked prediction comes from here, never from a declared number, so a layer
added to a network can never silently make stitched tiles differ from whole-image output.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from quietscope.tiling import per_axis

log = logging.getLogger(__name__)


def measure_receptive_radius(
    predict: Callable[[torch.Tensor], torch.Tensor],
    spatial_ndim: int,
    in_channels: int,
    factor: int | tuple[int, ...],
    background_mean: torch.Tensor | None = None,
    background_std: torch.Tensor | None = None,
    start_size: int = 48,
    max_size: int = 2048,
    seed: int = 0,
) -> tuple[int, ...]:
    """Largest distance (per axis) over which one input voxel changes any output voxel.

    Each axis is probed with a tile that is long along that axis and thin across it (the extent
    of influence along an axis does not depend on the tile's width across it, and a thin probe
    keeps 3D measurements cheap). Impulses are placed at ``factor`` offsets relative to the
    pooling grid, on a random background (so ReLUs are not dead); the tile is lengthened until
    the influence no longer reaches its ends.

    Parameters
    ----------
    predict
        Function ``(B, C, *spatial) -> (B, K, *spatial)``, evaluated in float64.
    factor
        Down-sampling factor (one int, or one per spatial axis): tile sizes are multiples of it.
    """


    f = per_axis(factor, spatial_ndim)
    n_phase = max(f)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    mean = torch.zeros(in_channels, dtype=dtype) if background_mean is None else background_mean.to(dtype)
    std = torch.ones(in_channels, dtype=dtype) if background_std is None else background_std.to(dtype)
    bcast = (1, in_channels) + (1,) * spatial_ndim
    widths = [max(8, 2 * k) for k in f]
    radius = [0] * spatial_ndim
    for axis in range(spatial_ndim):
        size = -(-start_size // f[axis]) * f[axis]
        while True:
            spatial = tuple(size if a == axis else widths[a] for a in range(spatial_ndim))
            bg = mean.reshape(bcast) + std.reshape(bcast) * torch.randn((n_phase, in_channels) + spatial, generator=gen, dtype=dtype).abs()
            x = bg.clone()
            # Centres on the pooling grid; impulse k sits at phase k (mod each axis's factor).
            centre = [(s // 2 // fa) * fa for s, fa in zip(spatial, f)]
            for k in range(n_phase):
                x[(k, slice(None)) + tuple(c + k % fa for c, fa in zip(centre, f))] += 100.0 * std
            with torch.no_grad():
                diff = (predict(x) - predict(bg)).abs().sum(dim=1)  # (n_phase, *spatial)
            reach, touches = 0, False
            for k in range(n_phase):
                nz = torch.nonzero(diff[k] > 0)
                if nz.numel() == 0:
                    continue
                lo, hi = int(nz[:, axis].min()), int(nz[:, axis].max())
                c = centre[axis] + k % f[axis]
                reach = max(reach, c - lo, hi - c)
                touches |= lo == 0 or hi == size - 1
            if not touches:
                break
            if size >= max_size:
                log.warning("receptive field along axis %d reaches the %d-voxel probe's end; using its size", axis, size)
                break
            size *= 2
        radius[axis] = reach
    return tuple(radius)


def method_receptive_radius(method: torch.nn.Module) -> tuple[int, ...]:
    """Measure a :class:`quietscope.methods.base.Method`'s receptive-field radius in float64."""
    probe = copy.deepcopy(method).to("cpu").double().eval()
    cfg = probe.config
    return measure_receptive_radius(
        probe.predict,
        cfg.spatial_ndim,
        cfg.in_channels,
        probe.downsampling_factor,
        background_mean=getattr(probe, "norm_mean", None),
        background_std=getattr(probe, "norm_std", None),
    )
