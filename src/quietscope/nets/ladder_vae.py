"""A ladder (hierarchical) VAE for splitting, in the spirit of HDN / μSplit / denoiSplit.

Bottom-up path: a stem convolution and residual blocks, then ``levels`` stages that each halve
every spatial axis (strided convolution + residual blocks). Top-down path: one latent per level,
coarsest first; the top prior is ``N(0, 1)``, every other prior is conditioned on the top-down
state above it; each posterior also sees the bottom-up features of its level. The decoder ends
at full resolution with ``out_channels`` maps.

Everything is convolutional (no pooling to a global vector, no batch norm), so the network is
translation-equivariant on the ``2**levels`` grid and its receptive field is finite: chunked
prediction can measure it with impulses like for any U-Net.

The latent noise comes from an explicit :class:`torch.Generator`, so a caller can make a
sampled forward pass a deterministic function of the input (fixed seed per call), or use the
posterior means (``mode="mean"``), which involves no randomness at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

#: Bounds on predicted log-variances: keeps exp() finite early in training.
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0


def _conv(nd: int, cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Module:
    cls = nn.Conv2d if nd == 2 else nn.Conv3d
    return cls(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else (k - 1) // 2)


def _up(nd: int, ch: int) -> nn.Module:
    # Kernel 2 / stride 2: each coarse voxel maps to exactly one 2^nd block (grid-aligned).
    cls = nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d
    return cls(ch, ch, 2, stride=2)


class ResBlock(nn.Module):
    """``x + conv(elu(conv(elu(x))))``, shape-preserving."""

    def __init__(self, nd: int, ch: int) -> None:
        super().__init__()
        self.c1 = _conv(nd, ch, ch)
        self.c2 = _conv(nd, ch, ch)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(self.act(self.c1(self.act(x))))


def _stack(nd: int, ch: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(nd, ch) for _ in range(n)])


def gaussian_kl(
    mu_q: torch.Tensor, lv_q: torch.Tensor, mu_p: torch.Tensor | None = None, lv_p: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise analytic ``KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p))``; ``N(0, 1)`` when p is None."""
    if mu_p is None or lv_p is None:
        return 0.5 * (mu_q**2 + torch.exp(lv_q) - 1.0 - lv_q)
    return 0.5 * ((torch.exp(lv_q) + (mu_q - mu_p) ** 2) * torch.exp(-lv_p) - 1.0 + lv_p - lv_q)


@dataclass
class LevelStats:
    """KL of one latent level: element-wise ``(B, Z, *latent_spatial)`` map."""

    kl: torch.Tensor

    @property
    def n_pixels(self) -> int:
        """Latent pixels (spatial positions) per sample."""
        n = 1
        for s in self.kl.shape[2:]:
            n *= int(s)
        return n

    def summed(self) -> torch.Tensor:
        """Per-sample KL summed over latent channels and pixels (denoiSplit), shape ``(B,)``."""
        return self.kl.flatten(1).sum(1)

    def averaged(self) -> torch.Tensor:
        """Per-sample KL summed over channels, averaged over latent pixels (μSplit), ``(B,)``."""
        return self.summed() / self.n_pixels


class LadderVAE(nn.Module):
    """Hierarchical VAE ``(B, in, *S) -> (B, out, *S)`` with one latent map per level.

    Parameters
    ----------
    spatial_ndim
        2 or 3.
    in_channels, out_channels
        Input maps (the superimposed image: 1) and decoder outputs.
    levels
        Number of latent levels; level ``l`` lives at ``1 / 2**(l+1)`` resolution, so tiles must
        be multiples of :attr:`downsampling_factor` ``= 2**levels``.
    filters
        Feature maps everywhere.
    latent_channels
        Channels of every latent map.
    res_blocks
        Residual blocks per stage in both paths.
    """

    def __init__(
        self,
        spatial_ndim: int,
        in_channels: int,
        out_channels: int,
        levels: int = 3,
        filters: int = 32,
        latent_channels: int = 16,
        res_blocks: int = 1,
    ) -> None:
        super().__init__()
        nd, f, z = spatial_ndim, filters, latent_channels
        self.nd, self.levels, self.latent_channels = nd, levels, z
        self.stem = nn.Sequential(_conv(nd, in_channels, f, 5), _stack(nd, f, res_blocks))
        self.down = nn.ModuleList(
            [nn.Sequential(_conv(nd, f, f, 3, stride=2), _stack(nd, f, res_blocks)) for _ in range(levels)]
        )
        self.q_top = _conv(nd, f, 2 * z)
        self.z_in = nn.ModuleList([_conv(nd, z, f, 1) for _ in range(levels)])
        self.top_stack = _stack(nd, f, res_blocks)
        self.ups = nn.ModuleList([_up(nd, f) for _ in range(levels)])
        # Levels below the top (index l = 0 .. levels-2): prior, posterior, merge.
        self.prior = nn.ModuleList([_conv(nd, f, 2 * z) for _ in range(levels - 1)])
        self.post = nn.ModuleList([_conv(nd, 2 * f, 2 * z) for _ in range(levels - 1)])
        self.merge = nn.ModuleList([_stack(nd, f, res_blocks) for _ in range(levels - 1)])
        self.head = nn.Sequential(_stack(nd, f, res_blocks), nn.ELU(), _conv(nd, f, out_channels, 1))

    @property
    def downsampling_factor(self) -> int:
        return 2**self.levels

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every level, finest first (level ``l`` at ``1/2**(l+1)`` resolution)."""
        h = self.stem(x)
        feats = []
        for down in self.down:
            h = down(h)
            feats.append(h)
        return feats

    @staticmethod
    def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, lv = t.chunk(2, dim=1)
        return mu, lv.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def _draw(mu: torch.Tensor, lv: torch.Tensor, mode: str, gen: torch.Generator | None) -> torch.Tensor:
        if mode == "mean":
            return mu
        # Noise is drawn on the CPU from the caller's generator: the same seed gives the same
        # latents on any device.
        eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype).to(mu.device)
        return mu + torch.exp(0.5 * lv) * eps

    def top_down(
        self, feats: list[torch.Tensor], mode: Literal["sample", "mean"] = "sample", gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[LevelStats]]:
        """Decode from bottom-up features; returns the output and each level's KL (finest first)."""
        top = self.levels - 1
        mu, lv = self._split(self.q_top(feats[top]))
        zs = self._draw(mu, lv, mode, gen)
        stats = [LevelStats(gaussian_kl(mu, lv))]
        h = self.top_stack(self.z_in[top](zs))
        for lvl in range(top - 1, -1, -1):
            h = self.ups[lvl + 1](h)
            mu_p, lv_p = self._split(self.prior[lvl](h))
            mu_q, lv_q = self._split(self.post[lvl](torch.cat([h, feats[lvl]], dim=1)))
            zs = self._draw(mu_q, lv_q, mode, gen)
            stats.append(LevelStats(gaussian_kl(mu_q, lv_q, mu_p, lv_p)))
            h = self.merge[lvl](h + self.z_in[lvl](zs))
        out = self.head(self.ups[0](h))
        return out, stats[::-1]

    def forward(
        self, x: torch.Tensor, mode: Literal["sample", "mean"] = "sample", gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[LevelStats]]:
        return self.top_down(self.bottom_up(x), mode, gen)
