"""denoiSplit (Ashesh & Jug) and its μSplit baseline: split a superimposed, noisy image into
its structures with a hierarchical VAE trained on noisy single-structure acquisitions only.

Training data has one channel per structure (``C`` ≥ 2, noisy, no clean data). Each step forms
the network input as the weighted sum of a batch's channels and asks the ladder VAE
(:class:`~quietscope.nets.ladder_vae.LadderVAE`) to explain every *noisy* channel:

* ``denoisplit`` – reconstruction ``-log p_NM,c(x_c | s_c)`` with one pixel noise model per
  channel (so the decoder outputs the clean signals ``s_c``); each level's KL is summed over its
  latent pixels (a proper ELBO, scaled per image pixel), with free bits per level and sample;
  the noise-model NLL is averaged over channels.
* ``musplit`` – Gaussian likelihood on the normalised channels (learned or fixed variance),
  averaged over channels and pixels; each level's KL divided by its latent C·H·W, then averaged
  over levels (juglab/uSplit's formulation).

Options that speed learning the split (``docs/methods/denoisplit.md``): lateral context
(``context_levels``), MicroSplit's likelihood/KL mix (``gaussian_weight``), a μSplit-KL warm
start (``kl_warmup``); :meth:`DenoiSplit.validation_metrics` gives the training loop a keep-best
criterion that sees splitting.

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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quietscope.errors import ConfigError
from quietscope.methods.base import Method, MethodConfig, register
from quietscope.nets.ladder_vae import LadderVAE, LevelStats
from quietscope.nets.lateral_context import centre_crop, contexts_by_reflection, contexts_from_field, field_size
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
    free_bits: float | None = Field(
        None, ge=0, description="nats per level and sample below which KL is not penalised (None: 1 for denoisplit, 0 for musplit)"
    )
    context_levels: int = Field(0, ge=0, le=5, description="lateral-context inputs (2x, 4x, ... coarser fields; 2D only)")
    gaussian_weight: float = Field(
        0.0, ge=0, le=1, description="denoisplit: share of a fixed-variance Gaussian likelihood mixed into the noise-model one (MicroSplit: 0.1)"
    )
    kl_warmup: int = Field(
        0, ge=0, description="denoisplit: training steps with μSplit's latent-size-scaled KL before the summed ELBO KL"
    )
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
        if self.context_levels > self.net.depth:
            raise ValueError(f"context_levels {self.context_levels} cannot exceed the latent levels (--depth {self.net.depth})")
        if self.context_levels and self.spatial_ndim != 2:
            raise ValueError("lateral context (context_levels > 0) is implemented for 2D data only")
        return self

    @property
    def effective_free_bits(self) -> float:
        """denoiSplit keeps 1 nat per level; μSplit's reference uses none."""
        if self.free_bits is not None:
            return self.free_bits
        return 1.0 if self.method == "denoisplit" else 0.0


def neighbour_mean(x: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Mean of each pixel's ``(2·radius + 1)^d − 1`` neighbours, the pixel itself left out
    (reflected at the borders); ``x`` is ``(B, 1, *spatial)``.

    A foreground mask from it does not depend on the pixel's own noise, so the pixels it selects
    carry unbiased noise in their targets.
    """
    nd = x.ndim - 2
    k = torch.ones((1, 1) + (2 * radius + 1,) * nd, dtype=x.dtype, device=x.device)
    k[(0, 0) + (radius,) * nd] = 0
    conv = F.conv2d if nd == 2 else F.conv3d
    return conv(F.pad(x, [radius] * (2 * nd), mode="reflect"), k / k.sum())


def signal_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of the clean signals under two noisy images whose noise is independent from
    pixel to pixel and between the images.

    The cross-covariance of the noisy images is the signals' own (the noises do not correlate),
    but each variance carries its noise's; the covariance of each image with itself shifted by
    one pixel (averaged over the spatial axes) carries no noise and is close to the signal's
    variance wherever the signal is smooth at the pixel scale. The plain correlation of noisy
    images falls with the noise (W2S mito + actin at high noise: 0.26 for stains correlated
    0.389); this estimate gave 0.393 there (``docs/methods/denoisplit.md``).

    Parameters
    ----------
    a, b : torch.Tensor
        Noisy images of the same shape ``(N, *spatial)``: N fields, pooled.

    Returns
    -------
    float
        The estimate, clipped to [-1, 1].
    """
    a, b = a - a.mean(), b - b.mean()

    def lag1(x: torch.Tensor) -> torch.Tensor:
        axes = range(1, x.ndim)
        return torch.stack([(x.narrow(d, 1, x.shape[d] - 1) * x.narrow(d, 0, x.shape[d] - 1)).mean() for d in axes]).mean()

    den = (lag1(a).clamp(min=1e-12) * lag1(b).clamp(min=1e-12)).sqrt()
    return float(((a * b).mean() / den).clamp(-1.0, 1.0))


def kl_loss(stats: list[LevelStats], formulation: Literal["sum", "mean"], free_bits: float, image_pixels: int) -> torch.Tensor:
    """KL term of the loss from each level's element-wise KL.

    ``sum`` (denoiSplit): per level and sample, KL summed over latent channels and pixels,
    clamped below at ``free_bits``, averaged over the batch, summed over levels, and divided by
    the image's pixels so it sits on the same per-pixel scale as the reconstruction term.
    ``mean`` (μSplit, juglab/uSplit ``get_kl_divergence_loss_usplit``): per level and sample,
    KL divided by the level's latent elements (channels × pixels), clamped at ``free_bits``
    (μSplit: 0), averaged over the batch and then *averaged* over levels.
    """
    per_level = []
    for st in stats:
        per_sample = st.summed() if formulation == "sum" else st.summed() / st.n_elements
        per_level.append(per_sample.clamp(min=free_bits).mean() if free_bits > 0 else per_sample.mean())
    total = torch.stack(per_level)
    return total.sum() / image_pixels if formulation == "sum" else total.mean()


#: Lower bound of μSplit's learned log-variance (normalised units), as juglab/uSplit's
#: ``logvar_lowerbound``: below it a few confident pixels dominate the loss.
LOGVAR_FLOOR = -5.0


@register
class DenoiSplit(Method):
    """denoiSplit: joint splitting and unsupervised denoising (ladder VAE + noise models)."""

    name: ClassVar[str] = "denoisplit"
    Config = DenoiSplitConfig
    inference_options: ClassVar[tuple[str, ...]] = ("n_samples", "seed")
    #: The recipe of the learning-curve benchmark (docs/methods/denoisplit.md, "Training recipe"):
    #: a CPU-sized ladder VAE on 32² patches with 2 lateral-context levels (128² field), 80 %
    #: foreground patches, Adam 1e-3, MicroSplit's 0.9/0.1 likelihood mix, μSplit-KL warm start.
    #: 32 filters and 16 latent channels (298 k parameters, ~17 CPU minutes for 6000 steps): on W2S
    #: at moderate noise its last weights were 0.7 / 1.3 dB (RI-PSNR, mean of 3 seeds and a CLI run)
    #: above those of 16 filters / 8 channels, and the only ones found separated (docs/benchmarks.md §5).
    #: The last weights, not the "best": every held-apart criterion measured against noisy
    #: targets (plain, blind, affine-invariant) preferred unsplit checkpoints on W2S, where the
    #: last ones were split (docs/benchmarks.md §5); the cosine schedule ends at 5 % of the base rate.
    recommended_options: ClassVar[dict[str, Any]] = {
        "patch": "32", "batch": 8, "steps": 6000, "lr": 1e-3, "depth": 3, "filters": 32, "foreground": 0.8, "keep": "last",
        "params": {"context_levels": 2, "latent_channels": 16, "gaussian_weight": 0.1, "kl_warmup": 300},
    }
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
        # Side of the training patch the lateral context is built for (set by prepare_training,
        # stored as a buffer so the model file carries it).
        self.register_buffer("context_patch", torch.tensor(0, dtype=torch.int64))
        # Training steps taken (train-mode loss evaluations): drives the KL warm-up and travels
        # in checkpoints, so a resumed run switches at the same step.
        self.register_buffer("steps_seen", torch.tensor(0, dtype=torch.int64))
        # The padding per context level (P / 4) changes no weight shapes: the real patch is
        # set by prepare_training / the buffer; 64 is a placeholder until then.
        self.net = LadderVAE(
            config.spatial_ndim,
            1,
            2 * c if self.learned_var else c,
            levels=config.net.depth,
            filters=config.net.filters,
            latent_channels=config.latent_channels,
            res_blocks=config.res_blocks,
            context_levels=config.context_levels,
            context_patch=64,
        )
        self.noise_models = torch.nn.ModuleList()
        if config.method == "denoisplit" and config.noise_models is not None:

            self.noise_models.extend(noise_model_from_dict(d) for d in config.noise_models)

    # ---- lateral context -----------------------------------------------------------
    def prepare_training(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        """Record the training patch and return the field to sample: ``2**K`` times larger
        with ``K = context_levels`` (the patch is its centre, the rest its lateral context)."""
        k = self.config.context_levels
        if not k:
            return tuple(patch)
        if len(set(patch)) != 1:
            raise ConfigError(f"lateral context needs a square patch, got {patch}")
        p = int(patch[0])
        need = max(4, 2 ** (k + 1), self.downsampling_factor)
        if p % need:
            raise ConfigError(f"--patch {p} must be a multiple of {need} with context_levels={k}")
        if int(self.context_patch) != p:
            # The padding per level is P / 4: a new patch size changes no weight shapes.
            self.context_patch.fill_(p)
            self.net.context_patch = p
        return tuple(field_size(p, k) for _ in patch)

    def _check_context(self) -> int:
        p = int(self.context_patch)
        if self.config.context_levels and p == 0:
            raise ConfigError(f"{self.name} with lateral context has no training patch recorded; train it first")
        self.net.context_patch = p
        return p

    def _net_inputs(self, field: torch.Tensor, inner: tuple[int, ...] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised superimposed patch and its contexts; ``inner=None``: the tile is the patch
        and its surroundings are reflected (prediction)."""
        k = self.config.context_levels
        if not k:
            return field, []
        p = self._check_context()
        if inner is None:
            return field, contexts_by_reflection(field, p, k)
        return centre_crop(field, inner), contexts_from_field(field, inner, p, k)

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
    def gaussian_nll(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL of the normalised targets, averaged over channels and pixels (μSplit).

        The learned log-variance is floored at :data:`LOGVAR_FLOOR`; without a learned variance
        it is ``gaussian_logvar`` (0, a scaled mean-squared error, for denoiSplit's mixture).
        """
        c = self.config.in_channels
        t = self.normalize(targets)
        mu = out[:, :c]
        if self.learned_var:
            lv = out[:, c:].clamp(LOGVAR_FLOOR, 10)
        else:
            lv = torch.full_like(mu, float(self.config.gaussian_logvar or 0.0))
        return (0.5 * ((t - mu) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi))).mean()

    def reconstruction_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-pixel negative log-likelihood of the noisy channels, averaged over channels.

        denoisplit: the noise models' NLL, mixed with a share ``gaussian_weight`` of the
        Gaussian NLL (MicroSplit's 0.9 / 0.1); musplit: the Gaussian NLL.
        """
        c = self.config.in_channels
        if self.config.method != "denoisplit":
            return self.gaussian_nll(out, targets)
        s = self.denormalize(out[:, :c])
        nll = torch.stack([-nm.log_likelihood(targets[:, i], s[:, i]).mean() for i, nm in enumerate(self.noise_models)]).mean()
        w = self.config.gaussian_weight
        return (1 - w) * nll + w * self.gaussian_nll(out, targets) if w > 0 else nll

    def forward_train(
        self, batch: torch.Tensor, gen: torch.Generator | None
    ) -> tuple[torch.Tensor, list[LevelStats], torch.Tensor]:
        """One sampled pass on a training batch ``(B, C, *field)``: outputs, level KLs, and the
        targets they are scored against (the central patch of the field)."""
        inner = self._inner_shape(tuple(batch.shape[2:]))
        x, ctx = self._net_inputs(self._normalize_input(self.superimpose(batch)), inner)
        out, stats = self.net(x, "sample", gen, ctx)
        return out, stats, centre_crop(batch, inner) if ctx else batch

    def _inner_shape(self, field: tuple[int, ...]) -> tuple[int, ...]:
        k = self.config.context_levels
        if not k:
            return field
        p = self._check_context()
        if any(f != field_size(p, k) for f in field):
            raise ConfigError(f"{self.name}: training field {field} must be {field_size(p, k)} per axis (patch {p}, {k} context levels)")
        return (p,) * len(field)

    def kl_term(self, stats: list[LevelStats], image_pixels: int) -> torch.Tensor:
        """The KL of the loss: μSplit's for musplit and during denoiSplit's ``kl_warmup``.

        With ``gaussian_weight = w`` denoiSplit's KL is mixed like its likelihood,
        ``(1 - w)`` summed ELBO KL + ``w`` μSplit KL (MicroSplit's ``denoisplit_musplit`` loss).
        """
        cfg = self.config
        warm = cfg.method == "denoisplit" and int(self.steps_seen) < cfg.kl_warmup
        if cfg.method == "denoisplit" and not warm:
            summed = kl_loss(stats, "sum", cfg.effective_free_bits, image_pixels)
            w = cfg.gaussian_weight
            return (1 - w) * summed + w * kl_loss(stats, "mean", 0.0, image_pixels) if w > 0 else summed
        return kl_loss(stats, "mean", 0.0 if warm else cfg.effective_free_bits, image_pixels)

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if batch.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"{self.name} was configured for {self.config.in_channels} channels but the batch has {batch.shape[1]}"
            )
        out, stats, targets = self.forward_train(batch, generator)
        kl = self.kl_term(stats, math.prod(targets.shape[2:]))
        if self.training:
            self.steps_seen += 1
        return self.reconstruction_loss(out, targets) + self.config.kl_weight * kl

    #: Validation fields predicted per forward pass (bounds the memory of a validation).
    VAL_CHUNK: ClassVar[int] = 8

    def validation_metrics(self, batch: torch.Tensor) -> dict[str, float]:
        """Splitting on the validation fields, from the posterior means of the whole fields.

        ``select`` (lower is better; the keep-best criterion) is the per-channel mean squared
        error against the noisy targets on foreground pixels, each channel divided by its
        variance there: background dominates the loss and barely moves, while an unsplit output
        (each channel ~ half the input) is wrong exactly on the structures. Each field is
        predicted whole, as ``predict`` does (contexts by reflection), not only its centre patch:
        scored on the 32² centres of 16 fields the criterion moved more from check to check
        than the split did and kept unsplit steps; on a whole held-apart 512² field it kept a
        separated one (docs/benchmarks.md §5). Foreground is where the mean of a pixel's
        neighbours (:func:`neighbour_mean`), not the pixel itself, is above the fields' mean:
        a mask taken from the noisy sum would select pixels whose target noise is positive.
        ``corr_outputs`` is the correlation of the two predicted channels (1 = not split);
        ``corr_stains`` estimates, from the noisy targets of the same fields, what the clean
        structures' correlation is there (:func:`signal_correlation`). The log shows both: while
        the outputs correlate far above it the network has not begun to split; separated steps
        on W2S sat 0.04-0.26 below it, so it is no finish line (docs/benchmarks.md §5).
        """
        with torch.no_grad():
            pred = torch.cat([self._posterior_mean(b) for b in batch.split(self.VAL_CHUNK)])
            local = neighbour_mean(batch.sum(1, keepdim=True))[:, 0]
            fg = local > local.mean()
            errs = []
            for i in range(batch.shape[1]):
                t, p = batch[:, i][fg], pred[:, i][fg]
                errs.append(float(((t - p) ** 2).mean() / t.var().clamp(min=1e-12)))
            a, b = pred[:, 0].flatten(), pred[:, 1].flatten()
            a, b = a - a.mean(), b - b.mean()
            corr = float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp(min=1e-12))
            stains = signal_correlation(batch[:, 0], batch[:, 1])
        return {"select": sum(errs) / len(errs), "corr_outputs": corr, "corr_stains": stains}

    # ---- prediction -------------------------------------------------------------------
    def _signal(self, out: torch.Tensor) -> torch.Tensor:
        return self.denormalize(out[:, : self.config.in_channels])

    def _posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The split signals of a whole tile ``x`` (superimposed, or the separate channels) by
        the posterior-mean path, raw units ``(B, C, *S)``."""
        inp, ctx = self._net_inputs(self._normalize_input(self._as_superimposed(x)), None)
        return self._signal(self.net(inp, "mean", None, ctx)[0])

    def predict_samples(self, x: torch.Tensor, n_samples: int, seed: int | None) -> torch.Tensor:
        """``n_samples`` posterior samples of the split signals, ``(N, B, C, *S)`` raw units.

        ``seed=None`` draws fresh noise; an integer makes the samples a function of the input.
        """
        inp, ctx = self._net_inputs(self._normalize_input(self._as_superimposed(x)), None)
        feats = self.net.bottom_up(inp, ctx)
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        shape = tuple(x.shape[2:])
        return torch.stack([self._signal(self.net.top_down(feats, "sample", gen, shape)[0]) for _ in range(n_samples)])

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
            mean = self._posterior_mean(x)
            std = torch.zeros_like(mean)
        else:
            samples = self.predict_samples(x, self.n_samples, self.seed)
            mean = samples.mean(0)
            std = samples.std(0, unbiased=False) if self.n_samples > 1 else torch.zeros_like(mean)
        return torch.cat([mean, self.calibrate_std(std)], dim=1)

    def summary(self) -> dict[str, Any]:
        return {
            "levels": self.config.net.depth,
            "context_levels": self.config.context_levels,
            "context_patch": int(self.context_patch),
            "n_samples": self.n_samples,
            "seed": self.seed,
            "halo": "measured receptive field of the seeded (deterministic) sampling path, uncapped",
            "calibrated": self.config.calibration is not None,
        }


@register
class MuSplit(DenoiSplit):
    """μSplit baseline: same ladder VAE, Gaussian likelihood, KL per latent element, mean over levels."""

    name: ClassVar[str] = "musplit"
    # denoiSplit's recipe without its likelihood mix and KL warm start (denoiSplit-only options),
    # so the two baselines are compared at one net size and budget.
    recommended_options: ClassVar[dict[str, Any]] = {
        **DenoiSplit.recommended_options,
        "params": {k: v for k, v in DenoiSplit.recommended_options["params"].items() if k not in ("gaussian_weight", "kl_warmup")},
    }
