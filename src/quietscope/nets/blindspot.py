"""A U-Net whose receptive field excludes the centre pixel by construction (2D and 3D).

The construction follows Laine et al. (2019), "High-quality self-supervised deep image
denoising": every convolution and pooling step is *shifted* (causal) along the first spatial
axis so that a feature at row ``i`` only ever sees input rows ``<= i`` (a closed half-space
"above" the pixel). One final shift by a single row makes that half-space strict. Running the same
network on the input rotated so that each of the ``2 * ndim`` half-spaces (4 in 2D: up, down,
left, right; 6 in 3D: +-z, +-y, +-x) becomes "above", rotating the features back and mixing
them with 1x1 convolutions gives an output whose receptive field is everything *except* the
pixel itself: the union of the strict half-spaces misses exactly the centre.

No layer normalises over space, so the blind spot holds in training as well as inference,
and the network is translation-equivariant on its pooling grid with a finite receptive field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quietscope.errors import InputError

__all__ = [
    "BlindSpotNet",
    "blindspot_directions",
    "check_tile_shape",
    "shift_down",
]

_NEG_SLOPE = 0.1  # leaky ReLU slope used by Laine et al.


def blindspot_directions(spatial_ndim: int) -> list[tuple[int, tuple[int, int]]]:
    """Rotations ``(k, dims)`` for :func:`torch.rot90` that each bring one half-space "above".

    After ``torch.rot90(x, k, dims)`` the first spatial axis (tensor axis 2) of the rotated
    tile runs along one signed axis of the original tile, so a network that only looks "up"
    along axis 2 looks, in original coordinates, along a different direction per rotation.

    Parameters
    ----------
    spatial_ndim : int
        2 or 3.

    Returns
    -------
    list of (int, (int, int))
        4 rotations in 2D, 6 in 3D (one per signed axis).
    """
    if spatial_ndim == 2:
        return [(k, (2, 3)) for k in range(4)]
    if spatial_ndim == 3:
        # Rotations in the (z, y) plane give -z, +y, +z, -y; two in (z, x) add +x and -x.
        return [(k, (2, 3)) for k in range(4)] + [(1, (2, 4)), (3, (2, 4))]
    raise ValueError(f"spatial_ndim must be 2 or 3, got {spatial_ndim}")


def shift_down(x: torch.Tensor, n: int = 1) -> torch.Tensor:
    """Shift a ``(B, C, *spatial)`` tensor by ``n`` along the first spatial axis.

    ``out[..., i, ...] = x[..., i - n, ...]``, with zeros entering at the top, so the
    feature at row ``i`` afterwards only carries information from rows ``<= i - n``.
    """
    size = x.shape[2]
    # F.pad lists (before, after) pairs from the last axis backwards.
    pad = [0, 0] * (x.ndim - 3) + [n, 0]
    return F.pad(x, pad).narrow(2, 0, size)


def check_tile_shape(shape: Sequence[int], spatial_ndim: int, factor: int) -> None:
    """Raise :class:`InputError` unless ``shape`` is ``(B, C, *spatial)`` on the pooling grid.

    Parameters
    ----------
    shape : sequence of int
        Tensor shape ``(B, C, *spatial)``.
    spatial_ndim : int
        Expected number of spatial axes.
    factor : int
        Every spatial size must be a positive multiple of this.
    """
    if len(shape) != spatial_ndim + 2:
        raise InputError(
            f"expected a (batch, channel, {spatial_ndim} spatial axes) tensor, got shape "
            f"{tuple(shape)}; add the missing batch/channel axes"
        )
    spatial = tuple(int(s) for s in shape[2:])
    if any(s <= 0 or s % factor for s in spatial):
        raise InputError(
            f"spatial shape {spatial} is not a multiple of the network's downsampling factor "
            f"{factor}; pad the tile (e.g. reflect) to a multiple of {factor}"
        )


def _conv(nd: int) -> type[nn.Module]:
    return nn.Conv2d if nd == 2 else nn.Conv3d


class _ShiftedConv(nn.Module):
    """2x3(x3) convolution whose output at row ``i`` sees input rows ``i-1 .. i`` only.

    Laine et al. shift a 3x3 kernel down by one row (rows ``i-2 .. i``); dropping the
    kernel's top row instead keeps the half-space property but halves how far each layer
    reaches upwards. The branches reach as far sideways as upwards, so the receptive field,
    and with it the tiling halo, is half as wide for the same lateral context.
    """

    def __init__(self, nd: int, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv(nd)(cin, cout, kernel_size=(2,) + (3,) * (nd - 1), padding=0)
        # Symmetric padding on the other axes; one row on top and none below on axis 2.
        self._pad = [1, 1] * (nd - 1) + [1, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self._pad))


class _Block(nn.Sequential):
    def __init__(self, nd: int, cin: int, cout: int) -> None:
        super().__init__(
            _ShiftedConv(nd, cin, cout),
            nn.LeakyReLU(_NEG_SLOPE),
            _ShiftedConv(nd, cout, cout),
            nn.LeakyReLU(_NEG_SLOPE),
        )


def _down(x: torch.Tensor) -> torch.Tensor:
    # A 2-pooling cell spans rows (2j, 2j+1); its lower row would leak downwards once the
    # cell is upsampled back to row 2j, so shift first: the cell then spans (2j-1, 2j).
    x = shift_down(x, 1)
    return F.max_pool2d(x, 2) if x.ndim == 4 else F.max_pool3d(x, 2)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class _HalfSpaceUNet(nn.Module):
    """U-Net whose output at row ``i`` depends only on input rows ``<= i`` (axis 2)."""

    def __init__(self, nd: int, cin: int, depth: int, filters: int) -> None:
        super().__init__()
        widths = [filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _Block(nd, cin if level == 0 else widths[level - 1], widths[level])
            for level in range(depth + 1)
        )
        self.decoders = nn.ModuleList(
            _Block(nd, widths[level + 1] + widths[level], widths[level]) for level in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoders):
            if level > 0:
                x = _down(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is not a skip
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](torch.cat([_up(x), skips[level]], dim=1))
        return x


class BlindSpotNet(nn.Module):
    """Network whose output at each pixel never depends on the input at that pixel.

    Parameters
    ----------
    spatial_ndim : int
        2 or 3.
    in_channels, out_channels : int
        Channels of the input and of the output.
    depth : int
        Number of down-sampling levels; tiles must be multiples of ``2 ** depth``.
    filters : int
        Feature maps at the first level (doubling at each level below).

    Notes
    -----
    The branches share one half-space U-Net. Rotating a non-square tile transposes its
    shape, so rotations are batched together only when their shapes agree.
    """

    def __init__(
        self,
        spatial_ndim: int,
        in_channels: int,
        out_channels: int,
        depth: int = 2,
        filters: int = 32,
    ) -> None:
        super().__init__()
        self.spatial_ndim = spatial_ndim
        self.in_channels = in_channels
        self.depth = depth
        self._directions = blindspot_directions(spatial_ndim)
        self.unet = _HalfSpaceUNet(spatial_ndim, in_channels, depth, filters)
        conv = _conv(spatial_ndim)
        n_dir = len(self._directions)
        # 1x1 convolutions mix the half-space features of a pixel without widening the
        # receptive field, so they keep the blind spot.
        self.head = nn.Sequential(
            conv(n_dir * filters, 4 * filters, kernel_size=1),
            nn.LeakyReLU(_NEG_SLOPE),
            conv(4 * filters, filters, kernel_size=1),
            nn.LeakyReLU(_NEG_SLOPE),
            conv(filters, out_channels, kernel_size=1),
        )

    @property
    def downsampling_factor(self) -> int:
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile_shape(x.shape, self.spatial_ndim, self.downsampling_factor)
        if x.shape[1] != self.in_channels:
            raise InputError(
                f"input has {x.shape[1]} channels but the network expects {self.in_channels}; "
                "select the channels the model was trained on"
            )
        batch = x.shape[0]
        rotated = [torch.rot90(x, k, dims) for k, dims in self._directions]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(rotated):
            groups.setdefault(tuple(r.shape), []).append(i)
        features: list[torch.Tensor] = [x] * len(rotated)  # placeholders, all overwritten
        for idxs in groups.values():
            y = self.unet(torch.cat([rotated[i] for i in idxs], dim=0))
            # The half-space so far includes the pixel's own row; one more row excludes it.
            y = shift_down(y, 1)
            for i, part in zip(idxs, y.split(batch, dim=0)):
                features[i] = part
        unrotated = [
            torch.rot90(f, -k, dims) for f, (k, dims) in zip(features, self._directions)
        ]
        return self.head(torch.cat(unrotated, dim=1))
