"""Fit a noise model of either kind to ``(signal, observation)`` pairs (arrays in, model out)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from quietscope.errors import ConfigError
from quietscope.noise_models.base import NoiseModel
from quietscope.noise_models.gmm import fit_gmm
from quietscope.noise_models.histogram import MIN_ROW_PAIRS, fit_histogram

#: Pairs sampled from big data by default: enough for a 256-bin histogram or a 3-component
#: GMM (PPN2V fits on ~10^6 pixels), a few MB of memory.
DEFAULT_MAX_PAIRS = 1_000_000

Kind = Literal["gmm", "histogram"]


def fit_noise_model(
    signal: np.ndarray,
    observation: np.ndarray,
    kind: Kind = "gmm",
    *,
    n_gaussian: int = 3,
    n_coeff: int = 2,
    bins: int = 256,
    min_row_pairs: int = MIN_ROW_PAIRS,
    n_iterations: int = 2000,
    seed: int = 0,
    observed_range: tuple[float, float] | None = None,
    clip: tuple[float | None, float | None] | None = None,
    half_step: float = 0.5,
    min_sigma: float | None = None,
) -> NoiseModel:
    """Fit a noise model of ``kind`` to ``(signal, observation)`` pairs.

    Parameters
    ----------
    signal, observation : np.ndarray
        Flat arrays of equal length, raw units.
    kind : {"gmm", "histogram"}
        Gaussian mixture (PPN2V, smooth, few parameters) or 2D histogram (PN2V, needs many
        pairs but assumes no shape).
    n_gaussian, n_coeff, n_iterations : int
        GMM components, polynomial coefficients per parameter, optimisation steps.
    bins : int
        Histogram bins per axis.
    min_row_pairs : int
        Histogram: sparse signal rows borrow shifted neighbours up to this many pairs
        (:func:`~quietscope.noise_models.histogram.pool_sparse_rows`; 0 = plain PN2V rows).
    seed : int
        Seeds the GMM fit.
    observed_range : (float, float), optional
        GMM: observations it must accept beyond ``observation``'s range.
    clip, half_step : optional
        GMM: clipping limits and half quantisation step of the observations
        (:class:`~quietscope.noise_models.gmm.GMMNoiseModel`); ``None``: no clipping.
    min_sigma : float, optional
        GMM: floor on each component's std (default ``1e-3 x`` the signal range).

    Returns
    -------
    NoiseModel
    """
    if kind == "gmm":
        return fit_gmm(signal, observation, n_gaussian, n_coeff, n_iterations=n_iterations, seed=seed,
                       observed_range=observed_range, clip=clip, half_step=half_step, min_sigma=min_sigma)
    if kind == "histogram":
        return fit_histogram(signal, observation, bins=bins, min_row_pairs=min_row_pairs)
    raise ConfigError(f"noise model kind {kind!r} is unknown; use gmm or histogram")
