"""Gaussian-mixture noise model (Prakash et al., "Fully Unsupervised Probabilistic Noise2Void",
ISBI 2020), parameterised as in juglab/PPN2V's ``GaussianMixtureNoiseModel``.

For ``K`` Gaussians and a signal normalised to ``u = (s - min_signal) / (max_signal -
min_signal)``, every Gaussian parameter is a polynomial in ``u`` with ``n_coeff`` coefficients
(``n_coeff=2``: linear). ``weight`` has ``3K`` rows of ``n_coeff`` coefficients:

* rows ``0..K-1``: mean offsets of the components;
* rows ``K..2K-1``: variances, a polynomial whose coefficients are ``exp`` of the weights (so
  it is positive and non-decreasing in ``u``, like shot noise), floored at ``min_sigma**2``;
* rows ``2K..3K-1``: mixture logits, turned into weights by a softmax over the components.

The component means are re-centred so that the mixture mean is exactly ``s``.

Deliberate differences from PPN2V:

* mean offsets are in units of the signal range and variances in units of its square (PPN2V
  uses raw units), so that fitting behaves alike at every intensity scale;
* ``min_sigma`` floors the *standard deviation* (PPN2V applies its ``min_sigma`` to the
  variance);
* outside ``[min_signal, max_signal]`` the noise shape is held at its value at the nearest
  end (the mean still follows ``s``) instead of extrapolating the polynomials;
* :func:`fit_gmm` starts from variances measured on the data and decays the learning rate.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from quietscope.errors import ConfigError, InputError, ModelError
from quietscope.noise_models.base import NoiseModel, as_float_array, read_float

#: Width, in standard deviations, of the observation range beyond the signal range.
RANGE_SIGMAS = 5.0

#: Default floor on the standard deviation, as a fraction of the signal range.
MIN_SIGMA_FRACTION = 1e-3


def _mixture_params(
    weight: torch.Tensor,
    s: torch.Tensor,
    min_signal: float,
    max_signal: float,
    min_sigma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Component means, variances and log-weights at signals ``s``, each ``s.shape + (K,)``."""
    k = weight.shape[0] // 3
    span = max_signal - min_signal
    u = torch.clamp((s - min_signal) / span, 0.0, 1.0)
    powers = torch.stack([u**i for i in range(weight.shape[1])], dim=-1).to(weight.dtype)
    offsets = (powers @ weight[:k].T) * span
    variance = torch.clamp((powers @ torch.exp(weight[k : 2 * k]).T) * span**2, min=min_sigma**2)
    log_alpha = torch.log_softmax(powers @ weight[2 * k :].T, dim=-1)
    # Re-centre so the mixture mean is s itself: the model describes noise, not bias.
    offsets = offsets - (torch.exp(log_alpha) * offsets).sum(dim=-1, keepdim=True)
    means = s.unsqueeze(-1).to(weight.dtype) + offsets
    return means, variance, log_alpha


def _gmm_log_likelihood(
    weight: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    min_signal: float,
    max_signal: float,
    min_sigma: float,
    clip: tuple[float | None, float | None] | None = None,
    half_step: float = 0.5,
) -> torch.Tensor:
    x, s = torch.broadcast_tensors(x, s)
    means, variance, log_alpha = _mixture_params(weight, s, min_signal, max_signal, min_sigma)
    residual = x.unsqueeze(-1) - means
    log_normal = -0.5 * (residual**2 / variance + torch.log(2 * math.pi * variance))
    out = torch.logsumexp(log_alpha + log_normal, dim=-1)
    if clip is None:
        return out
    # Censored ends (a camera or a contrast stretch that clips): an observation at the low
    # limit says only "the value fell at or below it", so its likelihood is the mixture's
    # probability mass up to the limit (plus half a quantisation step), not a density.
    lo, hi = clip
    sd = torch.sqrt(variance)
    if lo is not None:
        below = torch.logsumexp(log_alpha + torch.special.log_ndtr((lo + half_step - means) / sd), dim=-1)
        out = torch.where(x <= lo, below, out)
    if hi is not None:
        above = torch.logsumexp(log_alpha + torch.special.log_ndtr((means - (hi - half_step)) / sd), dim=-1)
        out = torch.where(x >= hi, above, out)
    return out


def _clip_tuple(clip: Any) -> tuple[float | None, float | None] | None:
    if clip is None:
        return None
    lo, hi = clip
    out = (None if lo is None else float(lo), None if hi is None else float(hi))
    return None if out == (None, None) else out


class GMMNoiseModel(NoiseModel):
    """``p(x | s)`` as a Gaussian mixture whose parameters are polynomials of ``s``.

    Parameters
    ----------
    weight : array_like, shape (3 * n_gaussian, n_coeff)
        Polynomial coefficients (layout in the module docstring).
    min_signal, max_signal : float
        Signal range the polynomials are normalised over, raw units.
    min_sigma : float
        Floor on each component's standard deviation, raw units.
    observed_range : (float, float), optional
        Smallest and largest observation of the fitting pairs; widens
        :attr:`observation_range` to cover them.
    clip : (float or None, float or None), optional
        Observation limits at which the data are clipped (8-bit 0/255, a saturated camera):
        observations at or beyond a limit are censored, their likelihood is the probability
        mass beyond the limit (less half a quantisation step ``half_step``). ``None``: no clipping.
    half_step : float
        Half the quantisation step of the observations (0.5 for integer data).
    """

    kind: ClassVar[str] = "gmm"

    def __init__(
        self,
        weight: Any,
        min_signal: float,
        max_signal: float,
        min_sigma: float,
        observed_range: tuple[float, float] | None = None,
        clip: tuple[float | None, float | None] | None = None,
        half_step: float = 0.5,
    ) -> None:
        super().__init__()
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2 or w.shape[0] % 3 or w.shape[0] == 0 or w.shape[1] < 1:
            raise ConfigError(
                f"GMM weight has shape {w.shape}; it must be (3 * n_gaussian, n_coeff)"
            )
        if not max_signal > min_signal:
            raise ConfigError(
                f"GMM signal range [{min_signal}, {max_signal}] is empty; need max > min"
            )
        if not min_sigma > 0:
            raise ConfigError(f"min_sigma={min_sigma} must be > 0 (a floor on the noise std)")
        self.register_buffer("weight", torch.from_numpy(w.copy()))
        self.min_signal = float(min_signal)
        self.max_signal = float(max_signal)
        self.min_sigma = float(min_sigma)
        self.observed_range = (
            None if observed_range is None else tuple(float(v) for v in observed_range)
        )
        self.clip = _clip_tuple(clip)
        self.half_step = float(half_step)

    @property
    def clip_limits(self) -> tuple[float, float] | None:
        """``(low, high)`` clipping limits (infinite where an end is not clipped), or ``None``:
        observations at or beyond them carry no density (e.g. for Stein's risk estimate)."""
        if self.clip is None:
            return None
        lo, hi = self.clip
        return (-math.inf if lo is None else lo, math.inf if hi is None else hi)

    @property
    def n_gaussian(self) -> int:
        return int(self.weight.shape[0] // 3)

    @property
    def n_coeff(self) -> int:
        return int(self.weight.shape[1])

    @property
    def signal_range(self) -> tuple[float, float]:
        return self.min_signal, self.max_signal

    @property
    def observation_range(self) -> tuple[float, float]:
        """Signal range widened by :data:`RANGE_SIGMAS` noise std at each end, and by the
        observations of the fitting pairs when known."""
        _, std = self.mean_std(np.array([self.min_signal, self.max_signal]))
        lo = self.min_signal - RANGE_SIGMAS * float(std[0])
        hi = self.max_signal + RANGE_SIGMAS * float(std[1])
        if self.observed_range is not None:
            lo, hi = min(lo, self.observed_range[0]), max(hi, self.observed_range[1])
        return lo, hi

    def log_likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        device = self.weight.device
        x = torch.as_tensor(x, device=device)
        s = torch.as_tensor(s, device=device)
        dtype = torch.promote_types(s.dtype, torch.float32)
        # Raw-unit variances overflow float16 (65504), so never let autocast lower them.
        with torch.autocast(device_type=device.type, enabled=False):
            return _gmm_log_likelihood(
                self.weight.to(dtype),
                x.to(dtype),
                s.to(dtype),
                self.min_signal,
                self.max_signal,
                self.min_sigma,
                self.clip,
                self.half_step,
            )

    def mean_std(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of ``x`` given ``s`` from the mixture moments (closed form), before any
        clipping (:attr:`clip`): the noise of the unclipped signal."""
        s = np.asarray(s, dtype=np.float64)
        with torch.no_grad():
            means, variance, log_alpha = _mixture_params(
                self.weight.detach().double().cpu(),
                torch.from_numpy(s),
                self.min_signal,
                self.max_signal,
                self.min_sigma,
            )
            alpha = torch.exp(log_alpha)
            mean = (alpha * means).sum(-1)
            var = (alpha * (variance + (means - mean.unsqueeze(-1)) ** 2)).sum(-1)
        return mean.numpy(), np.sqrt(var.numpy())

    def to_dict(self) -> dict[str, Any]:
        clip = {} if self.clip is None else {"clip": list(self.clip), "half_step": self.half_step}
        return {
            **clip,
            "kind": self.kind,
            "version": 1,
            "min_signal": self.min_signal,
            "max_signal": self.max_signal,
            "min_sigma": self.min_sigma,
            "observed_range": None if self.observed_range is None else list(self.observed_range),
            "weight": self.weight.detach().cpu().numpy().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GMMNoiseModel:
        """Inverse of :meth:`to_dict`; :class:`ModelError` if the description is broken."""
        lo, hi = read_float(d, "min_signal"), read_float(d, "max_signal")
        min_sigma = read_float(d, "min_sigma")
        try:
            w = np.asarray(d["weight"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                "GMM noise model lacks a numeric 'weight' table; re-save the noise model"
            ) from None
        if not np.all(np.isfinite(w)):
            raise ModelError("GMM noise model weights are not finite; refit the noise model")
        observed = d.get("observed_range")
        if observed is not None:
            observed = np.asarray(observed, dtype=np.float64)
            if observed.shape != (2,) or not np.all(np.isfinite(observed)):
                raise ModelError(
                    "GMM noise model 'observed_range' is not a finite [low, high] pair; re-save it"
                )
        clip = d.get("clip")
        if clip is not None and (not isinstance(clip, (list, tuple)) or len(clip) != 2
                                 or not all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in clip)):
            raise ModelError("GMM noise model 'clip' is not a [low, high] pair of numbers or nulls; re-save it")
        try:
            return cls(w, lo, hi, min_sigma, observed, clip, float(d.get("half_step", 0.5)))
        except ConfigError as e:
            raise ModelError(f"{e}; refit and re-save the noise model") from None


def _initial_weight(
    s: np.ndarray,
    x: np.ndarray,
    lo: float,
    span: float,
    k: int,
    n_coeff: int,
    min_sigma: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Starting weights: every component with the data's residual variance, linear in s.

    The variance at the low and high end of the signal range is measured on the lowest and
    highest tenth of the pairs; small random offsets break the symmetry between components.
    """
    u = (s - lo) / span
    resid = (x - s).astype(np.float64)
    low_end, high_end = np.quantile(u, [0.1, 0.9])
    floor = (min_sigma / span) ** 2
    v_low = max(float(np.var(resid[u <= low_end])) / span**2, floor)
    v_high = max(float(np.var(resid[u >= high_end])) / span**2, floor)
    # Variance = sum_i exp(w_i) u^i; read the slope between the two ends, floored to keep
    # the log finite when the variance does not grow with the signal.
    slope = max((v_high - v_low) / max(high_end - low_end, 1e-6), floor)
    weight = 0.1 * rng.standard_normal((3 * k, n_coeff))
    weight[:k] *= 0.01
    weight[k : 2 * k, 0] += math.log(max(v_low - slope * low_end, floor))
    if n_coeff > 1:
        weight[k : 2 * k, 1] += math.log(slope)
        weight[k : 2 * k, 2:] += math.log(floor)
    return weight


def _check_fit_options(**options: float) -> None:
    for name in ("n_gaussian", "n_coeff", "n_iterations", "batch_size", "max_pairs"):
        value = options[name]
        if int(value) != value or value < 1:
            raise ConfigError(f"{name}={value} is invalid; use an integer >= 1")
    if not options["learning_rate"] > 0:
        raise ConfigError(f"learning_rate={options['learning_rate']} is invalid; use a value > 0 (e.g. 0.1)")


def _optimise(means: torch.Tensor, shape: torch.Tensor, s_t: torch.Tensor, x_t: torch.Tensor, log_likelihood: Any,
              optimiser: torch.optim.Optimizer, schedule: Any, n_iterations: int, batch_size: int, seed: int) -> None:
    """Maximise the mean log-likelihood of random batches of pairs (seeded: the fit is reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    n = s_t.numel()
    for _ in range(n_iterations):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        loss = -log_likelihood(torch.cat([means, shape]), x_t[idx], s_t[idx]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()


def fit_gmm(
    signal: np.ndarray,
    observation: np.ndarray,
    n_gaussian: int = 3,
    n_coeff: int = 2,
    *,
    min_sigma: float | None = None,
    min_signal: float | None = None,
    max_signal: float | None = None,
    learning_rate: float = 0.1,
    n_iterations: int = 2000,
    batch_size: int = 20_000,
    max_pairs: int = 1_000_000,
    seed: int = 0,
    observed_range: tuple[float, float] | None = None,
    clip: tuple[float | None, float | None] | None = None,
    half_step: float = 0.5,
) -> GMMNoiseModel:
    """Fit a :class:`GMMNoiseModel` by maximum likelihood on ``(signal, observation)`` pairs.

    Adam minimises the mean negative log-likelihood over random mini-batches, as PPN2V does,
    but starts from variances measured on the data and decays the learning rate to zero
    (cosine) so that the final weights do not jitter with the batch noise.

    Parameters
    ----------
    signal, observation : np.ndarray
        Same-shaped arrays of true (or pseudo-) signal and noisy observation, raw units.
    n_gaussian : int, optional
        Number of mixture components ``K`` (PPN2V default 3).
    n_coeff : int, optional
        Coefficients per polynomial: 2 = linear in the signal, 3 = quadratic (PPN2V default 2).
    min_sigma : float, optional
        Floor on each component's std, raw units; default ``1e-3 x`` the signal range.
    min_signal, max_signal : float, optional
        Signal range to normalise over; default the range of ``signal``.
    learning_rate : float, optional
        Adam's initial learning rate (PPN2V: 0.1).
    n_iterations : int, optional
        Optimisation steps (PPN2V: 2000).
    batch_size : int, optional
        Pairs per step (PPN2V uses 250 000 on a GPU; 20 000 keeps CPU fitting to seconds).
    max_pairs : int, optional
        Pairs kept, drawn at random, when more are given; bounds memory and time.
    seed : int, optional
        Seeds the subsampling, the initial weights and the batches.
    observed_range : (float, float), optional
        Observations the model must accept besides ``observation``'s own range (e.g. the
        data before :func:`~quietscope.noise_models.match_variance_line` rescaled it).
    clip, half_step : optional
        Clipping limits and half quantisation step of the observations (see
        :class:`GMMNoiseModel`); the fit then maximises the censored likelihood, so clipped
        pixels inform the fit without pulling a component onto the limit.

    Returns
    -------
    GMMNoiseModel
    """
    s = as_float_array(signal, "signal").ravel()
    x = as_float_array(observation, "observation").ravel()
    if s.shape != x.shape:
        raise InputError(
            f"signal has {s.size} pixels but observation has {x.size}; pass matching arrays"
        )
    _check_fit_options(n_gaussian=n_gaussian, n_coeff=n_coeff, n_iterations=n_iterations, batch_size=batch_size,
                       max_pairs=max_pairs, learning_rate=learning_rate)
    k, n_coeff = int(n_gaussian), int(n_coeff)
    clip = _clip_tuple(clip)

    lo = float(s.min()) if min_signal is None else float(min_signal)
    hi = float(s.max()) if max_signal is None else float(max_signal)
    if not hi > lo:
        raise InputError(
            f"signal range [{lo:.6g}, {hi:.6g}] is empty; the noise model needs pairs over a "
            "range of signal levels (or pass min_signal < max_signal)"
        )
    if min_sigma is None:
        min_sigma = MIN_SIGMA_FRACTION * (hi - lo)
    if not min_sigma > 0:
        raise ConfigError(f"min_sigma={min_sigma} must be > 0 (a floor on the noise std)")

    observed = (float(x.min()), float(x.max()))
    if observed_range is not None:
        observed = (min(observed[0], float(observed_range[0])), max(observed[1], float(observed_range[1])))
    rng = np.random.default_rng(seed)
    if s.size > max_pairs:
        keep = rng.choice(s.size, size=int(max_pairs), replace=False)
        s, x = s[keep], x[keep]
    s_t = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    span = hi - lo
    init = _initial_weight(s, x, lo, span, k, n_coeff, min_sigma, rng)
    means = torch.tensor(init[:k], dtype=torch.float32, requires_grad=True)
    shape = torch.tensor(init[k:], dtype=torch.float32, requires_grad=True)
    # Mean offsets are in units of the signal range, but they move on the scale of the noise:
    # their steps are scaled down to it, or one Adam step would jump by many noise stds.
    noise_scale = math.sqrt(math.exp(init[k : 2 * k, 0].max()))
    optimiser = torch.optim.Adam(
        [
            {"params": [means], "lr": learning_rate * noise_scale},
            {"params": [shape], "lr": learning_rate},
        ]
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=int(n_iterations), eta_min=0.0
    )
    ll = lambda w, xb, sb: _gmm_log_likelihood(w, xb, sb, lo, hi, min_sigma, clip, half_step)
    _optimise(means, shape, s_t, x_t, ll, optimiser, schedule, int(n_iterations), int(batch_size), int(seed))
    weight = torch.cat([means, shape]).detach()
    return GMMNoiseModel(weight.numpy(), lo, hi, min_sigma, observed, clip, half_step)
