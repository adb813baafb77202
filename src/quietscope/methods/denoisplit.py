"""denoiSplit (Ashesh & Jug) and its μSplit baseline: split a superimposed, noisy image into
its structures with a hierarchical VAE trained on noisy single-structure acquisitions only.

Training data has one channel per structure (``C`` ≥ 2, noisy, no clean data). Each step forms
the network input as the weighted sum of a batch's channels and asks the ladder VAE
(:class:`~quietscope.nets.ladder_vae.LadderVAE`) to explain every *noisy* channel:

* ``denoisplit`` – reconstruction ``-log p_NM,c(x_c | s_c)`` with one pixel noise model per
  channel (so the decoder outputs the clean signals ``s_c``); each level's KL is summed over its
  latent pixels (a proper ELBO, scaled per image pixel), with free bits per level and sample.
* ``musplit`` – Gaussian likelihood on the normalised channels (learned or fixed variance),
  KL averaged over each level's latent pixels (μSplit's formulation).

Prediction (``predict``) takes the superimposed image (1 channel; or the ``C`` separate
channels, which it sums like training does) and returns, per structure, the MMSE estimate
(mean of ``n_samples`` posterior samples) and the per-pixel standard deviation of the samples,
scaled by a stored calibration when there is one.

Halo: sampling is a deterministic function of the input – every ``predict`` call draws its
latent noise from a generator seeded with ``seed`` – and the posterior-mean path (``n_samples=0``)
has the very same convolutions (``z = mu + exp(lv / 2) * eps`` with ``mu`` and ``lv`` from one
convolution), so both have one receptive field. The impulse probe of
:mod:`quietscope.nets.receptive_field` (which predicts in float64) is answered by the mean path,
``n_samples`` times cheaper; the measured field is the halo, uncapped (3 levels, 1 residual block: radius 90 px, halo 96). With sampling, tiles still draw *different* noise
(same seed, different tile), so stitched output equals whole-image output only in distribution;
the posterior-mean path is exact (see ``docs/methods/denoisplit.md`` for the measured seams).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quietscope.errors import ConfigError
from quietscope.methods.base import Method, MethodConfig, register
from quietscope.nets.ladder_vae import LadderVAE, LevelStats
from quietscope.noise_models import load_noise_model, noise_model_from_dict


class ChannelCalibration(BaseModel):
    """``std_calibrated = scale * std + offset`` for one output channel (raw units)."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(..., gt=0)
    offset: float = 0.0


class DenoiSplitConfig(MethodConfig):
    """Configuration of ``denoisplit`` / ``musplit``; ``net.depth`` = latent levels."""

    method: Literal["denoisplit", "musplit"] = "denoisplit"
    in_channels: int = Field(2, ge=2, le=8, description="structures (channels of the training data)")
    latent_channels: int = Field(16, ge=1, le=256)
    res_blocks: int = Field(1, ge=1, le=4, description="residual blocks per stage")
    mixing: list[float] | None = Field(None, description="weight of each channel in the superimposed input (default 1)")
    noise_models: list[dict[str, Any]] | None = Field(
        None, description="denoisplit: one noise model per channel (to_dict() or a JSON file path)"
    )
    gaussian_logvar: float | None = Field(None, description="musplit: fixed log-variance (normalised units); None = learned")
    kl_weight: float = Field(1.0, ge=0)
    free_bits: float = Field(1.0, ge=0, description="nats per level and sample below which KL is not penalised")
    n_samples: int = Field(8, ge=0, le=1000, description="posterior samples at prediction (0 = posterior means)")
    seed: int = Field(0, ge=0, description="seed of the latent noise drawn in each predict call")
    channel_names: list[str] | None = None
    calibration: list[ChannelCalibration] | None = None

    @field_validator("noise_models", mode="before")
    @classmethod
    def _load_files(cls, v: Any) -> Any:
        # File paths are read here so the config (and the model file) holds their content.
        if v is None:
            return v

        return [load_noise_model(d).to_dict() if isinstance(d, str) else d for d in v]

    @model_validator(mode="after")
    def _check(self) -> DenoiSplitConfig:
        c = self.in_channels
        for name in ("mixing", "noise_models", "channel_names", "calibration"):
            v = getattr(self, name)
            if v is not None and len(v) != c:
                raise ValueError(f"{name} has {len(v)} entries but the data has {c} channels")
        if self.mixing is not None and any(w <= 0 for w in self.mixing):
            raise ValueError("mixing weights must be > 0")
        if self.method == "denoisplit" and self.noise_models is None:
            raise ValueError(
                f"denoisplit needs one noise model per channel ({c}); pass "
                "--param 'noise_models=[\"ch0.json\",\"ch1.json\"]' (fit them with 'quietscope noise-model')"
            )
        if self.net.n2v2:
            raise ValueError("net.n2v2 does not apply to the ladder VAE")
        return self


def kl_loss(stats: list[LevelStats], formulation: Literal["sum", "mean"], free_bits: float, image_pixels: int) -> torch.Tensor:
    """KL term of the loss from each level's element-wise KL.

    ``sum`` (denoiSplit): per level and sample, KL summed over latent channels and pixels,
    clamped below at ``free_bits``, averaged over the batch, summed over levels, and divided by
    the image's pixels so it sits on the same per-pixel scale as the reconstruction term.
    ``mean`` (μSplit): as ``sum`` but each level's KL is averaged over its latent pixels and not
    rescaled afterwards.
    """
    total = torch.zeros((), dtype=stats[0].kl.dtype, device=stats[0].kl.device)
    for st in stats:
        per_sample = st.summed() if formulation == "sum" else st.averaged()
        total = total + per_sample.clamp(min=free_bits).mean()
    return total / image_pixels if formulation == "sum" else total


@register
class DenoiSplit(Method):
    """denoiSplit: joint splitting and unsupervised denoising (ladder VAE + noise models)."""

    name: ClassVar[str] = "denoisplit"
    Config = DenoiSplitConfig
    inference_options: ClassVar[tuple[str, ...]] = ("n_samples", "seed")
    # Its std channels are spreads of posterior samples; averaging them over rotated inputs
    # would not be the std of anything.
    supports_tta: ClassVar[bool] = False

    def __init__(self, config: DenoiSplitConfig) -> None:
        super().__init__(config)
        c = config.in_channels
        self.n_samples = config.n_samples
        self.seed = config.seed
        self.register_buffer("mixing", torch.tensor(config.mixing or [1.0] * c, dtype=torch.float32))
        gaussian = config.method == "musplit"
        self.learned_var = gaussian and config.gaussian_logvar is None
        self.net = LadderVAE(
            config.spatial_ndim,
            1,
            2 * c if self.learned_var else c,
            levels=config.net.depth,
            filters=config.net.filters,
            latent_channels=config.latent_channels,
            res_blocks=config.res_blocks,
        )
        self.noise_models = torch.nn.ModuleList()
        if not gaussian and config.noise_models is not None:

            self.noise_models.extend(noise_model_from_dict(d) for d in config.noise_models)

    # ---- shapes and names -------------------------------------------------------------
    @property
    def downsampling_factor(self) -> int:
        return self.net.downsampling_factor

    @property
    def predict_in_channels(self) -> int:
        return 1

    @property
    def channel_names(self) -> list[str]:
        return self.config.channel_names or [f"ch{i}" for i in range(self.config.in_channels)]

    @property
    def output_names(self) -> list[str]:
        return self.channel_names + [f"{n}_std" for n in self.channel_names]

    # ---- normalisation ----------------------------------------------------------------
    def input_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the superimposed input, from the per-channel statistics.

        The std assumes the channels are uncorrelated (separately acquired structures).
        """
        w = self.mixing
        mean = (w * self.norm_mean).sum()
        std = torch.sqrt(((w * self.norm_std) ** 2).sum()).clamp(min=1e-6)
        return mean, std

    def superimpose(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` separate channels -> ``(B, 1, *S)`` weighted sum (raw units)."""
        return (x * self._bcast(self.mixing.to(x.dtype), x.ndim)).sum(1, keepdim=True)

    def _normalize_input(self, inp: torch.Tensor) -> torch.Tensor:
        mean, std = self.input_stats()
        return (inp - mean.to(inp.dtype)) / std.to(inp.dtype)

    # ---- training ---------------------------------------------------------------------
    def reconstruction_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-pixel negative log-likelihood of the noisy channels, summed over channels."""
        c = self.config.in_channels
        if self.config.method == "denoisplit":
            s = self.denormalize(out[:, :c])
            nll = [-nm.log_likelihood(targets[:, i], s[:, i]).mean() for i, nm in enumerate(self.noise_models)]
            return torch.stack(nll).sum()
        t = self.normalize(targets)
        mu = out[:, :c]
        lv = out[:, c:].clamp(-10, 10) if self.learned_var else torch.full_like(mu, float(self.config.gaussian_logvar))
        return (0.5 * ((t - mu) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi))).mean(dim=(0, *range(2, mu.ndim))).sum()

    def forward_train(self, batch: torch.Tensor, gen: torch.Generator | None) -> tuple[torch.Tensor, list[LevelStats]]:
        """One sampled pass on a training batch ``(B, C, *patch)``: outputs and level KLs."""
        return self.net(self._normalize_input(self.superimpose(batch)), "sample", gen)

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if batch.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"{self.name} was configured for {self.config.in_channels} channels but the batch has {batch.shape[1]}"
            )
        out, stats = self.forward_train(batch, generator)
        formulation = "sum" if self.config.method == "denoisplit" else "mean"
        kl = kl_loss(stats, formulation, self.config.free_bits, math.prod(batch.shape[2:]))
        return self.reconstruction_loss(out, batch) + self.config.kl_weight * kl

    # ---- prediction -------------------------------------------------------------------
    def _signal(self, out: torch.Tensor) -> torch.Tensor:
        return self.denormalize(out[:, : self.config.in_channels])

    def predict_samples(self, x: torch.Tensor, n_samples: int, seed: int | None) -> torch.Tensor:
        """``n_samples`` posterior samples of the split signals, ``(N, B, C, *S)`` raw units.

        ``seed=None`` draws fresh noise; an integer makes the samples a function of the input.
        """
        feats = self.net.bottom_up(self._normalize_input(self._as_superimposed(x)))
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        return torch.stack([self._signal(self.net.top_down(feats, "sample", gen)[0]) for _ in range(n_samples)])

    def _as_superimposed(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config.in_channels
        if x.shape[1] == 1:
            return x
        if x.shape[1] == c:  # separate channels (e.g. the receptive-field probe): sum them
            return self.superimpose(x)
        raise ConfigError(f"{self.name} predicts from 1 superimposed channel (or {c} separate ones), got {x.shape[1]}")

    def calibrate_std(self, std: torch.Tensor) -> torch.Tensor:
        """Apply the stored per-channel calibration (if any) to std maps ``(B, C, *S)``."""
        cal = self.config.calibration
        if cal is None:
            return std
        scale = torch.tensor([c.scale for c in cal], dtype=std.dtype, device=std.device)
        offset = torch.tensor([c.offset for c in cal], dtype=std.dtype, device=std.device)
        return (std * self._bcast(scale, std.ndim) + self._bcast(offset, std.ndim)).clamp(min=0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Superimposed tile ``(B, 1, *S)`` -> ``(B, 2C, *S)``: MMSE of each channel, then stds.

        float64 input takes the posterior-mean path: only the receptive-field probe predicts in
        float64 (tiles are float32), and that path has exactly the convolutions of the sampling
        path at a fraction of the cost (``n_samples`` times fewer decoder passes).
        """
        if self.n_samples == 0 or x.dtype == torch.float64:
            out, _ = self.net(self._normalize_input(self._as_superimposed(x)), "mean")
            mean = self._signal(out)
            std = torch.zeros_like(mean)
        else:
            samples = self.predict_samples(x, self.n_samples, self.seed)
            mean = samples.mean(0)
            std = samples.std(0, unbiased=False) if self.n_samples > 1 else torch.zeros_like(mean)
        return torch.cat([mean, self.calibrate_std(std)], dim=1)

    def summary(self) -> dict[str, Any]:
        return {
            "levels": self.config.net.depth,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "halo": "measured receptive field of the seeded (deterministic) sampling path, uncapped",
            "calibrated": self.config.calibration is not None,
        }


@register
class MuSplit(DenoiSplit):
    """μSplit baseline: same ladder VAE, Gaussian likelihood, KL averaged over latent pixels."""

    name: ClassVar[str] = "musplit"
