"""A ladder (hierarchical) VAE for splitting, in the spirit of HDN / μSplit / denoiSplit.

Bottom-up path: a stem convolution and residual blocks, then ``levels`` stages that each halve
every spatial axis (strided convolution + residual blocks). Top-down path: one latent per level,
coarsest first; the top prior is ``N(0, 1)``, every other prior is conditioned on the top-down
state above it; each posterior also sees the bottom-up features of its level. The decoder ends
at full resolution with ``out_channels`` maps.

Everything is convolutional (no pooling to a global vector, no batch norm), so the network is
translation-equivariant on the ``2**levels`` grid and its receptive field is finite: chunked
prediction can measure it with impulses like for any U-Net.

Lateral context (μSplit's "LC", :mod:`quietscope.nets.lateral_context`): with
``context_levels = K``, the bottom-up level ``l < K`` (resolution ``2**(l+1)``) also receives the
field around the patch at that resolution. Each context input has its own stem; the patch's
features are zero-padded by ``P / 4`` per side (``P`` the training patch) to the context's
wider extent and merged with it (concatenation, 1×1 convolution), so from there on the level
works on the wider field, as μSplit keeps the context's spatial size. The top-down path crops
each level back to the bottom-up features below it, the output to the input tile, and the KL of
every level is taken on the central region that the patch itself covers (the rest is context,
not something the latents must explain).

The latent noise comes from an explicit :class:`torch.Generator`, so a caller can make a
sampled forward pass a deterministic function of the input (fixed seed per call), or use the
posterior means (``mode="mean"``), which involves no randomness at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from quietscope.nets.lateral_context import centre_crop

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
    def n_elements(self) -> int:
        """Latent elements (channels × pixels) per sample: μSplit's KL normaliser."""
        return int(self.kl[0].numel())

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
    context_levels
        Lateral-context inputs (``0`` = none; at most ``levels``), fed to the first bottom-up
        levels; :meth:`forward` then takes them as ``contexts``.
    context_patch
        Training patch side ``P`` the contexts are built for (a multiple of
        ``2**(context_levels + 1)`` and of 4); sets the padding ``P / 4`` per level.
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
        context_levels: int = 0,
        context_patch: int = 64,
    ) -> None:
        super().__init__()
        nd, f, z = spatial_ndim, filters, latent_channels
        self.nd, self.levels, self.latent_channels = nd, levels, z
        if not 0 <= context_levels <= levels:
            raise ValueError(f"context_levels {context_levels} must be within 0..{levels}")
        if context_levels and context_patch % max(4, 2 ** (context_levels + 1)):
            raise ValueError(f"context_patch {context_patch} must be a multiple of {max(4, 2 ** (context_levels + 1))}")
        self.context_levels, self.context_patch = context_levels, context_patch
        self.lc_stem = nn.ModuleList(
            [nn.Sequential(_conv(nd, in_channels, f, 5), _stack(nd, f, res_blocks)) for _ in range(context_levels)]
        )
        self.lc_merge = nn.ModuleList([_conv(nd, 2 * f, f, 1) for _ in range(context_levels)])
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

    @property
    def context_pad(self) -> int:
        """Zero padding per side of the patch's features at each context level (``P / 4``)."""
        return self.context_patch // 4 if self.context_levels else 0

    def bottom_up(self, x: torch.Tensor, contexts: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Features of every level, finest first (level ``l`` at ``1/2**(l+1)`` resolution).

        ``contexts[l]`` (lateral context ``l + 1``) is merged into level ``l``; its spatial size
        must be the level's plus ``2 · context_pad``.
        """
        contexts = contexts or []
        if len(contexts) != self.context_levels:
            raise ValueError(f"the network takes {self.context_levels} context input(s), got {len(contexts)}")
        h = self.stem(x)
        feats = []
        p = self.context_pad
        for lvl, down in enumerate(self.down):
            h = down(h)
            if lvl < self.context_levels:
                c = self.lc_stem[lvl](contexts[lvl])
                h = F.pad(h, [p, p] * self.nd)
                if h.shape[2:] != c.shape[2:]:
                    raise ValueError(f"context {lvl + 1} has shape {tuple(c.shape[2:])}, level {lvl} needs {tuple(h.shape[2:])}")
                h = self.lc_merge[lvl](torch.cat([h, c], dim=1))
            feats.append(h)
        return feats

    def primary_size(self, level: int, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial size at ``level`` of the region the input tile itself covers."""
        return tuple(s // 2 ** (level + 1) for s in x_shape)

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
        self,
        feats: list[torch.Tensor],
        mode: Literal["sample", "mean"] = "sample",
        gen: torch.Generator | None = None,
        out_shape: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, list[LevelStats]]:
        """Decode from bottom-up features; returns the output and each level's KL (finest first).

        ``out_shape`` is the input tile's spatial shape: with lateral context the decoder's
        maps are wider than the tile, the output is cropped to it and each level's KL to the
        region the tile covers. Without context it defaults to twice the finest features.
        """
        if out_shape is None:
            out_shape = tuple(2 * s for s in feats[0].shape[2:])
        top = self.levels - 1

        def kl_stats(kl: torch.Tensor, lvl: int) -> LevelStats:
            return LevelStats(centre_crop(kl, self.primary_size(lvl, out_shape)) if self.context_levels else kl)

        mu, lv = self._split(self.q_top(feats[top]))
        zs = self._draw(mu, lv, mode, gen)
        stats = [kl_stats(gaussian_kl(mu, lv), top)]
        h = self.top_stack(self.z_in[top](zs))
        for lvl in range(top - 1, -1, -1):
            h = centre_crop(self.ups[lvl + 1](h), tuple(feats[lvl].shape[2:]))
            mu_p, lv_p = self._split(self.prior[lvl](h))
            mu_q, lv_q = self._split(self.post[lvl](torch.cat([h, feats[lvl]], dim=1)))
            zs = self._draw(mu_q, lv_q, mode, gen)
            stats.append(kl_stats(gaussian_kl(mu_q, lv_q, mu_p, lv_p), lvl))
            h = self.merge[lvl](h + self.z_in[lvl](zs))
        out = self.head(centre_crop(self.ups[0](h), out_shape))
        return out, stats[::-1]

    def forward(
        self,
        x: torch.Tensor,
        mode: Literal["sample", "mean"] = "sample",
        gen: torch.Generator | None = None,
        contexts: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[LevelStats]]:
        return self.top_down(self.bottom_up(x, contexts), mode, gen, tuple(x.shape[2:]))
