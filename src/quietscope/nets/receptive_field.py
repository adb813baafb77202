"""Measure a method's receptive field by pushing impulses through it (as stardist does).

The halo of chunked prediction comes from here, never from a declared number, so a layer
added to a network can never silently make stitched tiles differ from whole-image output.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def measure_receptive_radius(
    predict: Callable[[torch.Tensor], torch.Tensor],
    spatial_ndim: int,
    in_channels: int,
    factor: int,
    background_mean: torch.Tensor | None = None,
    background_std: torch.Tensor | None = None,
    start_size: int = 48,
    max_size: int = 1024,
    seed: int = 0,
) -> tuple[int, ...]:
    """Largest distance (per axis) over which one input voxel changes any output voxel.

    Impulses are placed at ``factor`` different offsets relative to the pooling grid, on a
    random background (so ReLUs are not dead), and the tile is enlarged until the influence
    region no longer touches the tile's border.

    Parameters
    ----------
    predict
        Function ``(B, C, *spatial) -> (B, K, *spatial)`` in float64 or float32.
    factor
        Down-sampling factor: tile sizes are multiples of it.
    """
    gen = torch.Generator().manual_seed(seed)
    size = -(-start_size // factor) * factor
    dtype = torch.float64
    mean = torch.zeros(in_channels, dtype=dtype) if background_mean is None else background_mean.to(dtype)
    std = torch.ones(in_channels, dtype=dtype) if background_std is None else background_std.to(dtype)
    while True:
        shape = (factor, in_channels) + (size,) * spatial_ndim
        bcast = (1, in_channels) + (1,) * spatial_ndim
        bg = mean.reshape(bcast) + std.reshape(bcast) * torch.randn(shape, generator=gen, dtype=dtype).abs()
        x = bg.clone()
        centre = size // 2
        for k in range(factor):
            pos = (k, slice(None)) + (centre + k,) * spatial_ndim
            x[pos] += 100.0 * std
        with torch.no_grad():
            diff = (predict(x) - predict(bg)).abs().sum(dim=1)  # (factor, *spatial)
        radius = [0] * spatial_ndim
        touches = False
        for k in range(factor):
            nz = torch.nonzero(diff[k] > 0)
            if nz.numel() == 0:
                continue
            lo = nz.min(dim=0).values
            hi = nz.max(dim=0).values
            for ax in range(spatial_ndim):
                c = centre + k
                radius[ax] = max(radius[ax], int(c - lo[ax]), int(hi[ax] - c))
                if lo[ax] == 0 or hi[ax] == size - 1:
                    touches = True
        if not touches:
            return tuple(radius)
        if size >= max_size:
            log.warning("receptive field reaches the %d-voxel probe's border; using its size", size)
            return tuple(radius)
        size *= 2


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
