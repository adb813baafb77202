"""Turn the noise measurements into plain advice: which assumptions hold, which method to use."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quietscope.errors import ConfigError
from quietscope.noise_analysis.correlation import (
    DEFAULT_THRESHOLD,
    NoiseStructure,
    ResidualQuality,
    _check_axes,
    detect_structured_noise,
    raw_noise_autocorrelation,
)
from quietscope.noise_analysis.poisson_gaussian import (
    PoissonGaussianEstimate,
    as_blocks,
    estimate_poisson_gaussian,
)

#: Below this mean number of photons per pixel a Poisson likelihood beats Gaussian-noise methods.
LOW_PHOTON_COUNT = 20.0
#: Share of clipped pixels above which the noise cannot be treated as zero-mean.
MAX_CLIPPED = 1e-3
#: Below this r² the mean-variance line is not trusted (not Poisson–Gaussian, or rescaled data).
MIN_R2 = 0.9


@dataclass
class Assumption:
    """One assumption of the denoising methods and whether the data satisfies it."""

    name: str
    holds: bool | None  # None: could not be checked
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "holds": self.holds, "detail": self.detail}


@dataclass
class NoiseReport:
    """What the noise is like and which method suits it.

    Attributes
    ----------
    estimate : PoissonGaussianEstimate or None
        Fitted camera noise model.
    structure : NoiseStructure
        Per-axis noise correlation.
    residual : ResidualQuality or None
        Whiteness of ``data - prediction`` when a prediction was analysed.
    assumptions : list of Assumption
        Pixel independence, zero mean, Poisson dominance.
    method : str
        Recommended ``--method``.
    options : list of str
        Command-line options to pass, e.g. ``["--method", "n2v", "--struct-mask", "x:9"]``.
    reasons : list of str
        Why, in plain sentences.
    notes : list of str
        Caveats.
    """

    estimate: PoissonGaussianEstimate | None
    structure: NoiseStructure
    residual: ResidualQuality | None
    assumptions: list[Assumption]
    method: str
    options: list[str]
    reasons: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "method": self.method,
            "options": list(self.options),
            "reasons": list(self.reasons),
            "assumptions": [a.to_dict() for a in self.assumptions],
            "noise_model": None if self.estimate is None else self.estimate.to_dict(),
            "structure": self.structure.to_dict(),
            "residual": None if self.residual is None else self.residual.to_dict(),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """Plain-language summary for a facility user."""
        lines = ["Noise analysis", ""]
        e = self.estimate
        if e is not None:
            src = (
                "given" if e.offset_source == "user" else "measured on the darkest pixels"
            )
            lines.append(
                f"Camera noise: gain {e.gain:.3g} ADU per photon, read noise "
                f"{e.read_noise_sigma:.3g} ADU, offset {e.offset:.4g} ADU ({src}); the "
                f"mean-variance line fits with r² = {e.r2:.3f}."
            )
            if np.isfinite(e.mean_photons):
                lines.append(
                    f"The sample holds on average {e.mean_photons:.3g} detected photons per pixel."
                )
            lines.append("")
        lines.append("Assumptions of the denoising methods:")
        mark = {True: "yes", False: "NO ", None: " ? "}
        for a in self.assumptions:
            lines.append(f"  [{mark[a.holds]}] {a.name}: {a.detail}")
        if self.residual is not None:
            r = self.residual
            lag = ", ".join(f"{k} {v:+.2f}" for k, v in r.lag1.items())
            lines.append(
                f"  Residual of the prediction: lag-1 correlation {lag}; correlation with the "
                f"prediction {r.signal_correlation:+.2f} (near 0 means no signal was removed)."
            )
        lines += ["", f"Recommended method: {self.method}", f"  options: {' '.join(self.options)}"]
        lines += [f"  - {r}" for r in self.reasons]
        if self.notes:
            lines += ["", "Notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


#: Share of 8-bit pixels at 0 or at 255 from which the data count as clipped.
EIGHT_BIT_CLIPPED = 1e-4


def eight_bit_warning(blocks: Sequence[np.ndarray]) -> str | None:
    """A warning for 8-bit data that look contrast-stretched: pixels piled up at 0 and/or 255.

    Raw camera data are 12-16 bit; 8-bit images with clipped ends were almost always rescaled
    (stretched) one by one before saving (e.g. W2S: noisy ≈ 0.6 · clean + 12, ~0.2 % of the
    pixels at 0 or 255). Their gain is not the camera's, the clipped pixels are censored
    values (not noise), and a reference image of the same sample was stretched differently.

    Parameters
    ----------
    blocks : sequence of numpy.ndarray
        Raw blocks in the data's own dtype.

    Returns
    -------
    str or None
        The warning, or ``None`` for data that are not 8-bit or not clipped.
    """
    if not blocks or any(b.dtype != np.uint8 for b in blocks):
        return None
    n = sum(b.size for b in blocks)
    low = sum(int(np.count_nonzero(b == 0)) for b in blocks) / n
    high = sum(int(np.count_nonzero(b == 255)) for b in blocks) / n
    if max(low, high) < EIGHT_BIT_CLIPPED:
        return None
    return (
        f"the data are 8-bit with {100 * low:.2g} % of the pixels at 0 and {100 * high:.2g} % at 255: they look "
        "contrast-stretched and clipped, not raw camera counts. The gain and photon numbers above are in stretched "
        "units; 'noise-model bootstrap' and 'train --method pn2v-boot' treat the clipped pixels as censored; compare "
        "results with a reference image only after an affine fit; use the raw camera files if you have them"
    )


_INDEPENDENT = "pixel-independent noise"
_ZERO_MEAN = "zero-mean noise"
_POISSON = "Poisson-dominated noise"


def _independence(structure: NoiseStructure) -> Assumption:
    corr = structure.correlated_axes
    if not corr:
        lag = ", ".join(f"{k} {v.strength:+.2f}" for k, v in structure.axes.items())
        return Assumption(
            _INDEPENDENT, True, f"neighbouring pixels' noise is uncorrelated (lag-1: {lag})."
        )
    parts = []
    for name in corr:
        a = structure.axes[name]
        parts.append(f"along {name} over {a.extent} pixels (lag-1 {a.strength:+.2f})")
    return Assumption(_INDEPENDENT, False, "the noise is correlated " + "; ".join(parts) + ".")


def _zero_mean(estimate: PoissonGaussianEstimate, residual: ResidualQuality | None) -> Assumption:
    clip = estimate.clipped_fraction
    if clip > MAX_CLIPPED:
        return Assumption(
            _ZERO_MEAN,
            False,
            f"{100 * clip:.2g} % of pixels sit at the lowest or highest value the file can hold "
            "(clipped), so the noise there is not zero-mean; lower the camera gain or raise "
            "its offset.",
        )
    if residual is not None and abs(residual.residual_mean) > 0.1 * residual.residual_std:
        return Assumption(
            _ZERO_MEAN,
            False,
            f"the residual of the prediction has mean {residual.residual_mean:+.3g} ADU, "
            f"more than a tenth of its spread ({residual.residual_std:.3g} ADU).",
        )
    return Assumption(_ZERO_MEAN, True, "no clipped pixels at the bottom or top of the value range.")


def _poisson(estimate: PoissonGaussianEstimate) -> Assumption:
    if not estimate.gain > 0:
        return Assumption(
            _POISSON, False, "the noise does not grow with intensity (signal-independent noise)."
        )
    photon_var = estimate.gain * max(estimate.data_mean - estimate.offset, 0.0)
    read_var = estimate.read_noise_sigma**2
    return Assumption(
        _POISSON,
        bool(photon_var > read_var),
        f"at the mean intensity photon noise has variance {_fmt(photon_var)} ADU² against "
        f"{_fmt(read_var)} ADU² of read noise.",
    )


def _assumptions(
    estimate: PoissonGaussianEstimate | None,
    structure: NoiseStructure,
    residual: ResidualQuality | None,
) -> list[Assumption]:
    out = [_independence(structure)]
    if estimate is None:
        out.append(Assumption(_ZERO_MEAN, None, "not checked (no noise model was fitted)."))
        out.append(Assumption(_POISSON, None, "not checked (no noise model was fitted)."))
    else:
        out += [_zero_mean(estimate, residual), _poisson(estimate)]
    return out


def _estimate_notes(estimate: PoissonGaussianEstimate, trusted: bool) -> list[str]:
    notes = list(estimate.notes)
    if not trusted:
        notes.append(
            f"the mean-variance line is not trustworthy (gain {estimate.gain:.3g}, "
            f"r² {estimate.r2:.2f}): the data may be rescaled or not Poisson–Gaussian; "
            "gain and offset are not used"
        )
    if estimate.offset_source == "dark-level":
        notes.append(
            "the offset was taken from the darkest pixels; if no part of the sample is free of "
            "light (no background), pass the camera's offset instead"
        )
    return notes


def _recommend(structure: NoiseStructure, photons: float, low_photon_count: float, gain_opts: list[str],
               trusted: bool, notes: list[str]) -> tuple[str, list[str], list[str]]:
    """The method to train, its options and the reasons (``notes`` gets the caveats)."""
    reasons: list[str] = []
    corr = structure.correlated_axes
    if corr:
        best = structure.axes[corr[0]]
        method = "n2v"
        options = ["--method", "n2v", "--struct-mask", f"{best.axis}:{best.mask_length}"]
        reasons.append(
            f"the noise is correlated along {best.axis} up to {best.max_lag} pixels away (runs of "
            f"{best.extent} pixels), so a plain blind spot would let the network learn the noise; "
            f"a {best.mask_length}-pixel mask along {best.axis} hides every correlated "
            "neighbour (structN2V)."
        )
        if len(corr) > 1:
            notes.append(
                "the noise is correlated along several axes ("
                + ", ".join(corr)
                + "); the mask covers the strongest only, expect some remaining structure"
            )
        if np.isfinite(photons) and photons < low_photon_count:
            notes.append(
                f"the signal is low ({photons:.3g} photons per pixel), but bayes-poisson assumes "
                "pixel-independent noise, which does not hold here"
            )
    elif np.isfinite(photons) and photons < low_photon_count:
        method = "bayes-poisson"
        options = ["--method", "bayes-poisson"] + gain_opts
        reasons.append(
            f"the noise is pixel-independent and the signal is low ({photons:.3g} photons per pixel, "
            f"below {low_photon_count:g}): bayes-poisson models these counts exactly (Poisson with "
            "the measured gain and offset) and puts every pixel into its loss; trained on a "
            "680 x 1100 BPAE field at 5 photons it led n2v by 0.5 dB, 0.4 dB of it from a better "
            "blind-spot prediction and 0.1 dB from the pixel itself (docs/benchmarks.md)."
        )
    else:
        method = "n2v"
        options = ["--method", "n2v"]
        reasons.append("the noise is pixel-independent, which is what Noise2Void needs.")
        if trusted:
            reasons.append(
                "alternative: pn2v, sometimes a little more accurate: 'quietscope train DATA --method pn2v-boot' "
                "trains N2V, bootstraps a noise model from it and a PN2V warm-started from it, each --steps long "
                "(1.3 x --steps in all), and keeps PN2V only if a ground-truth-free check of what predict writes "
                "says it beats N2V. By hand: "
                "'quietscope noise-model bootstrap N2V_MODEL DATA -o nm.json' (or 'noise-model fit --calibration STACK'), "
                "then '--method pn2v --noise-model nm.json --init N2V_MODEL' (camera: " + " ".join(gain_opts) + ")."
            )
    return method, options, reasons


def build_report(
    estimate: PoissonGaussianEstimate | None,
    structure: NoiseStructure,
    residual: ResidualQuality | None = None,
    *,
    low_photon_count: float = LOW_PHOTON_COUNT,
) -> NoiseReport:
    """Combine the measurements into assumptions and a method recommendation.

    Rules, in order:

    1. Correlated noise along an axis: ``n2v`` with ``--struct-mask AXIS:LENGTH`` along the
       most strongly correlated axis. ``LENGTH = 2 * max_lag + 1`` covers every correlated
       neighbour on both sides of the blind spot (noise made by a 5-pixel box is
       correlated up to 4 pixels away, so the mask is 9 pixels long).
    2. Pixel-independent noise at a mean below ``low_photon_count`` photons per pixel (with
       a trusted noise model): ``bayes-poisson`` with ``--gain`` and ``--offset``.
    3. Otherwise ``n2v``; ``pn2v`` (with a noise model fitted by ``quietscope noise-model``)
       is named as the alternative when the camera model is trusted.

    Parameters
    ----------
    estimate : PoissonGaussianEstimate or None
        Camera noise model (None if it could not be fitted).
    structure : NoiseStructure
        From :func:`~quietscope.noise_analysis.correlation.detect_structured_noise`.
    residual : ResidualQuality, optional
        From :func:`~quietscope.noise_analysis.correlation.residual_quality`.
    low_photon_count : float
        Mean photons per pixel below which ``bayes-poisson`` is advised.

    Returns
    -------
    NoiseReport
    """
    if not low_photon_count > 0:
        raise ConfigError(f"low_photon_count={low_photon_count} must be positive (default 20)")
    assumptions = _assumptions(estimate, structure, residual)
    notes = list(structure.notes)
    trusted = estimate is not None and estimate.gain > 0 and estimate.r2 >= MIN_R2
    if estimate is not None:
        notes += _estimate_notes(estimate, trusted)
    photons = estimate.mean_photons if trusted else float("nan")
    gain_opts = (
        ["--gain", _fmt(estimate.gain), "--offset", _fmt(estimate.offset)] if trusted else []
    )
    method, options, reasons = _recommend(structure, photons, low_photon_count, gain_opts, trusted, notes)
    return NoiseReport(
        estimate=estimate,
        structure=structure,
        residual=residual,
        assumptions=assumptions,
        method=method,
        options=options,
        reasons=reasons,
        notes=notes,
    )


def analyse_noise(
    blocks: Sequence[np.ndarray] | np.ndarray,
    *,
    axes: str | None = None,
    offset: float | None = None,
    max_lag: int = 6,
    threshold: float = DEFAULT_THRESHOLD,
    low_photon_count: float = LOW_PHOTON_COUNT,
) -> NoiseReport:
    """Measure noise correlation and the camera noise model of a sample of raw blocks.

    The noise correlation is measured first, so that the high-pass of the gain fit runs
    along an in-plane axis without correlated noise (correlated noise along it would bias
    the variances low).

    Parameters
    ----------
    blocks : sequence of numpy.ndarray or numpy.ndarray
        Raw 2D ``(y, x)`` or 3D ``(z, y, x)`` blocks (camera values, not rescaled).
    axes : str, optional
        Axis letters of the blocks; ``"yx"`` / ``"zyx"`` by default.
    offset : float, optional
        Known camera offset; estimated from the darkest pixels when omitted.
    max_lag : int
        Largest lag of the autocorrelation.
    threshold : float
        |Correlation| counted as correlated.
    low_photon_count : float
        See :func:`build_report`.

    Returns
    -------
    NoiseReport
    """
    raw = [blocks] if isinstance(blocks, np.ndarray) else list(blocks)
    data = as_blocks(raw, min_size=16)
    axes = _check_axes(axes, data[0].ndim)
    structure = detect_structured_noise(raw_noise_autocorrelation(data, max_lag), axes, threshold)
    ndim = data[0].ndim
    hp_axis = ndim - 2
    for k in (ndim - 2, ndim - 1):
        if not structure.axes[axes[k]].correlated:
            hp_axis = k
            break
    # The raw blocks keep their dtype, from which clipping is detected.
    estimate = estimate_poisson_gaussian(raw, offset=offset, axis=hp_axis)
    if structure.axes[axes[hp_axis]].correlated:
        estimate.notes.append(
            "the noise is correlated along both y and x, so the gain and read noise are "
            "underestimated"
        )
    return build_report(estimate, structure, low_photon_count=low_photon_count)
