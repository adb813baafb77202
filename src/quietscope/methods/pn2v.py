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

from quietscope.errors import ConfigError
from quietscope.methods.base import Method, register
from quietscope.methods.n2v import N2V, N2VConfig
from quietscope.nets.unet import UNet
from quietscope.noise_models import noise_model_from_dict
from quietscope.noise_models.base import NoiseModel

__all__ = [
    "PN2V",
    "PN2VConfig",
    "blind_spot_risk",
    "implied_prior_std",
    "marginal_nll",
    "mmse_estimate",
    "prior_mean",
    "spread_offsets",
]

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


def spread_offsets(n_samples: int) -> torch.Tensor:
    """``n_samples`` offsets of unit standard deviation and exactly zero mean: the standard
    normal's quantiles at ``(k + 1/2) / K``, re-centred and re-scaled. A warm-started PN2V adds
    them (times its prior std) to N2V's prediction, so its prior mean *is* N2V's prediction."""
    q = torch.special.ndtri((torch.arange(n_samples, dtype=torch.float64) + 0.5) / n_samples)
    q = q - q.mean()
    return (q / q.std(correction=0)).to(torch.float32)


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
    estimate: Literal["mmse", "prior"] = Field(
        "mmse",
        description="what prediction writes unless 'predict --estimate' says otherwise: the posterior mean "
        "(mmse) or the prior mean (prior; e.g. set by pn2v-boot when the prior mean scored best)",
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
        # The model file's default; ``set_inference(estimate=...)`` overrides it for one run.
        self.estimate: Literal["mmse", "prior"] = config.estimate
        self._range_checked = False
        # Set by warm_start: the N2V normalisation the copied weights expect must survive train().
        self._normalization_fixed = False

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
        if self._normalization_fixed:
            # Warm-started: N2V's weights expect N2V's normalisation; new statistics would
            # move the prior mean away from N2V's prediction before the first step.
            mean, std = self.norm_mean.clone(), self.norm_std.clone()
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

    def set_default_estimate(self, estimate: str) -> None:
        """Make ``estimate`` (``"mmse"`` or ``"prior"``) what this model predicts by default.

        Unlike ``set_inference`` it is part of the config, so a model file saved afterwards
        predicts it unless ``predict --estimate`` says otherwise.
        """
        self.set_inference(estimate=estimate)  # validates the value
        self.config = self.config.model_copy(update={"estimate": estimate})

    # ---- warm start from N2V ---------------------------------------------------------------
    def warm_start(self, n2v: N2V, prior_std: Any) -> None:
        """Start from a trained N2V network: PN2V's prior mean equals N2V's prediction.

        Every layer is copied; the head's ``K`` outputs per channel copy N2V's head output and
        add :func:`spread_offsets` times ``prior_std`` (raw units, one per channel), so at step 0
        the prior samples are spread by ``prior_std`` around N2V's prediction and their mean is
        that prediction to float rounding. N2V's normalisation is kept through training.

        Parameters
        ----------
        n2v : N2V
            A trained N2V or N2V2 method with the same network options and channels.
        prior_std : float or sequence of float
            Initial spread of the prior samples per channel, raw units
            (:func:`implied_prior_std`).

        Raises
        ------
        ConfigError
            ``n2v`` is not an N2V-family model, or its network or channels differ.
        """
        _check_warm_start_source(self, n2v)
        c, k = self.config.in_channels, self.config.n_samples
        state = {name: t.detach().clone() for name, t in n2v.net.state_dict().items()}
        w, b = state["head.weight"], state["head.bias"]
        state["head.weight"] = w.repeat_interleave(k, dim=0)
        std = torch.as_tensor(prior_std, dtype=torch.float32).reshape(-1).expand(c)
        # Offsets in normalised units: the head works before de-normalisation.
        offsets = spread_offsets(k)[None, :] * (std / n2v.norm_std.detach().cpu())[:, None]
        state["head.bias"] = (b[:, None] + offsets).reshape(-1)
        self.net.load_state_dict(state, strict=True)
        Method.set_normalization(self, n2v.norm_mean.detach().cpu(), n2v.norm_std.detach().cpu())
        self._normalization_fixed = True


def _check_warm_start_source(pn2v: PN2V, n2v: Any) -> None:
    if not isinstance(n2v, N2V) or isinstance(n2v, PN2V):
        got = getattr(n2v, "name", type(n2v).__name__)
        raise ConfigError(f"--init must be an N2V or N2V2 model (got {got!r}); train one with 'quietscope train --method n2v'")
    a, b = pn2v.config, n2v.config
    if (a.spatial_ndim, a.in_channels) != (b.spatial_ndim, b.in_channels):
        raise ConfigError(
            f"--init model is {b.spatial_ndim}D with {b.in_channels} channel(s) but the data are {a.spatial_ndim}D "
            f"with {a.in_channels}; warm-start from an N2V model trained on data like these"
        )
    if a.net != b.net:
        raise ConfigError(f"--init model's network ({b.net}) differs from this one ({a.net}); drop the network options")


def implied_prior_std(
    n2v: N2V, noise_model: NoiseModel, batch: torch.Tensor, generator: torch.Generator, draws: int = 8
) -> list[float]:
    """Per channel, the prior spread that N2V's blind-spot error and the noise model imply.

    On masked pixels the residual ``x - N2V(masked)`` holds N2V's own error plus the noise,
    so the error variance is the residual variance less the noise model's mean variance at
    N2V's predictions, floored at a tenth of the noise std (never a collapsed prior).

    Parameters
    ----------
    n2v : N2V
        The trained N2V (in eval mode).
    noise_model : NoiseModel
        The noise model PN2V trains with.
    batch : torch.Tensor, shape (B, C, *patch)
        Raw patches of the training data.
    generator : torch.Generator
        Draws the masks.
    draws : int
        Mask draws over ``batch``.

    Returns
    -------
    list of float
        One std per channel, raw units.
    """
    n2v.eval()
    res: list[list[torch.Tensor]] = [[] for _ in range(n2v.config.in_channels)]
    pred_all: list[list[torch.Tensor]] = [[] for _ in range(n2v.config.in_channels)]
    with torch.no_grad():
        for _ in range(draws):
            masked, mask = n2v.blind_spot_mask(n2v.normalize(batch), generator)
            pred = n2v.denormalize(n2v.net(masked))
            for ch in range(n2v.config.in_channels):
                m = mask[:, ch]
                res[ch].append(batch[:, ch][m] - pred[:, ch][m])
                pred_all[ch].append(pred[:, ch][m])
    out = []
    for ch in range(n2v.config.in_channels):
        r, p = torch.cat(res[ch]).double(), torch.cat(pred_all[ch]).double().numpy()
        _, nstd = noise_model.mean_std(p)
        noise_var = float(np.mean(nstd**2))
        out.append(math.sqrt(max(float(r.var()) - noise_var, 0.01 * noise_var)))
    return out


def blind_spot_risk(
    method: N2V,
    batch: torch.Tensor,
    variance: Any,
    generator: torch.Generator,
    draws: int = 8,
    valid: tuple[float, float] | None = None,
    estimate: Literal["mmse", "prior"] | None = None,
    reference: N2V | None = None,
) -> torch.Tensor:
    """Per-pixel unbiased estimates of the squared error of ``method``'s estimate at masked pixels.

    Stein's unbiased risk estimate (SURE) needs no clean image: for an estimate ``f(x_i)`` of
    pixel ``i``'s signal that depends on its own observation ``x_i`` (noise of variance ``v_i``
    given the signal) only through a smooth function, ``E[(f - s)^2] = E[(f - x)^2 - v + 2 v
    df/dx]``. At a masked pixel the network sees only the neighbours, so N2V's estimate does
    not depend on ``x_i`` (``df/dx = 0``: the blind-spot loss less ``v``), and PN2V's MMSE
    estimate depends on it only through the posterior weights, whose derivative autograd
    gives exactly; PN2V's prior mean, like N2V, does not depend on it. All methods scored with
    the same ``generator`` seed see the same masks: the difference of their means is a paired,
    ground-truth-free estimate of which estimate is closer to the clean signal.

    Where ``v_i`` is taken: it is exact for Gaussian noise (``v`` constant). For
    signal-dependent (Poisson–Gaussian) noise ``v_i`` is ``variance`` at a blind-spot estimate
    of pixel ``i``'s signal, which does not depend on ``x_i``: by default the scored method's
    own (N2V's prediction; PN2V's prior mean, for both of its estimates). Pass ``reference``
    to take it at that model's blind-spot prediction instead, computed from the very same
    masked input, for every estimate scored. Comparing candidates, pass the same
    ``reference`` to all of them: each pixel then has one ``v_i`` for all, so for two blind
    estimates the ``-v`` terms cancel pixel by pixel and their paired SURE difference *is*
    their paired blind-spot-loss difference ``(f_a - x)^2 - (f_b - x)^2``. With each
    candidate's own ``v`` on a rising variance line, a slightly brighter estimate would score
    lower without being closer to the signal. The posterior mean's ``-v + 2 v df/dx`` uses the
    same shared ``v``.

    Parameters
    ----------
    method : N2V or PN2V
        A trained model (its own masking options are used).
    batch : torch.Tensor, shape (B, C, *patch)
        Raw held-apart patches.
    variance : callable
        Noise variance of the data given a signal, ``variance(signal_tensor, channel) ->
        tensor`` (raw units); take it from the data (e.g. their Poisson–Gaussian line), not from
        the noise model being judged, or a too-narrow model judges itself too kindly.
    generator : torch.Generator
        Draws the masks; seed it alike for the methods compared.
    draws : int
        Mask draws over ``batch``.
    valid : (float, float), optional
        Observations at or outside these limits (clipped pixels) are left out: SURE does not
        hold for them.
    estimate : {"mmse", "prior"}, optional
        PN2V only: which estimate is scored; by default the model's own (what ``predict``
        writes). Scored with the same ``generator`` seed, both estimates see the same masks.
    reference : N2V, optional
        A blind-spot model (N2V family; a PN2V counts through its prior mean) at whose
        prediction of each masked pixel ``variance`` is evaluated, for whichever estimate is
        scored. It is fed ``method``'s masked input (re-normalised with its own statistics;
        the masking strategies copy or take medians of neighbours, so this is the same masked
        image in raw units), so its masks are ``method``'s. Default: ``method`` itself.

    Returns
    -------
    torch.Tensor, shape (N,)
        One risk estimate per scored pixel, raw units squared, pixels of all channels together.
    """
    method.eval()
    if reference is not None:
        if reference.config.in_channels != method.config.in_channels:
            raise ConfigError(
                f"the variance reference has {reference.config.in_channels} channel(s), the scored model "
                f"{method.config.in_channels}"
            )
        reference.eval()
        if reference is method:
            reference = None  # the same numbers, without a second forward pass
    use_prior = isinstance(method, PN2V) and (estimate or method.estimate) == "prior"
    out = []
    for _ in range(draws):
        masked, mask = method.blind_spot_mask(method.normalize(batch), generator)
        with torch.no_grad():
            if isinstance(method, PN2V):
                samples = method._samples(masked).movedim(2, -1)  # (B, C, *spatial, K)
                blind = prior_mean(samples)
            else:
                blind = method.denormalize(method.net(masked))
            ref = blind if reference is None else _blind_prediction(reference, method.denormalize(masked))
        for ch in range(method.config.in_channels):
            m = mask[:, ch]
            x = batch[:, ch][m].detach().clone()
            if valid is not None:
                keep = (x > valid[0]) & (x < valid[1])
            v = variance(ref[:, ch][m], ch)
            if isinstance(method, PN2V) and not use_prior:
                s_k = samples[:, ch][m]
                x.requires_grad_(True)
                f = mmse_estimate(method.noise_model, x, s_k)
                (df,) = torch.autograd.grad(f.sum(), x)
                x, f = x.detach(), f.detach()
                risk = (f - x) ** 2 - v + 2 * v * df
            else:
                f = blind[:, ch][m]
                risk = (f - x) ** 2 - v  # blind (N2V, PN2V's prior mean): df/dx = 0
            out.append(risk[keep] if valid is not None else risk)
    return torch.cat(out).double()


def written_risk(
    method: N2V,
    windows: torch.Tensor,
    variance: Any,
    generator: torch.Generator,
    centre: tuple[slice, ...],
    probes: int = 4,
    rel_eps: float = 0.01,
    valid: tuple[float, float] | None = None,
    estimate: Literal["mmse", "prior"] | None = None,
    reference: N2V | None = None,
) -> torch.Tensor:
    """Per-pixel unbiased estimates of the squared error of what ``method.predict`` writes.

    :func:`blind_spot_risk` scores each pixel's estimate from a *masked* input. That is not what
    ``predict`` writes: unmasked, N2V uses the pixel it was trained blind to (about 0.09 of its
    output per unit of the pixel on BPAE), and PN2V's posterior mean folds the pixel in on top of a
    prior that already saw it. Scoring the masked estimates rewarded a fold-in the written output
    over-does (docs/benchmarks.md §12h). Here SURE scores the written output itself,
    ``E[(f - s)^2] = E[(f - x)^2 - v + 2 v df/dx]``, with the divergence ``df_i/dx_i`` of the
    whole network estimated by Monte Carlo (Ramani, Blu & Unser 2008): for random signs ``b``,
    ``E_b[b_i (f_i(x + eps b) - f_i(x)) / eps] = df_i/dx_i`` up to O(eps). Why hand-written: no
    library computes SURE for a torch model.

    Parameters
    ----------
    method : N2V or PN2V
        A trained model.
    windows : torch.Tensor, shape (B, C, *window)
        Raw windows, each with context around the pixels scored (``centre``), so that their
        prediction equals what ``predict`` writes for the whole image.
    variance : callable
        Noise variance given a signal, ``variance(signal, channel) -> tensor`` (raw units),
        evaluated at ``reference``'s written prediction (one value per pixel for every method
        scored with the same ``reference``).
    generator : torch.Generator
        Draws the probe signs; seed it alike for the methods compared (paired probes).
    centre : tuple of slice
        The spatial region of each window that is scored.
    probes, rel_eps
        Monte-Carlo probes and their step (a fraction of the noise std): the step must be small
        against the noise (the estimate is exact to first order) and large against float32
        rounding of the output.
    valid : (float, float), optional
        Observations at or outside these limits (clipped pixels) are left out.
    estimate : {"mmse", "prior"}, optional
        PN2V only: which estimate is scored (default: the model's own).
    reference : N2V, optional
        The model whose prediction gives each pixel's variance (default: ``method``).

    Returns
    -------
    torch.Tensor, shape (N,)
        One risk estimate per scored pixel, raw units squared, float64.
    """
    method.eval()
    saved = getattr(method, "estimate", None)
    if isinstance(method, PN2V) and estimate is not None:
        method.estimate = estimate
    try:
        with torch.no_grad():
            x = windows.double()
            f = method.predict(windows).double()
            ref = f if reference is None or reference is method else reference.eval().predict(windows).double()
            v = torch.stack([torch.as_tensor(variance(ref[:, ch], ch)).double() for ch in range(x.shape[1])], dim=1)
            eps = rel_eps * v.mean(dim=tuple(d for d in range(v.ndim) if d != 1), keepdim=True).sqrt()
            div = torch.zeros_like(x)
            for _ in range(probes):
                b = torch.randint(0, 2, windows.shape, generator=generator).to(windows.dtype) * 2 - 1
                fb = method.predict(windows + (eps * b).to(windows.dtype)).double()
                div += b * (fb - f) / eps / probes
    finally:
        if isinstance(method, PN2V):
            method.estimate = saved
    risk = ((f - x) ** 2 - v + 2 * v * div)[(slice(None), slice(None)) + tuple(centre)]
    if valid is not None:
        obs = x[(slice(None), slice(None)) + tuple(centre)]
        risk = risk[(obs > valid[0]) & (obs < valid[1])]
    return risk.reshape(-1)


def _blind_prediction(model: N2V, masked_raw: torch.Tensor) -> torch.Tensor:
    """``model``'s blind-spot estimate (raw units) of an already masked raw batch: N2V's
    prediction, a PN2V's prior mean."""
    x = model.normalize(masked_raw)
    if isinstance(model, PN2V):
        return prior_mean(model._samples(x).movedim(2, -1))
    return model.denormalize(model.net(x))
