"""Bayesian blind-spot denoising (Laine et al. 2019, "High-quality self-supervised deep image
denoising").

A :class:`~quietscope.nets.blindspot.BlindSpotNet` predicts, for every pixel and from its
neighbourhood only, a *prior* over the clean value. Because the prediction never sees the pixel
itself, the observed value is an independent draw from prior x noise model, so the network is
trained by maximising the *marginal* likelihood of every observed pixel (no masking). At
inference the pixel is folded back in through the posterior mean, which is what the blind-spot
methods without a prior throw away.

Two noise models:

``bayes-poisson``
    Photon counting: ``x ~ Poisson(lambda)`` with a Gamma(alpha, beta) prior on ``lambda``;
    the marginal is negative binomial and the posterior is Gamma(alpha + x, beta + 1).
``bayes-gauss``
    Additive Gaussian noise of standard deviation ``sigma_n`` with a Gaussian prior
    N(mu, sigma_p^2); the marginal is N(mu, sigma_p^2 + sigma_n^2).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from quietscope.methods.base import Method, MethodConfig, NetConfig, register
from quietscope.nets.blindspot import BlindSpotNet, check_tile_shape

__all__ = [
    "BayesGauss",
    "BayesGaussConfig",
    "BayesPoisson",
    "BayesPoissonConfig",
    "gamma_poisson_posterior_mean",
    "gaussian_marginal_nll",
    "gaussian_posterior_mean",
    "negative_binomial_nll",
]

# log(alpha) is clamped: above ~e^14 the Gamma prior is a spike and the negative binomial is
# a Poisson to float64 precision; below e^-12 it is flat. Beyond either end nothing changes.
_LOG_ALPHA_MIN, _LOG_ALPHA_MAX = -12.0, 14.0
_MIN_RATE = 1e-6  # photons; keeps the prior mean strictly positive
_MIN_PRIOR_SIGMA = 1e-3  # normalised units
# A learned sigma_n (normalised units, log-parametrised so it moves by factors) starts at the
# data's standard deviation, an upper bound: the likelihood pulls an over-estimate down
# quickly, whereas an under-estimate is pushed up only by the weak balance term below, and
# meanwhile the posterior barely denoises.
_NOISE_LOG_SIGMA_INIT = 0.0
# The marginal only constrains sigma_p^2 + sigma_n^2; a small reward for a larger global
# sigma_n breaks the tie in favour of explaining pixel-independent variance as noise
# (the "balance regularisation" of Laine et al.).
_NOISE_BALANCE_WEIGHT = 0.05


# ---- likelihoods and posteriors (pure functions) -------------------------------------------
def negative_binomial_nll(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Negative log marginal likelihood of counts x ~ Poisson(lambda), lambda ~ Gamma(alpha, beta).

    The marginal is the negative binomial ``NB(n=alpha, p=beta / (beta + 1))``:

    ``log p(x) = lgamma(x + alpha) - lgamma(alpha) - lgamma(x + 1)
    + alpha * log(beta / (beta + 1)) - x * log(beta + 1)``.

    Parameters
    ----------
    x : torch.Tensor
        Observed photon counts. Need not be integers (camera photon estimates are not);
        negative values (read noise around zero) are clamped to 0.
    alpha, beta : torch.Tensor
        Shape and rate of the Gamma prior, both > 0, broadcastable against ``x``.

    Returns
    -------
    torch.Tensor
        Element-wise negative log-likelihood, same shape as the broadcast inputs.

    Notes
    -----
    ``lgamma(x + alpha) - lgamma(alpha)`` cancels catastrophically for large ``alpha`` in
    float32; pass float64 tensors when ``alpha`` can exceed ~1e4.
    """
    x = torch.clamp(x, min=0)
    log_p = (
        torch.lgamma(x + alpha)
        - torch.lgamma(alpha)
        - torch.lgamma(x + 1)
        # log1p forms stay accurate for beta -> 0 and beta -> inf alike.
        - alpha * torch.log1p(1 / beta)
        - x * torch.log1p(beta)
    )
    return -log_p


def gamma_poisson_posterior_mean(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Posterior mean of lambda given count ``x``, Poisson likelihood, Gamma(alpha, beta) prior.

    The posterior is Gamma(alpha + x, beta + 1), so its mean is ``(alpha + x) / (beta + 1)``.
    Negative ``x`` is clamped to 0, as in :func:`negative_binomial_nll`.
    """
    return (alpha + torch.clamp(x, min=0)) / (beta + 1)


def gaussian_marginal_nll(
    x: torch.Tensor, mu: torch.Tensor, prior_var: torch.Tensor, noise_var: torch.Tensor
) -> torch.Tensor:
    """Negative log marginal likelihood of ``x = s + n`` with Gaussian prior and noise.

    ``s ~ N(mu, prior_var)`` and ``n ~ N(0, noise_var)``, so the marginal is
    ``N(mu, prior_var + noise_var)``. Returns the element-wise NLL,
    including the ``0.5 * log(2 pi)`` constant.
    """
    var = prior_var + noise_var
    return 0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mu) ** 2 / var)


def gaussian_posterior_mean(
    x: torch.Tensor, mu: torch.Tensor, prior_var: torch.Tensor, noise_var: torch.Tensor
) -> torch.Tensor:
    """Posterior mean of the clean value ``s`` given ``x = s + n`` (Gaussian prior and noise).

    ``E[s | x] = (noise_var * mu + prior_var * x) / (prior_var + noise_var)``: a per-pixel
    blend of the network's prediction and the observation, weighted by their precisions.
    """
    return (noise_var * mu + prior_var * x) / (prior_var + noise_var)


# ---- configurations ----------------------------------------------------------------------
class _BayesConfig(MethodConfig):
    """Fields shared by the Bayesian blind-spot methods.

    ``net.depth`` and ``net.filters`` shape the blind-spot network. ``net.batch_norm`` is
    ignored: normalising over space in training would let the centre pixel into its own
    prediction through the batch statistics.
    """

    @field_validator("net")
    @classmethod
    def _no_n2v2(cls, net: NetConfig) -> NetConfig:
        if net.n2v2:
            raise ValueError("n2v2 applies to the n2v method only; remove net.n2v2")
        return net


class BayesPoissonConfig(_BayesConfig):
    """Configuration of ``bayes-poisson``: converts input units (ADU) to photons."""

    gain: float | None = Field(
        None,
        gt=0,
        description="ADU per photon: photons = (x - offset) / gain; omit if data are photons",
    )
    offset: float = Field(0.0, description="camera offset (ADU) subtracted before the gain")


class BayesGaussConfig(_BayesConfig):
    """Configuration of ``bayes-gauss``."""

    noise_sigma: float | None = Field(
        None,
        gt=0,
        description="std of the additive Gaussian noise in input units; learned when omitted",
    )


# ---- methods -------------------------------------------------------------------------------
class _BlindSpotBayes(Method):
    """Shared plumbing: the blind-spot net predicts two maps per input channel.

    ``estimate`` (``quietscope predict --estimate``) picks the output: ``"mmse"``, the
    posterior mean (default), or ``"prior"``, the prior mean, which never sees the pixel
    itself (what a blind-spot method without a noise model returns): writing both shows
    what folding the pixel back in adds.
    """

    inference_options: ClassVar[tuple[str, ...]] = ("estimate",)
    estimate_choices: ClassVar[tuple[str, ...]] = ("mmse", "prior")

    def __init__(self, config: _BayesConfig) -> None:
        super().__init__(config)
        self.estimate: Literal["mmse", "prior"] = "mmse"
        c = config.in_channels
        self.net = BlindSpotNet(
            config.spatial_ndim,
            in_channels=c,
            out_channels=2 * c,
            depth=config.net.depth,
            filters=config.net.filters,
        )

    @property
    def downsampling_factor(self) -> int:
        return self.net.downsampling_factor

    def _net_outputs(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tile_shape(x_raw.shape, self.config.spatial_ndim, self.downsampling_factor)
        out = self.net(self.normalize(x_raw))
        c = self.config.in_channels
        return out[:, :c], out[:, c:]


def _loss_dtype(device: torch.device) -> torch.dtype:
    # float64 avoids cancellation in lgamma differences; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


@register
class BayesPoisson(_BlindSpotBayes):
    """Bayesian blind-spot denoising of photon-counting data (Poisson noise, Gamma prior).

    The network input is the normalised raw tile; the prior and the likelihood live in
    photons (``(x - offset) / gain``). Output is the posterior mean in input units.
    """

    name: ClassVar[str] = "bayes-poisson"
    Config: ClassVar[type[MethodConfig]] = BayesPoissonConfig
    config: BayesPoissonConfig

    @property
    def gain(self) -> float:
        """ADU per photon (1 when the data are already photons)."""
        return 1.0 if self.config.gain is None else float(self.config.gain)

    def to_photons(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Convert input units to (not clamped) photon counts."""
        return (x_raw - self.config.offset) / self.gain

    def from_photons(self, photons: torch.Tensor) -> torch.Tensor:
        """Convert photon counts back to input units."""
        return photons * self.gain + self.config.offset

    def _prior(
        self, x_raw: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o_mean, o_shape = (o.to(dtype) for o in self._net_outputs(x_raw))
        nd = x_raw.ndim
        scale = (self._bcast(self.norm_std, nd) / self.gain).to(dtype)
        centre = ((self._bcast(self.norm_mean, nd) - self.config.offset) / self.gain).to(dtype)
        # A softplus scaled to the data's photon spread: the prior mean is ~linear in the net
        # output (in normalised units) across the data range and positive everywhere, for
        # dim and bright data alike.
        rate_mean = scale * F.softplus(o_mean + centre / scale) + _MIN_RATE
        alpha = torch.exp(torch.clamp(o_shape, _LOG_ALPHA_MIN, _LOG_ALPHA_MAX))
        # Parametrised by mean and shape, which the net can reach from normalised features;
        # the Gamma rate follows as shape / mean.
        return alpha, alpha / rate_mean

    def prior_parameters(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel Gamma prior (shape ``alpha``, rate ``beta``) over the photon rate.

        Parameters
        ----------
        x_raw : torch.Tensor
            ``(B, C, *spatial)`` tile in input units, spatial sizes multiples of
            :attr:`downsampling_factor`.

        Returns
        -------
        alpha, beta : torch.Tensor
            Each ``(B, C, *spatial)``; prior mean ``alpha / beta`` photons. Neither depends
            on the pixel's own value.
        """
        return self._prior(x_raw, x_raw.dtype)

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mean negative-binomial NLL (per pixel, in photons) of every pixel of ``batch``."""
        dtype = _loss_dtype(batch.device)
        alpha, beta = self._prior(batch, dtype)
        photons = self.to_photons(batch.to(dtype))
        return negative_binomial_nll(photons, alpha, beta).mean().to(batch.dtype)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``(alpha + x) / (beta + 1)`` of the photon rate (or, with
        ``estimate="prior"``, the prior mean ``alpha / beta``), in input units."""
        alpha, beta = self._prior(x, x.dtype)
        if self.estimate == "prior":
            return self.from_photons(alpha / beta)
        return self.from_photons(gamma_poisson_posterior_mean(self.to_photons(x), alpha, beta))

    def summary(self) -> dict[str, Any]:
        return {"gain": self.gain, "offset": self.config.offset, "noise_model": "poisson",
                "estimate": self.estimate}


@register
class BayesGauss(_BlindSpotBayes):
    """Bayesian blind-spot denoising with additive Gaussian noise and a Gaussian prior.

    The noise standard deviation is either given (``noise_sigma``, input units) or learned
    as one parameter per channel. Everything is computed in normalised units, where the
    posterior mean is the same affine-equivariant blend as in input units.
    """

    name: ClassVar[str] = "bayes-gauss"
    Config: ClassVar[type[MethodConfig]] = BayesGaussConfig
    config: BayesGaussConfig

    def __init__(self, config: BayesGaussConfig) -> None:
        super().__init__(config)
        if config.noise_sigma is None:
            # One per channel: detectors of different channels have different noise.
            self.noise_log_sigma = torch.nn.Parameter(
                torch.full((config.in_channels,), _NOISE_LOG_SIGMA_INIT)
            )
        else:
            self.register_parameter("noise_log_sigma", None)

    @property
    def learns_noise(self) -> bool:
        return self.config.noise_sigma is None

    def _noise_sigma_normalised(self) -> torch.Tensor:
        if self.noise_log_sigma is None:
            return self.config.noise_sigma / self.norm_std
        return torch.exp(self.noise_log_sigma)

    @property
    def noise_sigma(self) -> torch.Tensor:
        """Noise standard deviation per channel, in input units (given or learned)."""
        return (self._noise_sigma_normalised() * self.norm_std).detach()

    def _prior_normalised(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, o_sigma = self._net_outputs(x_raw)
        sigma_p = F.softplus(o_sigma) + _MIN_PRIOR_SIGMA
        return mu, sigma_p**2

    def prior_parameters(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel Gaussian prior (mean, standard deviation) of the clean value, input units.

        Neither output depends on the pixel's own value.
        """
        mu, prior_var = self._prior_normalised(x_raw)
        std = self._bcast(self.norm_std, x_raw.ndim)
        return self.denormalize(mu), prior_var.sqrt() * std

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mean Gaussian marginal NLL (normalised units) of every pixel of ``batch``."""
        mu, prior_var = self._prior_normalised(batch)
        sigma_n = self._bcast(self._noise_sigma_normalised(), batch.ndim)
        nll = gaussian_marginal_nll(self.normalize(batch), mu, prior_var, sigma_n**2).mean()
        if self.learns_noise:
            nll = nll - _NOISE_BALANCE_WEIGHT * sigma_n.mean()
        return nll

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean of the clean value (or, with ``estimate="prior"``, the prior mean),
        in input units."""
        mu, prior_var = self._prior_normalised(x)
        if self.estimate == "prior":
            return self.denormalize(mu)
        sigma_n = self._bcast(self._noise_sigma_normalised(), x.ndim)
        post = gaussian_posterior_mean(self.normalize(x), mu, prior_var, sigma_n**2)
        return self.denormalize(post)

    def summary(self) -> dict[str, Any]:
        return {
            "noise_model": "gauss",
            "noise_sigma": [float(s) for s in self.noise_sigma],
            "noise_sigma_learned": self.learns_noise,
            "estimate": self.estimate,
        }
