"""Streaming inference of a :class:`~quietscope.nets.unet.UNet` along its first spatial axis.

The level-by-level slabbed pass this module replaced kept one whole feature map per
level (the skips above all: ~210 bytes per voxel of a 32-filter 3D U-Net with slack), so the
window a memory budget holds, and with it the halo paid per voxel written, is bounded by the
window's *volume*. Here every convolution is a node that computes its output in slabs of planes
when a consumer asks for them and keeps only a rolling window: planes are dropped as soon as every
consumer has moved past them. Requests only ever move forward along z, so each level holds the
planes between its slowest consumer (the skip connection, read by the decoder at the output's
position) and its fastest (the next level down, which runs ahead by the deeper levels' receptive
field). What is held is then a fixed number of planes per level, independent of the window's
depth: memory grows with a window's *plane area*, not its volume, and a window as deep as a whole
lightsheet block costs what a 60-plane one does.

Why hand-written: torch has no memory-bounded execution of a network for inference
(``torch.utils.checkpoint`` trades memory for recomputation only under autograd). Every slab
computes exactly what the whole pass computes for its planes (zero padding only at the true
borders, every convolution computed once per plane), so the result equals :meth:`UNet.forward`
up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["streamed_forward"]


def _units(block: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """A ConvBlock's body as (convolution, what follows it up to the next convolution)."""
    units: list[tuple[nn.Module, list[nn.Module]]] = []
    for layer in block.body:
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            units.append((layer, []))
        else:
            units[-1][1].append(layer)
    return units


class _Node:
    """A source of planes ``[0, n)`` along axis 2 that consumers read in increasing order.

    ``get(lo, hi)`` returns planes ``[lo, hi)``; ``release(who, lo)`` says consumer ``who`` will
    never again ask for a plane below ``lo``. Consumers register before the first request.
    """

    n: int

    def __init__(self) -> None:
        self.marks: dict[int, int] = {}

    def register(self, who: object) -> None:
        self.marks[id(who)] = 0

    def _low_water(self, who: object, lo: int) -> int:
        """Record that ``who`` is done below ``lo``; return the lowest plane any consumer still needs."""
        self.marks[id(who)] = max(self.marks[id(who)], lo)
        return min(self.marks.values())

    def get(self, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def release(self, who: object, lo: int) -> None:
        raise NotImplementedError


class _Input(_Node):
    """The network's input, held whole by the caller."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x, self.n = x, x.shape[2]

    def get(self, lo: int, hi: int) -> torch.Tensor:
        return self.x[:, :, lo:hi]

    def release(self, who: object, lo: int) -> None:
        pass


class _Conv(_Node):
    """One 3-wide convolution (and what follows it) computed ``step`` planes at a time into a
    rolling buffer of slabs."""

    def __init__(self, conv: nn.Module, post: list[nn.Module], source: _Node, step: int) -> None:
        super().__init__()
        self.conv, self.post, self.source, self.step = conv, post, source, max(1, int(step))
        self.n = source.n
        self.fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv3d
        self.padding = (0,) + tuple(conv.padding[1:])
        self.chunks: list[tuple[int, int, torch.Tensor]] = []
        self.front = 0
        source.register(self)

    def _compute(self, a: int, b: int) -> torch.Tensor:
        lo, hi = max(a - 1, 0), min(b + 1, self.n)
        h = self.source.get(lo, hi)
        if a == 0 or b == self.n:  # zero padding where the whole pass pads: the true borders only
            h = F.pad(h, [0, 0] * (h.ndim - 3) + [lo - (a - 1), (b + 1) - hi])
        h = self.fn(h, self.conv.weight, self.conv.bias, padding=self.padding)
        for m in self.post:
            h = m(h)
        # The next slab starts at b and reads from b - 1.
        self.source.release(self, b - 1)
        return h

    def get(self, lo: int, hi: int) -> torch.Tensor:
        while self.front < hi:
            # Exactly what is asked, in pieces of at most ``step``: rounding each request up to
            # whole steps would let every convolution down the chain run up to a step further
            # ahead, and the skips would hold all of it.
            b = min(hi, self.front + self.step)
            self.chunks.append((self.front, b, self._compute(self.front, b)))
            self.front = b
        parts = [t.narrow(2, max(lo, a) - a, min(hi, b) - max(lo, a)) for a, b, t in self.chunks if a < hi and b > lo]
        if not parts or parts[0].shape[2] == 0 or self.chunks[0][0] > lo:
            raise RuntimeError(f"planes [{lo}, {hi}) were released before they were read")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def release(self, who: object, lo: int) -> None:
        keep = self._low_water(who, lo)
        while self.chunks and self.chunks[0][1] <= keep:
            self.chunks.pop(0)


class _Pool(_Node):
    """Max-pooling (or N2V2's blur-pool) of a source's planes, computed when asked, not kept."""

    def __init__(self, pool: nn.Module, source: _Node) -> None:
        super().__init__()
        self.pool, self.source = pool, source
        self.blur = hasattr(pool, "kernel") and hasattr(pool, "_far")  # N2V2's BlurPool
        kz = pool.pool[0] if self.blur else pool.kernel_size
        self.pz = int(kz[0] if isinstance(kz, tuple) else kz)
        self.n = source.n // self.pz
        source.register(self)

    def _needs(self, lo: int) -> int:
        """The first source plane output plane ``lo`` reads."""
        if self.pz == 1:
            return lo
        return max(2 * lo - 1, 0) if self.blur else lo * self.pz

    def get(self, lo: int, hi: int) -> torch.Tensor:
        if self.pz == 1:
            return self.pool(self.source.get(lo, hi))
        if not self.blur:
            return self.pool(self.source.get(lo * self.pz, hi * self.pz))
        return self._blur(lo, hi)

    def _blur(self, c: int, d: int) -> torch.Tensor:
        """Blur-pool output planes ``[c, d)``: the whole pass max-pools with stride 1 over ``x``
        padded by one replicated plane at the far end (``m[i] = max(x[i], x[i+1])``), pads ``m``
        by one replicated plane on each side and blurs with stride 2, so output plane ``j``
        needs ``x[2j-1 .. 2j+2]``."""
        bp, n = self.pool, self.source.n
        pool_fn = F.max_pool2d if bp.ndim == 2 else F.max_pool3d
        conv_fn = F.conv2d if bp.ndim == 2 else F.conv3d
        m_lo, m_hi = max(2 * c - 1, 0), 2 * d
        xs = self.source.get(m_lo, min(m_hi + 1, n))
        far = list(bp._far)
        far[-1] = 1 if m_hi + 1 > n else 0
        m = pool_fn(F.pad(xs, far, mode="replicate"), bp.pool, stride=1)
        both = list(bp._both)
        both[-2], both[-1] = (1 if 2 * c - 1 < 0 else 0), 0
        m = F.pad(m, both, mode="replicate")
        return conv_fn(m, bp.kernel, stride=bp.pool, groups=bp.channels)

    def release(self, who: object, lo: int) -> None:
        self.source.release(self, self._needs(self._low_water(who, lo)))


class _UpCat(_Node):
    """``cat([upsample(coarse), skip])`` planes, computed when asked, not kept."""

    def __init__(self, upsample: nn.Module, factor: int, coarse: _Node, skip: _Node | None) -> None:
        super().__init__()
        self.upsample, self.f, self.coarse, self.skip = upsample, factor, coarse, skip
        self.n = coarse.n * factor
        coarse.register(self)
        if skip is not None:
            skip.register(self)

    def get(self, lo: int, hi: int) -> torch.Tensor:
        c0 = lo // self.f
        up = self.upsample(self.coarse.get(c0, (hi - 1) // self.f + 1)).narrow(2, lo - c0 * self.f, hi - lo)
        return up if self.skip is None else torch.cat([up, self.skip.get(lo, hi)], dim=1)

    def release(self, who: object, lo: int) -> None:
        keep = self._low_water(who, lo)
        self.coarse.release(self, keep // self.f)
        if self.skip is not None:
            self.skip.release(self, keep)


def _block(block: nn.Module, source: _Node, step: int) -> _Node:
    node = source
    for conv, post in _units(block):
        node = _Conv(conv, post, node, step)
    return node


def level_steps(step: int, pool_z: int, depth: int, min_planes: int = 2) -> list[int]:
    """Planes per slab at each level (level 0 first): ``step`` at full resolution, the same
    extent in full-resolution planes further down (so no level runs far ahead of the output),
    never thinner than ``min_planes``."""
    return [max(min_planes, step // pool_z**i) if pool_z > 1 else step for i in range(depth + 1)]


def streamed_forward(net: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """:meth:`UNet.forward` streamed along the first spatial axis, ``step`` output planes at a time.

    For inference only (eval mode, no autograd): the result equals ``net(x)`` up to float rounding.

    Parameters
    ----------
    net : UNet
        The network (in eval mode).
    x : torch.Tensor
        Input ``(B, C, *spatial)``, spatial sizes multiples of ``net.downsampling_factor``.
    step : int
        Planes per slab at full resolution (coarser levels: :func:`level_steps`).

    Returns
    -------
    torch.Tensor
        ``net(x)``.

    Examples
    --------
    >>> from quietscope.nets.unet import UNet
    >>> net = UNet(3, 1, 1, depth=2, filters=4).eval()
    >>> x = torch.randn(1, 1, 32, 8, 8)
    >>> with torch.no_grad():
    ...     bool(torch.allclose(streamed_forward(net, x, 8), net(x), atol=1e-6))
    True
    """
    steps = level_steps(step, net.pool[0], net.depth)
    skips: list[_Node] = []
    node: _Node = _Input(x)
    for i, (block, pool) in enumerate(zip(net.down, net.pools)):
        node = _block(block, node, steps[i])
        skips.append(node)
        node = _Pool(pool, node)
    node = _block(net.bottom, node, steps[net.depth])
    for level, (upsample, block) in enumerate(zip(net.ups, net.up)):
        i = net.depth - 1 - level
        skip = None if (net.n2v2 and i == 0) else skips[i]
        node = _block(block, _UpCat(upsample, net.pool[0], node, skip), steps[i])
    top = node
    driver = object()
    top.register(driver)
    n = x.shape[2]
    out: torch.Tensor | None = None
    for a in range(0, n, step):
        b = min(n, a + step)
        h = net.head(top.get(a, b))
        top.release(driver, b)
        if out is None:
            out = h.new_empty(h.shape[:2] + (n,) + h.shape[3:])
        out[:, :, a:b] = h
        del h
    assert out is not None
    return out
