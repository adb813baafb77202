"""Deconvolving blind-spot denoising ("DecoNoising"; Goncharova, Honigmann, Jug & Krull 2020,
"Improving Blind Spot Denoising for Microscopy").

Image formation: the network predicts a *phantom* ``z``; the microscope blurs it with a known
point-spread function ``h`` into the signal ``s = z * h``; the camera adds pixel-wise
independent, zero-mean noise, ``x ~ p(x | s)``. Training is Noise2Void on ``s``: a blind-spot
MSE between ``s`` and ``x`` at masked pixels. Because ``s`` is forced to be a blurred image, the
network cannot put pixel noise into it, and because the PSF is a low-pass filter, many
phantoms give the same ``s``; a positivity penalty ``lambda * mean(max(0, -z))`` (light is
never negative) picks the sharp, physical one.

Prediction returns both ``s`` (denoised) and ``z`` (deconvolved), in input units: ``h`` sums
to 1, so blurring the deconvolved output reproduces the denoised one exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from quietscope.errors import ConfigError
from quietscope.methods.base import register
from quietscope.methods.n2v import N2V, N2VConfig
from quietscope.nets.psf import convolve_psf, gaussian_psf, psf_support, validate_psf

__all__ = ["N2VDeconv", "N2VDeconvConfig", "positivity_penalty"]


def positivity_penalty(z: torch.Tensor) -> torch.Tensor:
    """Mean over all voxels of ``max(0, -z)``: zero for a non-negative phantom, linear below 0.

    Parameters
    ----------
    z : torch.Tensor
        Phantom of any shape, in units where 0 means "no light".

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    return F.relu(-z).mean()


class N2VDeconvConfig(N2VConfig):
    """Configuration of ``n2v-deconv``: the N2V masking options plus the PSF and positivity.

    Exactly one of ``psf_sigma`` (Gaussian) and ``psf`` (an array, e.g. a measured PSF) is
    required. Sigmas and the array are in voxels of the training data, axes ``(y, x)`` or
    ``(z, y, x)``.
    """

    method: Literal["n2v-deconv"] = "n2v-deconv"  # type: ignore[assignment]
    psf_sigma: list[float] | None = Field(
        None, description="Gaussian PSF standard deviation in voxels: one value or one per spatial axis"
    )
    psf_truncate: float = Field(4.0, gt=0, le=10, description="Gaussian PSF cut at ceil(truncate*sigma) voxels")
    psf: list[list[float]] | list[list[list[float]]] | None = Field(
        None, description="PSF array (odd sizes, centred, non-negative); normalised to sum 1"
    )
    positivity_lambda: float = Field(1.0, ge=0, description="weight of the positivity penalty on the phantom")
    offset: float = Field(
        0.0, description="input value of 'no light' (camera offset/background); positivity applies to z - offset"
    )

    @model_validator(mode="after")
    def _one_psf(self) -> N2VDeconvConfig:
        if (self.psf_sigma is None) == (self.psf is None):
            raise ConfigError(
                "n2v-deconv needs exactly one PSF: give --psf-sigma (Gaussian, voxels) or --psf (a TIFF), not "
                + ("neither" if self.psf is None else "both")
            )
        # Build the kernel once here so a bad PSF fails at the edge, not in the first step.
        psf_kernel(self)
        return self


def psf_kernel(config: N2VDeconvConfig) -> np.ndarray:
    """The normalised PSF array (float64) described by ``config``."""
    if config.psf is not None:
        return validate_psf(config.psf, config.spatial_ndim)
    assert config.psf_sigma is not None
    return gaussian_psf(config.psf_sigma, config.spatial_ndim, config.psf_truncate)


@register
class N2VDeconv(N2V):
    """Deconvolving N2V: outputs the denoised image and the deconvolved phantom, with a positivity term."""

    name: ClassVar[str] = "n2v-deconv"
    Config = N2VDeconvConfig
    config: N2VDeconvConfig

    def __init__(self, config: N2VDeconvConfig) -> None:
        super().__init__(config)
        # Not persistent: the config rebuilds it, so model files stay a function of the config.
        kernel = torch.as_tensor(psf_kernel(config), dtype=torch.float32)
        self.register_buffer("psf", kernel, persistent=False)

    # ---- protocol ----------------------------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        c = self.config.in_channels
        if c == 1:
            return ["denoised", "deconvolved"]
        return [f"denoised_ch{i}" for i in range(c)] + [f"deconvolved_ch{i}" for i in range(c)]

    @property
    def psf_support(self) -> tuple[int, ...]:
        """PSF half-width per spatial axis (voxels)."""
        return psf_support(self.psf)

    @property
    def extra_halo(self) -> tuple[int, ...]:
        # The impulse probe of the receptive field already sees the blur inside ``predict``,
        # so this counts the support twice: a margin (costing halo) that keeps chunked ==
        # whole even if a faint PSF tail were lost in the probe's arithmetic.
        return self.psf_support

    @property
    def psf_symmetric_yx(self) -> bool:
        """True if the PSF is unchanged by the y-x flips and 90° rotations of patch augmentation.

        An anisotropic (y != x) or skewed PSF is not: rotating a training patch then pairs
        it with the wrong blur, and augmentation should be switched off.
        """
        k = self.psf.detach().cpu().numpy()
        # Flips and the y-x transpose generate the whole group of flips and 90° rotations.
        same = [np.flip(k, -1), np.flip(k, -2), np.swapaxes(k, -1, -2)]
        return all(v.shape == k.shape and np.allclose(v, k, rtol=1e-5, atol=1e-7) for v in same)

    def phantom(self, x: torch.Tensor) -> torch.Tensor:
        """The deconvolved phantom ``z`` of a raw tile, in normalised units."""
        return self.net(self.normalize(x))

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Blind-spot MSE of ``s = z * h`` at masked pixels + ``lambda * mean(max(0, -z))``.

        Both terms are in normalised units (the data's std is 1), so ``positivity_lambda`` does
        not depend on the camera's units.
        """
        cfg = self.config
        x = self.normalize(batch)
        support = self.psf_support
        patch = tuple(batch.shape[2:])
        if any(p <= 2 * r for p, r in zip(patch, support)):
            raise ConfigError(
                f"--patch {patch} is too small for the PSF (support {support} voxels per axis); "
                f"use a patch of at least {tuple(4 * r for r in support)} or a smaller PSF"
            )
        masked, mask = self.blind_spot_mask(x, generator)
        z = self.net(masked)
        # Borders: s near the patch edge would need z from outside the patch. Mirroring z (as
        # the DecoNoising code does) invents that light; instead we convolve 'valid' and
        # score only masked pixels whose whole PSF support lies inside the patch. Every z
        # voxel still gets gradient (it is inside some interior pixel's support); only
        # ~2*support/patch of the masked pixels per axis are left out.
        s = convolve_psf(z, self.psf, padding="valid")
        inner = (slice(None), slice(None)) + tuple(slice(r, p - r) for r, p in zip(support, patch))
        m = mask[inner]
        sq = (s - x[inner]) ** 2
        n2v = (sq * m).sum() / m.sum().clamp(min=1)
        # z - offset in units of the data's std, the scale of the MSE term.
        zero = (cfg.offset - self._bcast(self.norm_mean, z.ndim)) / self._bcast(self.norm_std, z.ndim)
        return n2v + cfg.positivity_lambda * positivity_penalty(z - zero)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` raw tile -> ``(B, 2C, *spatial)``: denoised ``s`` then deconvolved ``z``.

        Near the tile's border ``z`` is mirrored to blur it; those voxels lie in the halo of
        chunked prediction (``extra_halo`` = PSF support) and are trimmed.
        """
        z = self.phantom(x)
        s = convolve_psf(z, self.psf, padding="reflect")
        return torch.cat([self.denormalize(s), self.denormalize(z)], dim=1)

    def summary(self) -> dict[str, Any]:
        return {
            "psf_shape": list(self.psf.shape),
            "psf_support": list(self.psf_support),
            "psf_sigma": self.config.psf_sigma,
            "positivity_lambda": self.config.positivity_lambda,
            "offset": self.config.offset,
            "psf_symmetric_yx": self.psf_symmetric_yx,
        }
