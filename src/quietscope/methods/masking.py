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

from quietscope.methods.struct_mask import apply_struct_mask


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


def _source(coords: torch.Tensor, offsets: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Reflected positions ``coords + offsets`` that never land on the blind spot itself.

    Reflection at a border can map a neighbour back onto the masked pixel (offset +2 at the
    second-last pixel); that would feed the network the very value it must predict, so such
    positions take the opposite offset instead.
    """
    ndim = coords.shape[1]

    def reflect(pos: torch.Tensor) -> torch.Tensor:
        return torch.stack([_reflect(pos[:, a], spatial[a]) for a in range(ndim)], dim=1)

    src = reflect(coords + offsets)
    self_hit = (src == coords).all(dim=1, keepdim=True)
    return torch.where(self_hit, reflect(coords - offsets), src)


def _struct_free_offsets(offsets: torch.Tensor, struct_mask: np.ndarray | None) -> torch.Tensor:
    """Drop replacement neighbours that the structN2V kernel hides.

    Their noise is correlated with the blind spot's (that is why they are hidden), so
    copying one of them into the blind spot would hand the network the noise it must not
    see. Falls back to all offsets if the kernel covers the whole window.
    """
    if struct_mask is None:
        return offsets
    kern = np.asarray(struct_mask, dtype=bool)
    centre = np.array(kern.shape) // 2
    hidden = {tuple(int(v) for v in o) for o in np.argwhere(kern) - centre}
    keep = torch.tensor([tuple(int(v) for v in o) not in hidden for o in offsets], dtype=torch.bool)
    return offsets[keep] if keep.any() else offsets


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
    kernel around each masked pixel with random values
    (:func:`quietscope.methods.struct_mask.apply_struct_mask`), so that noise correlated
    along the kernel cannot be predicted from the neighbours; the blind spot's own
    replacement is then drawn only from neighbours outside the kernel.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    B, C = batch.shape[:2]
    spatial = tuple(batch.shape[2:])
    ndim = len(spatial)
    out = batch.clone()
    mask = torch.zeros_like(batch, dtype=torch.bool)
    offsets = _struct_free_offsets(_neighbour_offsets(ndim, roi), struct_mask)
    for b in range(B):
        coords = stratified_coordinates(spatial, percentage, generator)  # (N, ndim)
        n = coords.shape[0]
        if strategy == "uniform":
            pick = torch.randint(0, offsets.shape[0], (n,), generator=generator)
            src = _source(coords, offsets[pick], spatial)
            idx = (slice(None),) + tuple(src[:, a] for a in range(ndim))
            values = batch[b][idx]  # (C, N)
        elif strategy == "median":
            k = offsets.shape[0]
            neigh = _source(
                coords.repeat_interleave(k, dim=0), offsets.repeat(n, 1), spatial
            ).reshape(n, k, ndim)
            idx = (slice(None),) + tuple(neigh[..., a] for a in range(ndim))
            values = batch[b][idx].median(dim=-1).values  # (C, N)
        else:
            raise ValueError(f"unknown masking strategy {strategy!r}")
        if struct_mask is not None:
            # out[b] still equals batch[b] here, so the random values span the original range.
            spots = torch.cat([torch.zeros((n, 1), dtype=torch.long), coords], dim=1)
            out[b : b + 1] = apply_struct_mask(out[b : b + 1], spots, struct_mask, generator)
        tidx = (slice(None),) + tuple(coords[:, a] for a in range(ndim))
        out[b][tidx] = values
        mask[b][tidx] = True
    return out, mask
