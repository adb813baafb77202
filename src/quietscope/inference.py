"""A trained model as a tile function: load it for inference, measure its halo, predict tiles.

This is what prediction, noise inspection and bootstrapping share: the model is loaded once
(:func:`load_for_inference`: file, device, prediction-time options, halo), and every path,
chunked or whole-image, goes through :func:`predict_tile` so they differ only in what they read.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quietscope.device import resolve_device
from quietscope.errors import ConfigError
from quietscope.methods.modelfile import check_matches, load_model
from quietscope.nets.receptive_field import method_receptive_radius
from quietscope.tiling import Factor, halo_from_radius, whole_window

log = logging.getLogger(__name__)

TileFunction = Callable[[np.ndarray], np.ndarray]


def predict_tile(method: torch.nn.Module, tile: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Predict one tile.

    Parameters
    ----------
    method : Method
        A loaded method in eval mode.
    tile : numpy.ndarray
        ``(C, *spatial)``, spatial sizes multiples of the method's down-sampling factor.
    device : torch.device or str
        Where the method lives.

    Returns
    -------
    numpy.ndarray
        float32 ``(C_out, *spatial)`` in input units.
    """
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32))[None].to(device)
        return method.predict(x)[0].float().cpu().numpy()


def dihedral_mean(fn: TileFunction, tile: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the mean of ``fn`` over the 8 flips/90° rotations in y/x.

    The training patches are augmented with the same transforms, so each is an equally valid
    prediction; averaging them removes part of the network's orientation-dependent error.
    A block window starts and ends on multiples of the pooling factor, so its flipped and
    rotated copies keep the whole image's pooling grid and chunked == whole still holds.

    Parameters
    ----------
    fn : callable
        Tile function ``(C, *spatial) -> (C_out, *spatial)``.
    tile : numpy.ndarray
        The tile; its last two axes are y and x.

    Returns
    -------
    numpy.ndarray
        float32 mean of the 8 predictions, each mapped back before averaging.
    """
    total = None
    for k in range(4):
        for flip in (False, True):
            x = np.rot90(tile, k, axes=(-2, -1))
            if flip:
                x = x[..., ::-1]
            y = fn(np.ascontiguousarray(x))
            if flip:
                y = y[..., ::-1]
            y = np.rot90(y, -k, axes=(-2, -1)).astype(np.float64)
            total = y if total is None else total + y
    return (total / 8).astype(np.float32)


def tta_halo(halo: tuple[int, ...]) -> tuple[int, ...]:
    """Rotations swap y and x, so both need the larger of their halos."""
    h = max(halo[-2:])
    return tuple(halo[:-2]) + (h, h)


def method_halo(method: Any) -> tuple[int, ...]:
    """Measured receptive-field radius plus the method's extra halo, rounded to its factor.

    Parameters
    ----------
    method : Method
        A built or loaded method.

    Returns
    -------
    tuple of int
        Halo per spatial axis, in voxels.
    """
    radius = method_receptive_radius(method)
    extra = method.extra_halo
    return halo_from_radius(tuple(r + e for r, e in zip(radius, extra)), method.downsampling_factor)


def predict_whole(fn: TileFunction, array: np.ndarray, halo: tuple[int, ...], factor: Factor) -> np.ndarray:
    """Reference: predict a whole ``(C, *spatial)`` array in one tile, reflect-padded by ``halo``.

    Parameters
    ----------
    fn : callable
        Tile function.
    array : numpy.ndarray
        ``(C, *spatial)`` input.
    halo : tuple of int
        Halo per spatial axis (as used by the chunked path).
    factor : int or tuple of int
        Down-sampling factor; the padded window is rounded to it.

    Returns
    -------
    numpy.ndarray
        ``(C_out, *spatial)`` prediction.
    """
    spatial = array.shape[1:]
    wstart, wstop = whole_window(spatial, halo, factor)
    pad = [(0, 0)] + [(-a, b - s) for a, b, s in zip(wstart, wstop, spatial)]
    padded = np.pad(array.astype(np.float32), pad, mode="reflect")
    out = fn(padded)
    return out[(slice(None),) + tuple(slice(-a, -a + s) for a, s in zip(wstart, spatial))]


@dataclass
class LoadedModel:
    """A model ready to predict: the method, its manifest, device, halo and tile function."""

    method: Any
    manifest: dict[str, Any]
    device: torch.device
    halo: tuple[int, ...]
    tta: bool = False

    @property
    def factor(self) -> Factor:
        return self.method.downsampling_factor

    @property
    def name(self) -> str:
        return str(self.manifest["method"]["method"])

    def tile_function(self) -> TileFunction:
        """``tile -> prediction`` on this model's device (TTA applied when asked for)."""
        method, dev = self.method, self.device
        if self.tta:
            return lambda tile: dihedral_mean(lambda t: predict_tile(method, t, dev), tile)
        return lambda tile: predict_tile(method, tile, dev)


def load_for_inference(
    model_path: str | Path,
    device: str = "auto",
    inference: dict[str, Any] | None = None,
    tta: bool = False,
    spatial_axes: str | None = None,
    n_channels: int | None = None,
    where: str = "the input",
) -> LoadedModel:
    """Load a model file for prediction: device, prediction-time options, halo, checks.

    Parameters
    ----------
    model_path : str or pathlib.Path
        ``.qs`` model file.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    inference : dict, optional
        Prediction-time method options (e.g. ``{"estimate": "prior"}``); ``None`` values are
        dropped.
    tta : bool
        Average the 8 flips/rotations in y/x (the halo is equalised in y and x).
    spatial_axes, n_channels : optional
        The data's spatial axes and channel count; when given, the model is checked against them.
    where : str
        How the data is named in a mismatch error.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        The file is unreadable or the model does not fit the data.
    ConfigError
        An unknown device or option, or TTA for a method whose outputs include spreads.
    """
    dev = resolve_device(device)
    method, manifest = load_model(model_path, dev)
    method.set_inference(**{k: v for k, v in (inference or {}).items() if v is not None})
    if spatial_axes is not None and n_channels is not None:
        check_matches(manifest, spatial_axes, n_channels, where, method.predict_in_channels)
    halo = method_halo(method)
    if tta:
        if not method.supports_tta:
            raise ConfigError(f"--tta does not apply to {manifest['method']['method']!r} (its outputs include sample "
                              "spreads); leave --tta out and use --samples for a smoother estimate")
        halo = tta_halo(halo)
    return LoadedModel(method, manifest, dev, halo, tta)


@dataclass(frozen=True)
class ModelProcessor:
    """Picklable processor factory: loads a model file once per worker and predicts tiles."""

    model_path: str
    device: str = "auto"
    token: str = ""
    inference: tuple[tuple[str, Any], ...] = ()
    tta: bool = False

    def build(self) -> TileFunction:
        """Load the model (once per worker) and return its tile function."""
        return load_for_inference(self.model_path, self.device, dict(self.inference), self.tta).tile_function()


def file_token(path: str | Path, extra: str = "") -> str:
    """A short content hash of a file (plus ``extra``): identifies a processor for resume."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()[:16]
