"""A plain 2D/3D U-Net with the N2V2 options (blur-pool down-sampling, no top skip)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from quietscope.nets.streamed import streamed_forward
from quietscope.tiling import slab_extent


def _conv(ndim: int):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _bn(ndim: int):
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


class ConvBlock(nn.Module):
    """Two 3^d convolutions, each followed by optional batch norm and ReLU."""

    def __init__(self, ndim: int, cin: int, cout: int, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (cin, cout):
            layers.append(_conv(ndim)(c_in, cout, 3, padding=1))
            if batch_norm:
                layers.append(_bn(ndim)(cout))
            layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BlurPool(nn.Module):
    """N2V2's anti-aliased down-sampling: max-pool with stride 1, then a [1,2,1] blur with stride 2.

    The stride-1 max-pool pads on the far side only, so the operation stays aligned with the
    stride-2 grid (needed for chunked == whole prediction). Axes whose ``pool`` entry is 1 are
    neither pooled nor blurred.
    """

    def __init__(self, ndim: int, channels: int, pool: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.ndim = ndim
        self.pool = tuple(pool) if pool is not None else (2,) * ndim
        k1 = torch.tensor([1.0, 2.0, 1.0])
        k = torch.ones(())
        for p in self.pool:
            k = k[..., None] * (k1 if p == 2 else torch.ones(1))
        k = k / k.sum()
        self.register_buffer("kernel", k.expand((channels, 1) + tuple(k.shape)).contiguous(), persistent=False)
        self.channels = channels
        # F.pad lists axes last-first.
        self._far = tuple(v for p in reversed(self.pool) for v in (0, p - 1))
        self._both = tuple(v for p in reversed(self.pool) for v in ((1, 1) if p == 2 else (0, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool_fn = nn.functional.max_pool2d if self.ndim == 2 else nn.functional.max_pool3d
        conv_fn = nn.functional.conv2d if self.ndim == 2 else nn.functional.conv3d
        x = nn.functional.pad(x, self._far, mode="replicate")
        x = pool_fn(x, self.pool, stride=1)
        x = nn.functional.pad(x, self._both, mode="replicate")
        return conv_fn(x, self.kernel, stride=self.pool, groups=self.channels)


class UNet(nn.Module):
    """U-Net for 2D (``ndim=2``) or 3D (``ndim=3``) inputs ``(B, C, *spatial)``.

    Spatial sizes must be multiples of :attr:`downsampling_factor`. ``pool`` gives the
    down-sampling per spatial axis at each level (2 or 1; default 2 everywhere): ``(1, 2, 2)``
    keeps full z resolution, as anisotropic stacks need (their z steps are several times
    their pixel size, so pooling z would blur across planes and widen the z halo).

    In inference (eval mode, no autograd) a large tile is computed in slabs along its first
    spatial axis (:func:`~quietscope.nets.streamed.streamed_forward`, a third to a quarter of the
    activation memory of a whole pass, same result up to float rounding); ``inference_slabs``
    says how: ``"auto"`` (:func:`~quietscope.tiling.slab_extent`), ``0`` (always whole) or the
    planes per slab.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        depth: int = 2,
        filters: int = 32,
        batch_norm: bool = False,
        n2v2: bool = False,
        pool: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError("ndim must be 2 or 3")
        pool = (2,) * ndim if pool is None else tuple(int(p) for p in pool)
        if len(pool) != ndim or any(p not in (1, 2) for p in pool):
            raise ValueError(f"pool {pool} must give 1 or 2 for each of the {ndim} spatial axes")
        self.ndim, self.depth, self.n2v2, self.pool = ndim, depth, n2v2, pool
        widths = [filters * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for i in range(depth):
            self.down.append(ConvBlock(ndim, cin, widths[i], batch_norm))
            self.pools.append(BlurPool(ndim, widths[i], pool) if n2v2 else (nn.MaxPool2d(pool) if ndim == 2 else nn.MaxPool3d(pool)))
            cin = widths[i]
        self.bottom = ConvBlock(ndim, cin, widths[depth], batch_norm)
        self.up = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in reversed(range(depth)):
            self.ups.append(nn.Upsample(scale_factor=tuple(float(p) for p in pool), mode="nearest"))
            skip = 0 if (n2v2 and i == 0) else widths[i]
            self.up.append(ConvBlock(ndim, widths[i + 1] + skip, widths[i], batch_norm))
        self.head = _conv(ndim)(widths[0], out_channels, 1)
        self.inference_slabs: int | Literal["auto"] = "auto"

    @property
    def downsampling_factor(self) -> int | tuple[int, ...]:
        """Tile sizes must be multiples of this: an int when every axis is pooled alike,
        else one value per spatial axis."""
        f = tuple(p**self.depth for p in self.pool)
        return f[0] if len(set(f)) == 1 else f

    def _slab_step(self, x: torch.Tensor) -> int | None:
        if self.training or torch.is_grad_enabled() or self.inference_slabs == 0:
            return None
        if self.inference_slabs == "auto":
            return slab_extent(tuple(x.shape[2:]))
        return int(self.inference_slabs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self._slab_step(x)
        if step is not None:
            return streamed_forward(self, x, step)
        skips = []
        for block, pool in zip(self.down, self.pools):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        for level, (upsample, block) in enumerate(zip(self.ups, self.up)):
            i = self.depth - 1 - level
            x = upsample(x)
            if not (self.n2v2 and i == 0):
                x = torch.cat([x, skips[i]], dim=1)
            x = block(x)
        return self.head(x)


@contextmanager
def inference_slabs(module: nn.Module, value: int | Literal["auto"]) -> Iterator[None]:
    """Set ``inference_slabs`` of every :class:`UNet` inside ``module`` for the block's duration.

    ``0`` makes every pass whole, e.g. to measure the memory of a whole pass.
    """
    nets = [m for m in module.modules() if isinstance(m, UNet)]
    saved = [n.inference_slabs for n in nets]
    try:
        for n in nets:
            n.inference_slabs = value
        yield
    finally:
        for n, v in zip(nets, saved):
            n.inference_slabs = v
