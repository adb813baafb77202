"""Blind-spot masking for Noise2Void (N2V) and N2V2.

Masked pixels are chosen stratified (one per cell of a regular grid, at a random position
inside it) so they spread over the patch; each masked pixel's value is replaced by

* ``"uniform"`` (N2V default): a random neighbour inside a ``roi`` window, centre excluded;
* ``"median"`` (N2V2): the median of that window without the centre,

so the network cannot learn the identity. The loss is then computed only at the masked
pixels. Written by hand because the replacement has to happen on torch tensors inside the
training loop and no maintained library provides it outside CAREamics' own data pipeline.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def stratified_coordinates(
    patch_shape: tuple[int, ...], percentage: float, generator: torch.Generator
) -> torch.Tensor:
    """Coordinates ``(N, ndim)`` of masked pixels: one per grid cell, ~``percentage`` % of pixels."""
    ndim = len(patch_shape)
    n_pixels = math.prod(patch_shape)
    n_target = max(1, round(n_pixels * percentage / 100.0))
    spacing = max(1.0, (n_pixels / n_target) ** (1.0 / ndim))
    grids = [torch.arange(0, s, spacing) for s in patch_shape]
    mesh = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1).reshape(-1, ndim)
    jitter = torch.rand(mesh.shape, generator=generator) * spacing
    coords = torch.floor(mesh + jitter).long()
    limit = torch.tensor(patch_shape) - 1
    return torch.minimum(coords, limit)


def _neighbour_offsets(ndim: int, roi: int) -> torch.Tensor:
    r = roi // 2
    rng = torch.arange(-r, r + 1)
    offs = torch.stack(torch.meshgrid(*([rng] * ndim), indexing="ij"), dim=-1).reshape(-1, ndim)
    return offs[(offs != 0).any(dim=1)]


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def n2v_mask(
    batch: torch.Tensor,
    percentage: float = 0.2,
    roi: int = 5,
    strategy: str = "uniform",
    generator: torch.Generator | None = None,
    struct_mask: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_input, mask)`` for a batch ``(B, C, *patch)``.

    ``mask`` is a boolean tensor of the batch's shape, True where the loss is computed.
    Every channel is masked at the same positions with its own replacement values.
    ``struct_mask`` (structN2V) additionally replaces the pixels under a centred boolean
    kernel around each masked pixel with random values, so that noise correlated along
    the kernel cannot be predicted from the neighbours.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    B, C = batch.shape[:2]
    spatial = tuple(batch.shape[2:])
    ndim = len(spatial)
    out = batch.clone()
    mask = torch.zeros_like(batch, dtype=torch.bool)
    offsets = _neighbour_offsets(ndim, roi)
    for b in range(B):
        coords = stratified_coordinates(spatial, percentage, generator)  # (N, ndim)
        n = coords.shape[0]
        if strategy == "uniform":
            pick = torch.randint(0, offsets.shape[0], (n,), generator=generator)
            src = coords + offsets[pick]
            src = torch.stack([_reflect(src[:, a], spatial[a]) for a in range(ndim)], dim=1)
            idx = (slice(None),) + tuple(src[:, a] for a in range(ndim))
            values = batch[b][idx]  # (C, N)
        elif strategy == "median":
            neigh = coords[:, None, :] + offsets[None, :, :]  # (N, K, ndim)
            neigh = torch.stack([_reflect(neigh[..., a], spatial[a]) for a in range(ndim)], dim=-1)
            idx = (slice(None),) + tuple(neigh[..., a] for a in range(ndim))
            values = batch[b][idx].median(dim=-1).values  # (C, N)
        else:
            raise ValueError(f"unknown masking strategy {strategy!r}")
        if struct_mask is not None:
            _apply_struct(out[b], coords, struct_mask, batch[b], generator)
        tidx = (slice(None),) + tuple(coords[:, a] for a in range(ndim))
        out[b][tidx] = values
        mask[b][tidx] = True
    return out, mask


def _apply_struct(
    out: torch.Tensor, coords: torch.Tensor, kernel: np.ndarray, original: torch.Tensor, generator: torch.Generator
) -> None:
    """Replace the pixels under ``kernel`` centred at each coordinate by random values
    drawn uniformly from the patch's value range (structN2V)."""
    spatial = out.shape[1:]
    kern = torch.as_tensor(np.asarray(kernel, dtype=bool))
    offs = torch.nonzero(kern) - torch.tensor(kern.shape) // 2  # (K, ndim)
    pos = coords[:, None, :] + offs[None, :, :]
    pos = pos.reshape(-1, len(spatial))
    inside = torch.ones(pos.shape[0], dtype=torch.bool)
    for a, s in enumerate(spatial):
        inside &= (pos[:, a] >= 0) & (pos[:, a] < s)
    pos = pos[inside]
    lo = original.amin(dim=tuple(range(1, original.ndim)))
    hi = original.amax(dim=tuple(range(1, original.ndim)))
    r = torch.rand((out.shape[0], pos.shape[0]), generator=generator, dtype=out.dtype)
    vals = lo[:, None] + r * (hi - lo)[:, None]
    out[(slice(None),) + tuple(pos[:, a] for a in range(len(spatial)))] = vals
