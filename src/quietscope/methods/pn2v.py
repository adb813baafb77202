"""Probabilistic Noise2Void (Krull, Vičar, Prakash, Lalit & Jug 2020, "Probabilistic Noise2Void:
Unsupervised Content-Aware Denoising"; GMM noise models: Prakash, Lalit, Tomancak, Krull & Jug
2020, "Fully Unsupervised Probabilistic Noise2Void").

N2V's blind spot and masking, but instead of one value per pixel the U-Net predicts
``n_samples`` values per pixel and channel: samples ``s_k`` of the *prior* ``p(s | neighbourhood)``
of the clean signal. A pixel noise model ``p(x | s)`` (:mod:`quietscope.noise_models`) links the
prior to the observation, so training maximises the marginal likelihood of each masked pixel,

``log p(x_i) ≈ log (1/K) Σ_k p(x_i | s_ik)``,

and prediction can fold the observed pixel back in through the posterior: the MMSE estimate
``Σ_k s_k p(x | s_k) / Σ_k p(x | s_k)``. The noise model works in raw data units, so the
network's samples (normalised units) are de-normalised before it sees them.

Memory: the network's last layer holds ``n_samples`` values per voxel and channel (float32:
``4 * n_samples`` bytes per voxel and channel on top of N2V's feature maps); with many
samples lower ``--max-tile-voxels`` (see :attr:`PN2V.memory_per_voxel`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from quietscope.methods.base import Method, register
from quietscope.methods.n2v import N2V, N2VConfig
from quietscope.nets.unet import UNet
from quietscope.noise_models import noise_model_from_dict
from quietscope.noise_models.base import NoiseModel

__all__ = ["PN2V", "PN2VConfig", "marginal_nll", "mmse_estimate", "prior_mean"]

#: Default samples per pixel. PN2V uses 800 on a GPU; 64 keeps a CPU training step and the
#: last layer's memory ~12x smaller while the sample mean's error (std / 8) stays well under
#: the noise it is compared with.
DEFAULT_SAMPLES = 64

#: (pixels x samples) evaluated by the noise model at once during prediction: bounds the
#: temporary tensors of a GMM (several per component) to a few hundred MB for any tile.
_EVAL_BUDGET = 1 << 22


# ---- the probabilistic core (pure functions) -----------------------------------------------
def marginal_nll(noise_model: NoiseModel, x: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Negative log marginal likelihood ``-log (1/K) Σ_k p(x | s_k)`` per pixel.

    Parameters
    ----------
    noise_model : NoiseModel
        ``p(x | s)`` in raw units.
    x : torch.Tensor, shape (N,)
        Observed values, raw units.
    samples : torch.Tensor, shape (N, K)
        Prior samples ``s_k`` of each pixel's signal, raw units.

    Returns
    -------
    torch.Tensor, shape (N,)
        Per-pixel loss; differentiable with respect to ``samples``.
    """
    loglik = noise_model.log_likelihood(x[:, None], samples)
    # log-sum-exp instead of log(mean(exp)): GMM densities of far-off samples underflow.
    return -(torch.logsumexp(loglik, dim=-1) - math.log(samples.shape[-1]))


def mmse_estimate(noise_model: NoiseModel, x: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Posterior mean ``Σ_k s_k p(x | s_k) / Σ_k p(x | s_k)`` per pixel.

    Parameters
    ----------
    noise_model : NoiseModel
        ``p(x | s)`` in raw units.
    x : torch.Tensor, shape (N,)
        Observed values, raw units.
    samples : torch.Tensor, shape (N, K)
        Prior samples, raw units.

    Returns
    -------
    torch.Tensor, shape (N,)
    """
    weights = torch.softmax(noise_model.log_likelihood(x[:, None], samples), dim=-1)
    return (weights * samples).sum(dim=-1).to(samples.dtype)


def prior_mean(samples: torch.Tensor) -> torch.Tensor:
    """Mean of the prior samples (the estimate that ignores the pixel itself, like N2V)."""
    return samples.mean(dim=-1)


# ---- configuration -------------------------------------------------------------------------
class PN2VConfig(N2VConfig):
    """N2V's masking and U-Net options plus the noise model and the number of prior samples."""

    method: Literal["pn2v"] = "pn2v"  # type: ignore[assignment]
    noise_model: dict[str, Any] = Field(
        ..., description="a noise model's to_dict() ('quietscope train --noise-model FILE')"
    )
    n_samples: int = Field(
        DEFAULT_SAMPLES, ge=2, le=2048, description="prior samples per pixel (PN2V paper: 800)"
    )

    @field_validator("noise_model")
    @classmethod
    def _valid_noise_model(cls, d: dict[str, Any]) -> dict[str, Any]:
        # Rebuilding it here makes a broken description fail at the edge, with its own message.
        noise_model_from_dict(d)
        return d


# ---- the method ----------------------------------------------------------------------------
@register
class PN2V(N2V):
    """Probabilistic Noise2Void: prior samples + a noise model; MMSE (or prior-mean) estimate."""

    name: ClassVar[str] = "pn2v"
    Config = PN2VConfig
    inference_options: ClassVar[tuple[str, ...]] = ("estimate",)
    estimate_choices: ClassVar[tuple[str, ...]] = ("mmse", "prior")

    def __init__(self, config: PN2VConfig) -> None:
        Method.__init__(self, config)
        n = config.net

        self.net = UNet(
            config.spatial_ndim,
            config.in_channels,
            config.in_channels * config.n_samples,
            depth=n.depth,
            filters=n.filters,
            batch_norm=n.batch_norm,
            n2v2=n.n2v2,
            pool=n.pool(config.spatial_ndim),
        )
        # A sub-module, so it follows the network to the GPU; its tables are rebuilt from the
        # config on load and land in the model file's tensors as well.
        self.noise_model = noise_model_from_dict(config.noise_model)
        self.estimate: Literal["mmse", "prior"] = "mmse"
        self._range_checked = False

    @property
    def memory_per_voxel(self) -> int:
        """Bytes per voxel of the samples and their noise-model evaluation (float32), beyond
        the U-Net's feature maps: divide a memory budget by it to size tiles."""
        return 4 * 2 * self.config.in_channels * self.config.n_samples

    def summary(self) -> dict[str, Any]:
        lo, hi = self.noise_model.signal_range
        return {
            "noise_model": f"{self.noise_model.kind}, signal range [{lo:.6g}, {hi:.6g}]",
            "n_samples": self.config.n_samples,
            "estimate": self.estimate,
        }

    # ---- normalisation and range -----------------------------------------------------------
    def check_data_range(self, x_min: float, x_max: float) -> None:
        """Raise :class:`~quietscope.errors.InputError` when the noise model does not cover
        ``[x_min, x_max]`` (raw units)."""
        self.noise_model.check_range(float(x_min), float(x_max))

    def data_coverage_warning(self, low: float, high: float) -> str | None:
        """Warn when the data reach signals a histogram noise model never saw.

        A histogram knows p(x|s) only between the first and last signal it was filled from (its
        support); beyond, prior samples are pushed back inside it, biasing the prediction there
        (measured on W2S: 14 % of the test crop below the calibrated signals, 19.9 dB vs 25.3 with
        a GMM). ``low``/``high`` come from smoothed data, which still carry a little noise, so the
        check allows one noise standard deviation at each end.
        """
        nm = self.noise_model
        support = getattr(nm, "support", None)
        if support is None:
            return None
        lo, hi = support
        (_, sd_lo), (_, sd_hi) = (nm.mean_std(np.array([v])) for v in (lo, hi))
        lo_ok, hi_ok = lo - float(sd_lo[0]), hi + float(sd_hi[0])
        if low >= lo_ok and high <= hi_ok:
            return None
        return (
            f"the data's signal (1st-99th percentile {low:.6g}-{high:.6g}) reaches beyond the signals the histogram noise "
            f"model was fitted on ({lo:.6g}-{hi:.6g}, plus one noise std: {lo_ok:.6g}-{hi_ok:.6g}); predictions there are "
            "biased: calibrate over the data's whole intensity range, or use a GMM noise model (it extrapolates)"
        )

    def set_normalization(self, mean: Any, std: Any) -> None:
        super().set_normalization(mean, std)
        # The data's mean must lie inside the noise model's range whatever its tails do: a
        # mean outside means another intensity scale (e.g. a model fitted on other data).
        for m in self.norm_mean.tolist():
            self.check_data_range(m, m)

    # ---- the protocol ----------------------------------------------------------------------
    def _samples(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Network output as raw-unit samples ``(B, C, K, *spatial)``."""
        out = self.net(x_norm)
        b, c, k = out.shape[0], self.config.in_channels, self.config.n_samples
        out = out.reshape((b, c, k) + tuple(out.shape[2:]))
        mean = self.norm_mean.reshape((1, c, 1) + (1,) * (out.ndim - 3))
        std = self.norm_std.reshape((1, c, 1) + (1,) * (out.ndim - 3))
        return out * std + mean

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self._range_checked:
            # The first batch already shows whether data and noise model share a scale.
            self.check_data_range(float(batch.min()), float(batch.max()))
            self._range_checked = True
        x = self.normalize(batch)
        masked, mask = self.blind_spot_mask(x, generator)
        samples = self._samples(masked)  # (B, C, K, *spatial)
        picked = samples.movedim(2, -1)[mask]  # (N, K) at the masked pixels
        return marginal_nll(self.noise_model, batch[mask], picked).mean()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        samples = self._samples(self.normalize(x))
        if self.estimate == "prior":
            return prior_mean(samples.movedim(2, -1))
        flat_s = samples.movedim(2, -1).reshape(-1, self.config.n_samples)
        flat_x = x.reshape(-1)
        step = max(1, _EVAL_BUDGET // self.config.n_samples)
        out = torch.cat(
            [
                mmse_estimate(self.noise_model, flat_x[i : i + step], flat_s[i : i + step])
                for i in range(0, flat_x.numel(), step)
            ]
        )
        return out.reshape(x.shape)
