"""Memory-lean inference of a :class:`~quietscope.nets.unet.UNet`: each level computed in slabs.

A plain forward pass of a 3D U-Net with 32 filters keeps ~800 bytes of activations alive per
voxel at its peak (measured by :func:`quietscope.inference_memory.probe_memory`): at the top
decoder level the up-sampled coarse features (64 channels), the skip (32), their concatenation
(96) and the first convolution's output are all whole at once. Here every conv block runs over
slabs along the first spatial axis (z in 3D), reading its input through a window that needs only
what the slab's two 3-wide convolutions see (two planes on each side). What stays whole is one
feature map per level: the skips, the coarse features being up-sampled and the block output.
Up-sampling, concatenation, the 1x1 head and the pooling work slab by slab too.

Why hand-written: torch has no memory-bounded execution of a network for inference
(``torch.utils.checkpoint`` trades memory for recomputation only under autograd). Every slab
computes exactly what the whole pass computes for its planes (zero padding only at the true
borders), so the result equals :meth:`UNet.forward` up to float rounding; the only extra work is
the first convolution of each block recomputing one plane on each side of its slab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quietscope.tiling import SLAB_HALO

__all__ = ["slabbed_forward"]

Planes = Callable[[int, int], torch.Tensor]


def _pad_z(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero planes before/after along the first spatial axis (F.pad lists axes last-first)."""
    if before == after == 0:
        return x
    return F.pad(x, [0, 0] * (x.ndim - 3) + [before, after])


def _conv_valid_z(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with its own padding in the other axes and none along the first spatial axis."""
    fn = F.conv2d if x.ndim == 4 else F.conv3d
    return fn(x, conv.weight, conv.bias, padding=(0,) + tuple(conv.padding[1:]))


def _units(block: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """A ConvBlock's body as (convolution, what follows it up to the next convolution)."""
    units: list[tuple[nn.Module, list[nn.Module]]] = []
    for layer in block.body:
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            units.append((layer, []))
        else:
            units[-1][1].append(layer)
    return units


def _block_slab(block: nn.Module, planes: Planes, n: int, a: int, b: int) -> torch.Tensor:
    """Output planes ``[a, b)`` of ``block`` (two 3-wide convolutions) from its input ``planes``.

    The first convolution computes ``[a-1, b+1)`` from input ``[a-2, b+2)``; where those lie
    outside ``[0, n)`` the input is zero-padded, and the first convolution's output there is set
    to zero, which is what the second convolution's own zero padding sees in a whole pass.
    """
    (c1, post1), (c2, post2) = _units(block)
    lo, hi = a - SLAB_HALO, b + SLAB_HALO
    h = _pad_z(planes(max(lo, 0), min(hi, n)), max(0, -lo), max(0, hi - n))
    h = _conv_valid_z(c1, h)
    for m in post1:
        h = m(h)
    if a == 0:
        h[:, :, 0] = 0
    if b == n:
        h[:, :, -1] = 0
    h = _conv_valid_z(c2, h)
    for m in post2:
        h = m(h)
    return h


def _run_block(block: nn.Module, planes: Planes, n: int, step: int,
               head: nn.Module | None = None) -> torch.Tensor:
    """``block`` (then ``head``) over all ``n`` planes, ``step`` at a time, into one preallocated output."""
    out: torch.Tensor | None = None
    for a in range(0, n, step):
        b = min(n, a + step)
        h = _block_slab(block, planes, n, a, b)
        if head is not None:
            h = head(h)
        if out is None:
            out = h.new_empty(h.shape[:2] + (n,) + h.shape[3:])
        out[:, :, a:b] = h
        del h
    assert out is not None
    return out


def _sliced(x: torch.Tensor) -> Planes:
    return lambda lo, hi: x[:, :, lo:hi]


def _upsampled(coarse: torch.Tensor, upsample: nn.Module, factor: int, skip: torch.Tensor | None) -> Planes:
    """Planes of ``cat([upsample(coarse), skip])`` without ever forming it whole."""

    def planes(lo: int, hi: int) -> torch.Tensor:
        c0 = lo // factor
        up = upsample(coarse[:, :, c0:(hi - 1) // factor + 1]).narrow(2, lo - c0 * factor, hi - lo)
        return up if skip is None else torch.cat([up, skip[:, :, lo:hi]], dim=1)

    return planes


def _pool(pool: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """``pool(x)`` slab by slab (max-pooling, or N2V2's blur-pool)."""
    if hasattr(pool, "kernel") and hasattr(pool, "_far"):  # N2V2's BlurPool (unet.py imports this module)
        return _blur_pool(pool, x, step)
    pz = _as_tuple(pool.kernel_size, x.ndim - 2)[0]
    nout = x.shape[2] // pz
    parts = [pool(x[:, :, a * pz:min(nout, a + step) * pz]) for a in range(0, nout, step)]
    return torch.cat(parts, dim=2)


def _as_tuple(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else (v,) * n


def _blur_pool(bp: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """:class:`BlurPool` slab by slab; replicate padding along z only at the true borders.

    The whole pass max-pools with stride 1 over ``x`` padded by one replicated plane at the far
    end (``m[i] = max(x[i], x[i+1])``), pads ``m`` by one replicated plane on each side and blurs
    with stride 2, so output plane ``j`` needs ``m[2j-1 .. 2j+1]``, i.e. ``x[2j-1 .. 2j+2]``.
    """
    if bp.pool[0] == 1:  # z neither pooled nor blurred: planes are independent
        nout = x.shape[2]
        return torch.cat([bp(x[:, :, a:a + step]) for a in range(0, nout, step)], dim=2)
    pool_fn = F.max_pool2d if bp.ndim == 2 else F.max_pool3d
    conv_fn = F.conv2d if bp.ndim == 2 else F.conv3d
    n = x.shape[2]
    nout = n // 2
    parts = []
    for c in range(0, nout, step):
        d = min(nout, c + step)
        m_lo, m_hi = max(2 * c - 1, 0), 2 * d  # planes of m needed (m[-1] is replicated below)
        xs = x[:, :, m_lo:min(m_hi + 1, n)]
        far = list(bp._far)
        far[-1] = 1 if m_hi + 1 > n else 0
        m = pool_fn(F.pad(xs, far, mode="replicate"), bp.pool, stride=1)
        both = list(bp._both)
        both[-2], both[-1] = (1 if 2 * c - 1 < 0 else 0), 0
        m = F.pad(m, both, mode="replicate")
        parts.append(conv_fn(m, bp.kernel, stride=bp.pool, groups=bp.channels))
    return torch.cat(parts, dim=2)


def slabbed_forward(net: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """:meth:`UNet.forward` computed level by level in slabs of ``step`` planes along the first spatial axis.

    For inference only (eval mode, no autograd): the result equals ``net(x)`` up to float rounding.

    Parameters
    ----------
    net : UNet
        The network (in eval mode).
    x : torch.Tensor
        Input ``(B, C, *spatial)``, spatial sizes multiples of ``net.downsampling_factor``.
    step : int
        Planes per slab at every level (:func:`quietscope.tiling.slab_extent` chooses it):
        thinner slabs, less memory, more recomputed planes (one on each side of a slab for the
        first convolution of each block).

    Returns
    -------
    torch.Tensor
        ``net(x)``.

    Examples
    --------
    >>> from quietscope.nets.unet import UNet
    >>> net = UNet(3, 1, 1, depth=1, filters=4).eval()
    >>> x = torch.randn(1, 1, 32, 8, 8)
    >>> with torch.no_grad():
    ...     bool(torch.allclose(slabbed_forward(net, x, 8), net(x), atol=1e-6))
    True
    """
    # One slab thickness (in each level's own planes) for all levels: a coarser level's plane
    # holds a quarter of the voxels and twice the channels, so its slabs are no larger in bytes
    # than the top level's.
    skips: list[torch.Tensor | None] = []
    h = x
    for block, pool in zip(net.down, net.pools):
        h = _run_block(block, _sliced(h), h.shape[2], step)
        skips.append(h)
        h = _pool(pool, h, step)
    h = _run_block(net.bottom, _sliced(h), h.shape[2], step)
    for level, (upsample, block) in enumerate(zip(net.ups, net.up)):
        i = net.depth - 1 - level
        skip = None if (net.n2v2 and i == 0) else skips[i]
        factor = net.pool[0]
        n = h.shape[2] * factor
        h = _run_block(block, _upsampled(h, upsample, factor, skip), n, step,
                       head=net.head if i == 0 else None)
        skips[i] = None  # the skip's memory is free once its level is decoded
        del skip
    return h
