"""``quietscope train --method pn2v-boot``: fully unsupervised PN2V that keeps N2V when PN2V is not better.

One command: N2V for all ``steps``, paused at ``n2v_fraction`` of them where PN2V branches off
and then finished -> a GMM noise model bootstrapped from the finished N2V's prediction of the
data (Prakash et al. 2020) -> PN2V warm-started from the paused N2V
(:meth:`quietscope.methods.pn2v.PN2V.warm_start`, the remaining steps) -> a ground-truth-free
comparison of what each candidate's ``predict`` writes, on windows spread over the whole image,
and the model file holds the winner. A kept N2V is therefore the model ``train --method n2v
--steps`` gives.

What the comparison compares: at the same pixels of the same windows, Stein's unbiased estimate
of the squared error of each candidate's written output, in raw units, the divergence of the
whole network estimated by Monte Carlo (:func:`quietscope.methods.pn2v.written_risk`): N2V's
prediction and PN2V's posterior mean (and, with ``prior_candidate``, PN2V's prior mean). With
``compare_on="image"`` or ``"slab"`` it scores instead each estimate from a masked input
(:func:`quietscope.methods.pn2v.blind_spot_risk`), which is not what ``predict`` writes (see
:func:`compare`). The noise variance SURE needs is the data's
own Poisson–Gaussian line (from local residuals, as ``inspect-noise`` measures it), not the
bootstrapped noise model, so a noise model that is too narrow cannot vouch for itself. It is
evaluated at one signal per pixel for all candidates, N2V's prediction of that pixel, so a
candidate does not score better for being brighter on a rising variance line. A PN2V
estimate is kept only if its mean estimated error is lower than N2V's by more than ``margin``
paired standard errors (:func:`choose`); a kept prior mean is saved as the PN2V model's default
estimate (``predict`` writes it unless ``--estimate`` says otherwise).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from quietscope.chunked import PredictOptions
from quietscope.errors import ConfigError, InputError, OutputError
from quietscope.inference import method_halo
from quietscope.io.reading import Image
from quietscope.io.stacking import open_stacked
from quietscope.methods.modelfile import load_model, read_manifest, save_model
from quietscope.methods.n2v import N2VConfig
from quietscope.methods.pn2v import PN2V, blind_spot_risk, written_risk
from quietscope.tiling import per_axis
from quietscope.training.config import expand_patch
from quietscope.training.loop import TrainConfig, TrainResult
from quietscope.training.sampler import PatchSampler, split_train_val
from quietscope.workflows.noise_model import bootstrap, data_variance_line
from quietscope.workflows.train import train_model

__all__ = ["BootChoice", "CompareOn", "DEFAULT_N2V_FRACTION", "LABELS", "boot_dir", "candidates", "choose", "rescore", "split_steps", "train_pn2v_boot"]

log = logging.getLogger(__name__)

#: Where PN2V branches off N2V, as a share of the steps; PN2V trains the rest, and the run trains
#: ``steps * (2 - fraction)`` in all. Measured on BPAE, 3 seeds (docs/benchmarks.md §12i): with
#: 30 % of the steps PN2V's posterior mean was +0.64 to +1.00 dB above N2V and the check kept it
#: every time; with 10 % it was +0.25 to +0.72, too close to N2V for the check to tell on 2 seeds.
DEFAULT_N2V_FRACTION = 0.7
#: Held-apart patches and mask draws of the final comparison (tens of thousands of pixels).
VAL_PATCHES, VAL_DRAWS = 64, 16
_FORMAT_KEYS = ("format", "format_version", "quietscope_version", "torch_version", "method")


Kept = Literal["n2v", "pn2v", "pn2v-prior"]
#: How the candidates are named in logs and in ``quietscope train``'s last line.
LABELS = {"n2v": "N2V", "pn2v": "PN2V (posterior mean)", "pn2v-prior": "PN2V (prior mean)"}


@dataclass
class BootChoice:
    """The outcome of the keep-the-better rule (written into the model file's manifest).

    Risks are mean SURE estimates of the squared error (raw units squared) at the same
    held-apart masked pixels; ``difference`` and ``prior_difference`` are PN2V's posterior mean
    and prior mean less N2V (paired, with their standard errors); ``posterior_vs_prior`` is the
    posterior mean less the prior mean.
    """

    kept: Kept
    n2v_risk: float
    pn2v_risk: float
    difference: float
    difference_se: float
    n_pixels: int
    margin_se: float
    variance_source: str
    prior_risk: float | None = None
    prior_difference: float | None = None
    prior_difference_se: float | None = None
    posterior_vs_prior: float | None = None
    posterior_vs_prior_se: float | None = None
    #: Where the pixels were drawn (:data:`CompareOn`).
    compared_on: str = "slab"

    @property
    def pixels(self) -> str:
        """The scored pixels in words."""
        return {"slab": "held-apart masked pixels", "image": "masked pixels spread over the whole image",
                "written": "pixels of the written output spread over the whole image"}.get(self.compared_on, self.compared_on)

    def _qualifies(self, diff: float | None, se: float | None) -> bool:
        return diff is not None and se is not None and diff + self.margin_se * se < 0

    @property
    def label(self) -> str:
        """The kept model in words (``PN2V (prior mean)``)."""
        return LABELS[self.kept]

    @property
    def reason(self) -> str:
        # A negative N2V estimate means the variance used overstates the noise (SURE is only
        # unbiased on average); relative figures then mean nothing and are not given.
        def vs_n2v(risk: float, diff: float, se: float) -> str:
            rel = f", {diff / self.n2v_risk:+.2%}" if self.n2v_risk > 0 else ""
            return f"{risk:.5g} ({diff:+.4g} ± {se:.2g} s.e.{rel})"

        parts = [f"N2V {self.n2v_risk:.5g}"]
        if self.prior_risk is not None:
            parts.append(f"PN2V prior mean {vs_n2v(self.prior_risk, self.prior_difference, self.prior_difference_se)}")
        parts.append(f"PN2V posterior mean {vs_n2v(self.pn2v_risk, self.difference, self.difference_se)}")
        beat_both = self.kept == "pn2v" and self.prior_risk is not None and self._qualifies(self.prior_difference, self.prior_difference_se)
        why = ("no PN2V estimate beat N2V's" if self.kept == "n2v"
               else f"{self.label} beat N2V's" + (" and the prior mean's" if beat_both else ""))
        return (f"{why} estimated squared error by more than {self.margin_se:g} paired s.e.: {', '.join(parts)}; "
                f"{self.n_pixels} {self.pixels}, noise variance from the {self.variance_source}")


def candidates(prior_candidate: bool = False) -> list[Kept]:
    """The estimates the comparison scores, in :func:`choose`'s order (N2V first)."""
    return ["n2v", "pn2v"] + (["pn2v-prior"] if prior_candidate else [])


def _paired(base: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``other - base`` over the same pixels."""
    d = other - base
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def _pixels(risk: Any) -> np.ndarray:
    return np.asarray(risk, dtype=np.float64).ravel()


def choose(n2v_risk: Any, pn2v_risk: Any, margin_se: float = 1.0, variance_source: str = "",
           prior_risk: Any = None) -> BootChoice:
    """The keep-the-better rule on paired per-pixel risk estimates.

    A PN2V estimate (posterior mean; prior mean, when scored) qualifies when its mean risk is
    lower than N2V's by more than ``margin_se`` standard errors of the paired difference. None
    qualifies: N2V. One: that one. Both: the posterior mean only if it is also lower than the
    prior mean by more than ``margin_se`` paired standard errors, else the prior mean. Ties and
    noise keep the estimate with fewer assumptions (N2V, then the prior mean, which does not
    use the noise model at prediction).

    Parameters
    ----------
    n2v_risk, pn2v_risk : array_like, shape (N,)
        Per-pixel estimates of the squared error of N2V's estimate and of PN2V's posterior mean
        at the same pixels.
    margin_se : float
        The margin, in standard errors of each paired difference.
    variance_source : str
        Recorded with the choice.
    prior_risk : array_like, shape (N,), optional
        The same for PN2V's prior mean (a third candidate).

    Returns
    -------
    BootChoice

    Examples
    --------
    >>> choose([2.0, 2.0, 2.1], [1.0, 1.1, 1.0]).kept
    'pn2v'
    >>> choose([2.0, 2.0, 2.1], [1.0, 1.1, 1.0], prior_risk=[1.0, 1.1, 1.0]).kept
    'pn2v-prior'
    """
    a, b = _pixels(n2v_risk), _pixels(pn2v_risk)
    c = None if prior_risk is None else _pixels(prior_risk)
    if a.shape != b.shape or a.size < 2 or (c is not None and c.shape != a.shape):
        sizes = ", ".join(str(v.size) for v in (a, b, c) if v is not None)
        raise InputError(f"need the same >= 2 pixels scored for every model, got {sizes}")
    diff, se = _paired(a, b)
    kept: Kept = "pn2v" if diff + margin_se * se < 0 else "n2v"
    extra: dict[str, float | None] = {}
    if c is not None:
        p_diff, p_se = _paired(a, c)
        pp_diff, pp_se = _paired(c, b)
        extra = {"prior_risk": float(c.mean()), "prior_difference": p_diff, "prior_difference_se": p_se,
                 "posterior_vs_prior": pp_diff, "posterior_vs_prior_se": pp_se}
        if p_diff + margin_se * p_se < 0 and not (kept == "pn2v" and pp_diff + margin_se * pp_se < 0):
            kept = "pn2v-prior"
    return BootChoice(kept, float(a.mean()), float(b.mean()), diff, se, int(a.size), float(margin_se),
                      variance_source, **extra)


def boot_dir(model_path: str | Path) -> Path:
    """Where the pipeline keeps its N2V model, noise model and PN2V model (``<model>.boot/``)."""
    p = Path(model_path)
    return p.with_name(p.name + ".boot")


def _variance(uri: Any, image: Image, axes: str | None, nm: Any, seed: int) -> tuple[Any, str]:
    """``variance(signal, channel)`` from the data's Poisson–Gaussian line; the noise model's
    own variance only when the data give no usable line (logged).
    """
    first = uri[0] if isinstance(uri, (list, tuple)) else uri
    try:
        gain, intercept = data_variance_line(first, channel=0 if image.n_channels > 1 else None, axes=axes, seed=seed)
    except InputError as exc:
        log.warning("pn2v-boot: %s; the comparison uses the noise model's variance instead", exc)

        def from_model(s: torch.Tensor, ch: int) -> torch.Tensor:
            _, std = nm.mean_std(s.detach().double().numpy())
            return torch.from_numpy(std**2).to(s.dtype)

        return from_model, "noise model"
    floor = max(1e-6, 1e-3 * abs(intercept))

    def line(s: torch.Tensor, ch: int) -> torch.Tensor:
        return torch.clamp(gain * s + intercept, min=floor)

    return line, f"data Poisson-Gaussian line var = {gain:.5g} * s + {intercept:.5g}"


#: What :func:`compare` scores: what ``predict`` writes, on windows over the whole image
#: ("written"); or the estimates from a masked input, on patches over the whole image ("image")
#: or on the held-apart validation slab, one edge band ("slab").
CompareOn = Literal["written", "image", "slab"]
#: Where each pixel's noise variance is taken, per :data:`CompareOn`: N2V's prediction of it as
#: written, or from the same masked input as the scored estimates.
VARIANCE_AT = {"written": "prediction", "image": "blind-spot prediction", "slab": "blind-spot prediction"}


def _written_windows(n2v: Any, image: Image, tcfg: TrainConfig) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Windows spread over the whole image, each a patch with the net's halo around it, and the
    patch's place in the window: predicted alone, a window's centre equals what ``predict``
    writes for the whole image.
    """
    halo = method_halo(n2v)
    f = per_axis(n2v.downsampling_factor, len(halo))
    patch = tuple(tcfg.patch)
    win = tuple(max(k, min(p + 2 * h, s) // k * k) for p, h, s, k in zip(patch, halo, image.spatial_shape, f))
    # Where the image is smaller than a patch with its halo, the centre keeps at least half the window.
    edge = tuple(min(h, w // 4) for h, w in zip(halo, win))
    centre = tuple(slice(e, w - e) for e, w in zip(edge, win))
    sampler = PatchSampler(image, win, None, augment=False)
    return torch.from_numpy(sampler.sample(VAL_PATCHES, np.random.default_rng(tcfg.seed + 99))), centre


def compare(n2v: Any, pn2v: PN2V, image: Image, tcfg: TrainConfig, variance: Any, source: str,
            margin_se: float, prior_candidate: bool = False, where: CompareOn = "written") -> BootChoice:
    """Score the candidates on ``where`` and apply :func:`choose`: N2V and PN2V's posterior mean,
    and PN2V's prior mean with ``prior_candidate``. Every pixel's noise variance is taken at
    N2V's prediction of it, one value for all candidates.

    ``where="written"`` (the default) scores what ``predict`` writes, on windows spread over the
    whole image (:func:`quietscope.methods.pn2v.written_risk`). ``"image"`` and ``"slab"`` score
    each candidate's estimate from a *masked* input (:func:`quietscope.methods.pn2v.blind_spot_risk`),
    on patches over the whole image or on the held-apart slab. The masked estimates are not what
    ``predict`` writes: N2V uses its pixel a little when it sees it, and PN2V's fold-in comes on
    top of a prior that already saw it. On BPAE that made the masked comparison keep a PN2V that
    wrote a worse image (docs/benchmarks.md §12h).
    """
    valid = getattr(pn2v.noise_model, "clip_limits", None)
    if where == "written":
        windows, centre = _written_windows(n2v, image, tcfg)

        def risk(m: Any, estimate: str | None, gen: torch.Generator) -> torch.Tensor:
            return torch.cat([written_risk(m, windows[i:i + 8], variance, gen, centre, valid=valid,
                                           estimate=estimate, reference=n2v)
                              for i in range(0, windows.shape[0], 8)])
    else:
        region = None
        if where == "slab":
            _, region = split_train_val(image.spatial_shape, tuple(tcfg.patch), tcfg.val_fraction)
            if region is None:
                raise ConfigError("pn2v-boot compares the models on the held-apart slab; use --val-fraction > 0")
        sampler = PatchSampler(image, tuple(tcfg.patch), region, augment=False)
        batch = torch.from_numpy(sampler.sample(VAL_PATCHES, np.random.default_rng(tcfg.seed + 99)))

        def risk(m: Any, estimate: str | None, gen: torch.Generator) -> torch.Tensor:
            return torch.cat([blind_spot_risk(m, batch[i:i + 16], variance, gen, VAL_DRAWS, valid, estimate,
                                              reference=n2v)
                              for i in range(0, batch.shape[0], 16)])
    models = {"n2v": (n2v, None), "pn2v": (pn2v, "mmse"), "pn2v-prior": (pn2v, "prior")}
    # The same masks (or Monte-Carlo probes) for all candidates: a paired comparison.
    risks = [risk(m, estimate, torch.Generator().manual_seed(tcfg.seed + 4242)).numpy()
             for m, estimate in (models[k] for k in candidates(prior_candidate))]
    choice = replace(choose(risks[0], risks[1], margin_se, f"{source} at N2V's {VARIANCE_AT[where]} of each pixel",
                            prior_risk=risks[2] if len(risks) > 2 else None), compared_on=where)
    if where != "written" and choice.n2v_risk < 0:
        # (Said of the masked comparison, where N2V's estimate is blind.) E[(N2V - x)^2] = N2V's error + the noise variance, so a negative estimate means the
        # variance overstates the noise here; its 2 v df/dx term then over-penalises PN2V's
        # fold-in: the comparison leans towards N2V (the safe side), it does not favour PN2V.
        log.warning("pn2v-boot: the %s overstates the noise on the held-apart pixels (N2V's estimated error %.4g < 0); "
                    "the comparison leans towards keeping N2V", source, choice.n2v_risk)
    return choice


def _options(method_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """N2V's and PN2V's options from the pipeline's (N2V masking fields go to both)."""
    n2v_fields = set(N2VConfig.model_fields) - {"method", "spatial_ndim", "in_channels"}
    common = {k: v for k, v in method_options.items() if k in n2v_fields}
    pn2v = {**common, "method": "pn2v"}
    if method_options.get("n_samples") is not None:
        pn2v["n_samples"] = method_options["n_samples"]
    return {**common, "method": "n2v"}, pn2v


def split_steps(total: int, n2v_fraction: float) -> tuple[int, int]:
    """Where PN2V branches off N2V, and how many steps PN2V then trains.

    Parameters
    ----------
    total : int
        Steps of each candidate (``--steps``).
    n2v_fraction : float
        Share of ``total`` trained as N2V before PN2V branches off, strictly between 0 and 1.

    Returns
    -------
    (int, int)
        The branch step (N2V's steps) and PN2V's steps; they sum to ``total``.

    Raises
    ------
    ConfigError
        If the fraction is out of range or ``total`` leaves one stage without a step.
    """
    if not 0 < n2v_fraction < 1:
        raise ConfigError(f"--n2v-fraction {n2v_fraction} must lie strictly between 0 and 1 (default {DEFAULT_N2V_FRACTION})")

    def shares(n: int) -> bool:
        return 1 <= int(round(n * n2v_fraction)) <= n - 1

    if not shares(total):
        # The least budget that leaves both stages a step at this fraction (2 at 0.5 and at 0.7, 5 at 0.9).
        least = next(n for n in range(2, 10**6) if shares(n))
        raise ConfigError(f"--steps {total} is too few to share between N2V and PN2V at --n2v-fraction {n2v_fraction}; "
                          f"use at least {least}")
    n2v_steps = int(round(total * n2v_fraction))
    return n2v_steps, total - n2v_steps


def _write_winner(model_path: Path, work: Path, kept: Kept, record: dict[str, Any]) -> None:
    method, manifest = load_model(work / ("n2v.qs" if kept == "n2v" else "pn2v.qs"))
    if kept == "pn2v-prior":
        method.set_default_estimate("prior")  # in the config: 'predict' writes the prior mean
    info = {k: v for k, v in manifest.items() if k not in _FORMAT_KEYS}
    save_model(model_path, method, {**info, "pn2v_boot": record})


def train_pn2v_boot(
    input_uri: str | Path | list[str | Path],
    model_path: str | Path,
    method_options: dict[str, Any],
    train_options: dict[str, Any],
    axes: str | None = None,
    level: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    n2v_fraction: float = DEFAULT_N2V_FRACTION,
    margin_se: float = 1.0,
    prior_candidate: bool = False,
    compare_on: CompareOn = "written",
) -> BootChoice:
    """N2V, and PN2V branched off it with a bootstrapped GMM, each ``steps`` long; keep the better one.

    Parameters
    ----------
    input_uri, axes, level, overwrite, progress
        As in :func:`quietscope.workflows.train.train_model`; one channel (the noise model is one
        per model: train each channel on its own).
    model_path : str or pathlib.Path
        The model file to write: the N2V model, or the PN2V model with the kept estimate
        (posterior or prior mean) as its default, whichever the comparison keeps. The stages are kept in ``<model>.boot/`` (``n2v.qs``, ``noise_model.json``, ``pn2v.qs``,
        ``choice.json``; ``n2v_branch.qs`` is N2V where PN2V branched off).
    method_options : dict
        N2V masking and network options (both stages), ``n_samples`` (PN2V).
    train_options : dict
        :class:`TrainConfig` fields; ``steps`` is each candidate's budget: N2V trains ``steps``,
        and PN2V the part after the branch, from N2V's weights there.
    n2v_fraction : float
        Where PN2V branches off N2V, as a share of ``steps``.
    margin_se : float
        See :func:`choose`.
    prior_candidate : bool
        Also offer PN2V's prior mean (a third candidate). Off by default: since N2V trains all
        the steps, PN2V's prior mean (measured with 100 of its 1000 steps as PN2V) was below N2V on 10 of 12
        measured channel-seeds (−0.23 to +0.10 dB, mean −0.09), and the rule kept it once at
        −0.23 dB where the posterior mean was +0.25 (docs/benchmarks.md §12f).
    compare_on : {"written", "image", "slab"}
        What the comparison scores (:func:`compare`'s ``where``). By default what ``predict``
        writes, on windows over the whole image: on the BPAE and W2S stages of §12g it kept the
        better model or N2V on all 6 channel-seeds, where scoring the masked estimates kept a
        PN2V that wrote a worse image once (docs/benchmarks.md §12h). ``"image"`` and
        ``"slab"`` score the estimates from a masked input (§12f, §12g).

    Returns
    -------
    BootChoice

    Raises
    ------
    OutputError
        The model file or its ``.boot`` folder exists (without ``overwrite``).
    ConfigError
        Several channels, no validation slab, a budget too small to share.

    Examples
    --------
    >>> train_pn2v_boot("noisy.ome.zarr", "boot.qs", {}, {"steps": 3000})  # doctest: +SKIP
    """
    model_path, work = Path(model_path), boot_dir(model_path)
    if (model_path.exists() or work.exists()) and not overwrite:
        raise OutputError(f"{str(model_path)!r} or its stage folder {str(work)!r} exists; pass --overwrite to replace them")
    image = open_stacked(input_uri, level=level, axes=axes)
    if image.n_channels != 1:
        raise ConfigError(f"pn2v-boot fits one noise model, but the data have {image.n_channels} channels; train each channel on its own")
    total = int(train_options.get("steps", TrainConfig.model_fields["steps"].default))
    branch, pn2v_steps = split_steps(total, n2v_fraction)
    n2v_opts, pn2v_opts = _options(method_options)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    kw = {"axes": axes, "level": level, "progress": progress}
    n2v_train = {**train_options, "steps": total}
    log.info("pn2v-boot: N2V trains all %d steps; PN2V branches off it at step %d, warm-started, and trains the "
             "remaining %d, so each candidate has %d steps (%d trained in all)", total, branch, pn2v_steps, total,
             total + pn2v_steps)
    # N2V is paused at the branch and then finished, on its own schedule: the N2V candidate is the
    # very model 'train --method n2v --steps TOTAL' gives, so keeping it never loses the PN2V
    # steps' worth of N2V training. Measured: with N2V stopped at 70 % of the budget instead, the
    # kept model was 0.10-0.27 dB below the full-budget N2V on W2S before any choice was made
    # (docs/benchmarks.md §12c).
    branch_res: TrainResult = train_model(input_uri, work / "n2v.qs", n2v_opts, n2v_train, overwrite=True,
                                          stop_at=branch, **kw)
    shutil.copyfile(work / "n2v.qs", work / "n2v_branch.qs")
    if branch_res.paused_at is None:  # early stopping ended N2V before the branch: it is finished
        n2v_res = branch_res
    else:
        n2v_res = train_model(input_uri, work / "n2v.qs", n2v_opts, n2v_train, resume=True, **kw)
    tcfg = TrainConfig.model_validate({**train_options, "steps": total,
                                       "patch": expand_patch(tuple(train_options.get("patch", (64,))), len(image.spatial_axes))})
    first = input_uri[0] if isinstance(input_uri, (list, tuple)) else input_uri
    # From the finished N2V: the better its estimate of the signal, the closer the bootstrap.
    nm = bootstrap(work / "n2v.qs", first, "gmm", axes=axes, work_dir=work, seed=tcfg.seed,
                   predict_options=PredictOptions(progress=False, device=tcfg.device, overwrite=True))
    nm.save(work / "noise_model.json")
    pn2v_res = train_model(input_uri, work / "pn2v.qs", {**pn2v_opts, "noise_model": nm.to_dict()},
                           {**train_options, "steps": pn2v_steps}, init=work / "n2v_branch.qs", overwrite=True, **kw)
    variance, source = _variance(input_uri, image, axes, nm, tcfg.seed)
    choice = compare(n2v_res.method.cpu(), pn2v_res.method.cpu(), image, tcfg, variance, source, margin_se, prior_candidate,
                     compare_on)
    record = {**asdict(choice), "n2v_steps": total, "branch_step": branch, "pn2v_steps": pn2v_steps,
              "steps_trained": total + pn2v_steps, "stages": str(work),
              "compares": f"SURE of each final estimate ({', '.join(LABELS[k] for k in candidates(prior_candidate))}) "
                          f"at the same {choice.pixels}, data variance line at N2V's {VARIANCE_AT[compare_on]} (one per pixel, "
                          "shared by the candidates)"}
    (work / "choice.json").write_text(json.dumps(record, indent=2))
    _write_winner(model_path, work, choice.kept, record)
    if choice.kept != "n2v":
        estimate = "prior" if choice.kept == "pn2v-prior" else "mmse"
        log.info("pn2v-boot: keeping PN2V, predicting its %s by default (predict --estimate %s): %s",
                 "prior mean" if estimate == "prior" else "posterior mean", estimate, choice.reason)
    else:
        log.warning("pn2v-boot: keeping N2V, PN2V did not beat it: %s; %s holds the N2V model", choice.reason, model_path)
    return choice


def boot_record(model_path: str | Path) -> dict[str, Any] | None:
    """The ``pn2v_boot`` record of a model file written by :func:`train_pn2v_boot` (or ``None``)."""
    return read_manifest(model_path).get("pn2v_boot")


def rescore(model_path: str | Path, input_uri: str | Path | list[str | Path], where: CompareOn = "written",
            axes: str | None = None, level: int = 0, margin_se: float = 1.0, prior_candidate: bool = False) -> BootChoice:
    """The comparison of a finished :func:`train_pn2v_boot` run again, on ``where``; writes nothing.

    Parameters
    ----------
    model_path : str or pathlib.Path
        The pipeline's model file; its stages (``<model>.boot/n2v.qs``, ``pn2v.qs``) are scored.
    input_uri, axes, level
        The data it was trained on.
    where, margin_se, prior_candidate
        As in :func:`compare` and :func:`choose`.

    Returns
    -------
    BootChoice

    Raises
    ------
    InputError
        The stage folder is missing.
    """
    work = boot_dir(model_path)
    if not (work / "n2v.qs").exists() or not (work / "pn2v.qs").exists():
        raise InputError(f"{str(work)!r} lacks n2v.qs or pn2v.qs: rescore needs the stages of a finished pn2v-boot run")
    n2v, manifest = load_model(work / "n2v.qs")
    pn2v, _ = load_model(work / "pn2v.qs")
    image = open_stacked(input_uri, level=level, axes=axes)
    tcfg = TrainConfig.model_validate(manifest["train"])
    variance, source = _variance(input_uri, image, axes, pn2v.noise_model, tcfg.seed)
    return compare(n2v.cpu(), pn2v.cpu(), image, tcfg, variance, source, margin_se, prior_candidate, where)
