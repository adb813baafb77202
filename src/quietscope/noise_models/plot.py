"""A picture of a noise model, to judge a fit by eye (after Fig. 4 of the PN2V paper)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quietscope.errors import InputError, OutputError
from quietscope.noise_models.base import NoiseModel, as_float_array

#: Pixels whose signal is within this fraction of the signal range of a level count as "near".
_NEAR_FRACTION = 0.01

#: Fewest nearby observations worth a histogram.
_MIN_NEAR = 20


def _slice_levels(model: NoiseModel, signal: np.ndarray | None) -> np.ndarray:
    """Four signal levels: quantiles of the data's signal, else spread over the model's range."""
    if signal is not None:
        return np.percentile(signal, [10, 35, 60, 85])
    lo, hi = model.signal_range
    return lo + (hi - lo) * np.array([1, 3, 5, 7]) / 8


def _draw_slices(fig: Any, grid: Any, ax: Any, model: NoiseModel, signal: np.ndarray | None,
                 observation: np.ndarray | None) -> None:
    """p(x | s) at four signal levels, each over the data observed near that level (if given)."""
    s_lo, s_hi = model.signal_range
    x_lo, x_hi = model.observation_range
    levels = _slice_levels(model, signal)
    means, stds = model.mean_std(levels)
    near = _NEAR_FRACTION * (s_hi - s_lo)
    for i, (level, mean, std) in enumerate(zip(levels, means, stds)):
        ax.axvline(level, color="cyan", lw=0.8, ls="--")
        sub = fig.add_subplot(grid[i // 2, 2 + i % 2])
        xs = np.linspace(max(mean - 5 * std, x_lo), min(mean + 5 * std, x_hi), 400)
        title = f"s = {level:.4g}"
        if signal is not None:
            obs = observation[np.abs(signal - level) <= near]
            if obs.size >= _MIN_NEAR:
                sub.hist(obs, bins=60, range=(xs[0], xs[-1]), density=True, color="0.75",
                         label=f"data ({obs.size} px)")
            else:
                title += f" (only {obs.size} px nearby)"
        with torch.no_grad():
            curve = model.likelihood(torch.as_tensor(xs), torch.tensor(float(level)))
        sub.plot(xs, curve.double().cpu().numpy(), color="C3", label="model")
        sub.set_title(title, fontsize=9)
        sub.set_xlabel("x", fontsize=8)
        sub.tick_params(labelsize=7)
        sub.legend(fontsize=7)


def plot_noise_model(
    model: NoiseModel,
    signal: np.ndarray | None = None,
    observation: np.ndarray | None = None,
    *,
    path: str | Path,
) -> Path:
    """Write a PNG showing ``p(x | s)``: a heat map and slices at four signal levels.

    Parameters
    ----------
    model : NoiseModel
        The model to draw.
    signal, observation : np.ndarray, optional
        The ``(s, x)`` pairs it was fitted on; when given, each slice is drawn over the
        histogram of the observations whose signal is near that slice's level.
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        ``path``.
    """
    # Imported here so that using noise models never pulls in matplotlib.
    from matplotlib.figure import Figure

    if (signal is None) != (observation is None):
        raise InputError("pass both signal and observation, or neither, to plot_noise_model")
    if signal is not None:
        signal = as_float_array(signal, "signal").ravel()
        observation = as_float_array(observation, "observation").ravel()
        if signal.shape != observation.shape:
            raise InputError(
                f"signal has {signal.size} pixels but observation has {observation.size}; "
                "pass matching arrays"
            )
    s_lo, s_hi = model.signal_range
    x_lo, x_hi = model.observation_range
    s_grid = np.linspace(s_lo, s_hi, 256)
    x_grid = np.linspace(x_lo, x_hi, 256)
    with torch.no_grad():
        p = model.likelihood(torch.as_tensor(x_grid[:, None]), torch.as_tensor(s_grid[None, :]))
        p = p.double().cpu().numpy()

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[:, :2])
    # The density spans orders of magnitude along s (shot noise), so scale each column to
    # its own peak: shape is what matters here.
    im = ax.imshow(
        p / p.max(axis=0, keepdims=True),
        origin="lower",
        aspect="auto",
        extent=(s_lo, s_hi, x_lo, x_hi),
        cmap="magma",
    )
    fig.colorbar(im, ax=ax, label="p(x | s) / max over x")
    ax.set_xlabel("signal s")
    ax.set_ylabel("observation x")
    ax.set_title(f"{model.kind} noise model")

    _draw_slices(fig, grid, ax, model, signal, observation)
    path = Path(path)
    try:
        fig.savefig(path, dpi=100, format="png")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}; choose a writable path") from None
    return path
