"""Pixel noise models ``p(x | s)`` for Probabilistic Noise2Void and denoiSplit.

* :class:`HistogramNoiseModel` (:func:`fit_histogram`) - PN2V's 2D histogram;
* :class:`GMMNoiseModel` (:func:`fit_gmm`) - the Gaussian mixture of PPN2V;
* :mod:`~quietscope.noise_models.pairs` - where the ``(signal, observation)`` pairs come from;
* :func:`plot_noise_model` - a PNG to judge a fit by eye.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quietscope.errors import ModelError
from quietscope.noise_models.base import NoiseModel
from quietscope.noise_models.fit import DEFAULT_MAX_PAIRS, fit_noise_model
from quietscope.noise_models.gmm import GMMNoiseModel, fit_gmm
from quietscope.noise_models.histogram import HistogramNoiseModel, fit_histogram
from quietscope.noise_models.pairs import (
    detect_clipping,
    match_variance_line,
    pairs_from_calibration,
    pairs_from_paired,
    pairs_from_prediction,
)
from quietscope.noise_models.plot import plot_noise_model

_KINDS: dict[str, type[NoiseModel]] = {
    HistogramNoiseModel.kind: HistogramNoiseModel,
    GMMNoiseModel.kind: GMMNoiseModel,
}


def noise_model_from_dict(d: dict[str, Any]) -> NoiseModel:
    """Rebuild a noise model from :meth:`NoiseModel.to_dict` output.

    Parameters
    ----------
    d : dict
        A description with a ``"kind"`` key (``"histogram"`` or ``"gmm"``).

    Returns
    -------
    NoiseModel
    """
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in _KINDS:
        raise ModelError(
            f"unknown noise model kind {kind!r}; expected one of {', '.join(sorted(_KINDS))}"
            " (was the file written by NoiseModel.save?)"
        )
    return _KINDS[kind].from_dict(d)  # type: ignore[attr-defined]


def load_noise_model(path: str | Path) -> NoiseModel:
    """Read a noise model written by :meth:`NoiseModel.save` (a JSON file)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"noise model file {path} does not exist; check the path or fit a noise model first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(
            f"cannot read noise model {path} ({type(e).__name__}); pass a JSON file written by "
            "NoiseModel.save"
        ) from None
    return noise_model_from_dict(d)


__all__ = [
    "DEFAULT_MAX_PAIRS",
    "detect_clipping",
    "fit_noise_model",
    "GMMNoiseModel",
    "HistogramNoiseModel",
    "NoiseModel",
    "fit_gmm",
    "fit_histogram",
    "load_noise_model",
    "match_variance_line",
    "noise_model_from_dict",
    "pairs_from_calibration",
    "pairs_from_paired",
    "pairs_from_prediction",
    "plot_noise_model",
]
