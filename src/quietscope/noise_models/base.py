"""The pixel noise model protocol: ``p(x | s)``, the density of a noisy observation ``x`` given
the true signal ``s`` of the same pixel.

Probabilistic Noise2Void and denoiSplit train through :meth:`NoiseModel.log_likelihood`, so it
is written in torch and differentiable in ``s``. Everything is in raw data units: a model stores
the intensity range it was fitted on and refuses (:meth:`NoiseModel.check_range`) data outside it.

Noise models are :class:`torch.nn.Module` objects holding their tables as buffers, so that a
method can own one as a sub-module and move it to the GPU with the network. On disk a noise
model is a small JSON file (:meth:`NoiseModel.save`), never a pickle.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.integrate import trapezoid

from quietscope.errors import InputError, ModelError, OutputError

#: Format version written into every saved noise model.
FORMAT_VERSION = 1

#: Fraction of the model's range by which data may overshoot it (see check_range).
RANGE_TOLERANCE = 0.1

#: Number of points of the x grid used to integrate p(x|s) numerically.
_N_GRID = 4096


class NoiseModel(torch.nn.Module, ABC):
    """A pixel noise model ``p(x | s)``.

    Subclasses implement :meth:`log_likelihood`, the two ranges and :meth:`to_dict`; the
    rest (likelihood, moments, range check, saving) follows from those.
    """

    #: Name written as ``"kind"`` into :meth:`to_dict`.
    kind: ClassVar[str] = ""

    @abstractmethod
    def log_likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log p(x | s)`` (density in raw units); shapes broadcast.

        Parameters
        ----------
        x : torch.Tensor
            Noisy observations, raw units.
        s : torch.Tensor
            Signal hypotheses, raw units. The result is differentiable with respect to ``s``.

        Returns
        -------
        torch.Tensor
            ``log p(x | s)``, shaped like ``x`` and ``s`` broadcast together.
        """

    def likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Elementwise ``p(x | s)``; ``exp`` of :meth:`log_likelihood`."""
        return torch.exp(self.log_likelihood(x, s))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.log_likelihood(x, s)

    @property
    @abstractmethod
    def signal_range(self) -> tuple[float, float]:
        """``(low, high)`` signal values the model was fitted on, raw units."""

    @property
    @abstractmethod
    def observation_range(self) -> tuple[float, float]:
        """``(low, high)`` observation values the model describes, raw units."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (plain lists and floats) with a ``"kind"`` key."""

    # ---- derived behaviour -----------------------------------------------------------------
    def mean_std(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of ``x`` given each signal value in ``s``.

        The default integrates ``p(x | s)`` numerically on a fine grid over
        :attr:`observation_range`; subclasses override it where a closed form exists.

        Parameters
        ----------
        s : np.ndarray
            Signal values, raw units, any shape.

        Returns
        -------
        mean, std : np.ndarray
            Arrays shaped like ``s``.
        """
        s = np.asarray(s, dtype=np.float64)
        lo, hi = self.observation_range
        grid = np.linspace(lo, hi, _N_GRID)
        with torch.no_grad():
            p = self.likelihood(
                torch.as_tensor(grid[:, None]), torch.as_tensor(s.reshape(1, -1))
            ).double().cpu().numpy()
        mass = trapezoid(p, grid, axis=0)
        mean = trapezoid(p * grid[:, None], grid, axis=0) / mass
        second = trapezoid(p * grid[:, None] ** 2, grid, axis=0) / mass
        std = np.sqrt(np.maximum(second - mean**2, 0.0))
        return mean.reshape(s.shape), std.reshape(s.shape)

    def check_range(self, x_min: float, x_max: float) -> None:
        """Raise :class:`InputError` when data values fall outside the modelled range.

        Values up to :data:`RANGE_TOLERANCE` of the range's width beyond either end pass:
        data always holds a few pixels brighter or darker than the fitting pairs (e.g. the
        ones :func:`~quietscope.noise_models.pairs_from_prediction` drops), and the models
        extend gracefully past their ends. Data far outside means another intensity scale.

        Parameters
        ----------
        x_min, x_max : float
            Smallest and largest value of the data the model is about to be used on.
        """
        lo, hi = self.observation_range
        margin = RANGE_TOLERANCE * (hi - lo)
        if x_min < lo - margin or x_max > hi + margin:
            raise InputError(
                f"data range [{x_min:.6g}, {x_max:.6g}] lies outside the {self.kind} noise "
                f"model's range [{lo:.6g}, {hi:.6g}]; refit the noise model on data like this"
            )

    def save(self, path: str | Path) -> Path:
        """Write the model as a small JSON file and return its path."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_dict()))
        except OSError as e:
            raise OutputError(
                f"cannot write noise model to {path}: {e.strerror}; choose a writable path"
            ) from None
        return path


def as_float_array(values: Any, name: str) -> np.ndarray:
    """``values`` as a float array; :class:`InputError` if empty or not finite."""
    a = np.asarray(values)
    if a.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {a.dtype}; pass a real-valued numeric array")
    a = a.astype(np.float32 if a.dtype.itemsize <= 4 else np.float64, copy=False)
    if a.size == 0:
        raise InputError(f"{name} is empty; pass at least one pixel")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or infinite values; mask or replace them first")
    return a


def read_float(d: dict[str, Any], key: str) -> float:
    """``d[key]`` as a finite float; :class:`ModelError` naming the key otherwise."""
    try:
        v = float(d[key])
    except (KeyError, TypeError, ValueError):
        raise ModelError(
            f"noise model description lacks a numeric {key!r}; re-save the noise model"
        ) from None
    if not math.isfinite(v):
        raise ModelError(f"noise model {key!r} is {v}; refit and re-save the noise model")
    return v
