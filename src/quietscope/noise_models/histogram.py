"""Histogram noise model of Probabilistic Noise2Void (Krull et al., 2020).

A ``B x B`` table over one shared ``[low, high]`` range for signal (rows) and observation
(columns). Each row is the normalised histogram of the observations whose signal falls in that
row's bin, stored as a probability *density* over ``x`` (so ``p(x|s)`` integrates to one over
``x``). Lookups are piecewise constant in ``x`` and linear in ``s`` between row centres, which
makes the likelihood differentiable in ``s``.

Outside its *support* (the centres of the first and last signal rows that received data) the
table has no information: rows there are copies of the edge row, so PN2V's likelihood is flat
in ``s`` and a prior sample that drifts there gets no gradient back. Measured on BPAE (see
docs/benchmarks.md) 1 % of the prior samples sat 2000 units below any signal and the prior
mean lost 10 dB. Beyond the support the likelihood therefore falls off as a Gaussian in the
distance, with a scale of one bin: inside the support nothing changes, outside every sample
is pulled back towards signals the calibration has seen.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.interpolate import interp1d

from quietscope.errors import ConfigError, InputError, ModelError
from quietscope.noise_models.base import NoiseModel, as_float_array, read_float

#: Floor on every bin's probability, so no likelihood (and no log) is ever zero.
PROB_FLOOR = 1e-10
#: Weight and scale (in units of the row's noise std) of the smooth, heavy-tailed "defensive"
#: component mixed into the table; see :meth:`HistogramNoiseModel.log_likelihood`.
TAIL_WEIGHT = 1e-4
TAIL_WIDTH = 2.0


class HistogramNoiseModel(NoiseModel):
    """``p(x | s)`` looked up in a 2D histogram (PN2V).

    Parameters
    ----------
    density : array_like, shape (B, B)
        ``density[i, j]`` = p(x in column bin j | s in row bin i) / bin width; each row
        integrates to one.
    low, high : float
        The range shared by both axes, raw units.
    support : (float, float), optional
        Signals the table was filled from (centres of the first and last filled rows); default
        the whole range (row centres 0 and B-1).
    """

    kind: ClassVar[str] = "histogram"

    def __init__(self, density: Any, low: float, high: float, support: tuple[float, float] | None = None) -> None:
        super().__init__()
        table = np.asarray(density, dtype=np.float32)
        if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] < 2:
            raise ConfigError(
                f"histogram density has shape {table.shape}; it must be square with >= 2 bins"
            )
        if not high > low:
            raise ConfigError(f"histogram range [{low}, {high}] is empty; need high > low")
        self.register_buffer("density", torch.from_numpy(table.copy()))
        self.low = float(low)
        self.high = float(high)
        w = self.bin_width
        full = (self.low + 0.5 * w, self.high - 0.5 * w)
        lo_s, hi_s = (float(v) for v in (support if support is not None else full))
        if not (full[0] - 1e-6 * w <= lo_s <= hi_s <= full[1] + 1e-6 * w):
            raise ConfigError(f"histogram support [{lo_s}, {hi_s}] must lie within the row centres {full}")
        self.support = (lo_s, hi_s)
        # Noise std of each row, for the defensive component.
        _, sigma = self.mean_std(self.low + (np.arange(table.shape[0]) + 0.5) * w)
        self.register_buffer("row_sigma", torch.from_numpy(np.maximum(sigma, w).astype(np.float32)))

    @property
    def bins(self) -> int:
        return int(self.density.shape[0])

    @property
    def bin_width(self) -> float:
        return (self.high - self.low) / self.bins

    @property
    def signal_range(self) -> tuple[float, float]:
        return self.low, self.high

    @property
    def observation_range(self) -> tuple[float, float]:
        return self.low, self.high

    def likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_likelihood(x, s))

    def table_likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The table's density at ``(x, s)``, without the fall-off beyond the support."""
        device = self.density.device
        x, s = torch.broadcast_tensors(
            torch.as_tensor(x, device=device), torch.as_tensor(s, device=device)
        )
        n = self.bins
        # Values outside the range use the edge bins (as PN2V does); check_range is the
        # user-facing guard against data the table does not cover.
        col = torch.clamp(torch.floor((x - self.low) / self.bin_width), 0, n - 1).long()
        # Rows are sampled at their bin centres; the fractional row index carries the
        # gradient with respect to s.
        row_f = torch.clamp((s - self.low) / self.bin_width - 0.5, 0, n - 1)
        row0 = torch.clamp(torch.floor(row_f.detach()), max=n - 2).long()
        frac = row_f - row0.to(row_f.dtype)
        density = self.density
        return density[row0, col] * (1 - frac) + density[row0 + 1, col] * frac

    def log_likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``log p(x|s)``: the table, with two changes that only matter where it is flat in ``s``.

        * Beyond the support the table's value at the nearest supported signal falls off as a
          Gaussian in the distance (scale one bin).
        * A Cauchy density centred on ``s`` with scale ``TAIL_WIDTH`` times the row's noise std
          gets weight ``TAIL_WEIGHT``. Far from ``x`` every bin is at the floor, so without it a
          prior sample there gets no gradient at all; PN2V's network starts with all samples of
          a dark pixel that far off, and such samples never learn (measured: prior mean 10 dB
          below the GMM's). Heavy-tailed so that it stays above the floor hundreds of stds away
          (a Gaussian would not); where the table has data it changes the likelihood by ~1e-4.
        """
        device = self.density.device
        x, s = torch.broadcast_tensors(torch.as_tensor(x, device=device), torch.as_tensor(s, device=device))
        inside = torch.clamp(s, *self.support)
        outside = 0.5 * ((s - inside) / self.bin_width) ** 2
        table = torch.log(self.table_likelihood(x, inside)) - outside
        row = torch.clamp(torch.round((inside.detach() - self.low) / self.bin_width - 0.5), 0, self.bins - 1).long()
        gamma = (TAIL_WIDTH * self.row_sigma[row]).to(table.dtype)
        tail = -torch.log1p(((x - s) / gamma) ** 2) - torch.log(gamma) - math.log(math.pi)
        return torch.logaddexp(table + math.log1p(-TAIL_WEIGHT), tail + math.log(TAIL_WEIGHT))

    def mean_std(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of ``x`` given ``s``, exact for the piecewise-constant rows."""
        s = np.asarray(s, dtype=np.float64)
        table = self.density.detach().double().cpu().numpy()
        n, w = self.bins, self.bin_width
        row_f = np.clip((s.ravel() - self.low) / w - 0.5, 0, n - 1)
        row0 = np.minimum(np.floor(row_f), n - 2).astype(int)
        frac = (row_f - row0)[:, None]
        rows = table[row0] * (1 - frac) + table[row0 + 1] * frac
        centres = self.low + (np.arange(n) + 0.5) * w
        mass = rows.sum(axis=1) * w
        mean = rows @ centres * w / mass
        # A uniform density on a bin of width w adds w^2/12 to the second moment.
        second = (rows @ (centres**2 + w**2 / 12)) * w / mass
        std = np.sqrt(np.maximum(second - mean**2, 0.0))
        return mean.reshape(s.shape), std.reshape(s.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": 2,
            "low": self.low,
            "high": self.high,
            "support": list(self.support),
            "density": self.density.detach().cpu().numpy().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistogramNoiseModel:
        """Inverse of :meth:`to_dict`; :class:`ModelError` if the description is broken."""
        low, high = read_float(d, "low"), read_float(d, "high")
        try:
            table = np.asarray(d["density"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                "histogram noise model lacks a numeric 'density' table; re-save the noise model"
            ) from None
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise ModelError(
                "histogram noise model table has negative or non-finite values; refit it"
            )
        support = d.get("support")  # version 1 files: the whole range
        try:
            if support is not None:
                support = (float(support[0]), float(support[1]))
            return cls(table, low, high, support)
        except (TypeError, ValueError, IndexError):
            raise ModelError("histogram noise model has a malformed 'support'; refit it") from None
        except ConfigError as e:
            raise ModelError(f"{e}; refit and re-save the noise model") from None


#: Default for :func:`fit_histogram`'s ``min_row_pairs``.
MIN_ROW_PAIRS = 1000


def pool_sparse_rows(counts: np.ndarray, min_pairs: int) -> np.ndarray:
    """Give every signal row at least ``min_pairs`` pairs by borrowing from its neighbours.

    Row ``i`` with fewer pairs adds rows ``i±1, i±2, ...`` (until the total reaches
    ``min_pairs``), each shifted along ``x`` by the signal difference, i.e. assuming the noise
    distribution translates with the signal over those few bins. Rows that already have
    ``min_pairs`` are returned unchanged; empty rows stay empty (they are interpolated later).

    Calibration data are mostly background: in a 192² BPAE crop x 30 frames the rows near the
    brightest signals hold ~50 pairs spread over ~25 columns, and the PN2V gradient with respect
    to ``s`` taken from such rows points the wrong way about half the time (measured).
    """
    n = counts.shape[0]
    row_total = counts.sum(axis=1)
    out = counts.astype(np.float64, copy=True)
    for i in np.flatnonzero((row_total > 0) & (row_total < min_pairs)):
        acc, total, k = counts[i].astype(np.float64), float(row_total[i]), 0
        while total < min_pairs and k < n:
            k += 1
            for j in (i - k, i + k):
                if 0 <= j < n and row_total[j] > 0:
                    shift = i - j  # shared range: one signal bin == one observation bin
                    shifted = np.zeros(n)
                    if shift >= 0:
                        shifted[shift:] = counts[j, : n - shift]
                    else:
                        shifted[:shift] = counts[j, -shift:]
                    acc += shifted
                    total += float(row_total[j])
        out[i] = acc
    return out


def fit_histogram(
    signal: np.ndarray,
    observation: np.ndarray,
    bins: int = 256,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name for it
    min_row_pairs: int = MIN_ROW_PAIRS,
) -> HistogramNoiseModel:
    """Fit a PN2V histogram noise model to ``(signal, observation)`` pixel pairs.

    Parameters
    ----------
    signal, observation : np.ndarray
        Same-shaped arrays of true (or pseudo-) signal and noisy observation, raw units;
        see :mod:`quietscope.noise_models.pairs` for ways to get them.
    bins : int, optional
        Bins per axis (PN2V uses 256).
    range : (float, float), optional
        Range shared by both axes; default spans all signal and observation values.
    min_row_pairs : int, optional
        Signal rows with fewer pairs borrow shifted counts from neighbouring rows until they
        have this many (:func:`pool_sparse_rows`); 0 keeps PN2V's plain per-row histograms.

    Returns
    -------
    HistogramNoiseModel

    Notes
    -----
    Rows (signal bins) that received no pixel are interpolated linearly along the signal
    axis from the nearest filled rows (rows beyond the last filled one copy it), so every
    row is a proper density; PN2V leaves them empty instead.
    """
    s = as_float_array(signal, "signal").ravel()
    x = as_float_array(observation, "observation").ravel()
    if s.shape != x.shape:
        raise InputError(
            f"signal has {s.size} pixels but observation has {x.size}; pass matching arrays"
        )
    if int(bins) != bins or bins < 2:
        raise ConfigError(f"bins={bins} is invalid; use an integer >= 2 (PN2V uses 256)")
    bins = int(bins)
    if range is None:
        low = float(min(s.min(), x.min()))
        high = float(max(s.max(), x.max()))
    else:
        low, high = (float(v) for v in range)
    if not high > low:
        raise InputError(
            f"histogram range [{low:.6g}, {high:.6g}] is empty; the data are constant or "
            "range is reversed: pass range=(low, high) with high > low"
        )

    counts, _, _ = np.histogram2d(s, x, bins=bins, range=[[low, high], [low, high]])
    filled = np.flatnonzero(counts.sum(axis=1) > 0)
    if min_row_pairs > 0:
        counts = pool_sparse_rows(counts, int(min_row_pairs))
    if filled.size == 0:
        raise InputError(
            f"no signal value lies inside the histogram range [{low:.6g}, {high:.6g}]; "
            "widen range or check the signal array"
        )
    prob = counts[filled] / counts[filled].sum(axis=1, keepdims=True)
    if filled.size == 1:
        prob = np.repeat(prob, bins, axis=0)
    else:
        # Convex combinations of normalised rows stay normalised.
        prob = interp1d(
            filled, prob, axis=0, bounds_error=False, fill_value=(prob[0], prob[-1])
        )(np.arange(bins))
    prob = np.maximum(prob, PROB_FLOOR)
    prob /= prob.sum(axis=1, keepdims=True)
    width = (high - low) / bins
    support = (low + (filled[0] + 0.5) * width, low + (filled[-1] + 0.5) * width)
    return HistogramNoiseModel(prob / width, low, high, support)
