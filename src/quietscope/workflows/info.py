"""``quietscope info`` and ``quietscope methods``: describe an image or a model file; list methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quietscope.io import open_image
from quietscope.methods import available_methods, get_method_class
from quietscope.methods.modelfile import read_manifest

#: Manifest keys ``info`` shows for a model file.
MODEL_KEYS = ("quietscope_version", "torch_version", "method", "train", "axes", "data_stats", "best_val_loss",
              "best_step", "noise_models", "calibration")


def describe(uri: str | Path, axes: str | None = None, level: int = 0) -> dict[str, Any]:
    """Describe an image (axes, shape, chunks, dtype, scale, levels) or a ``.qs`` model file.

    Parameters
    ----------
    uri : str or pathlib.Path
        OME-Zarr, zarr array, TIFF, or a model file (``.qs``).
    axes : str, optional
        Axes of an image whose metadata lacks them.
    level : int
        Resolution level of a multiscale image.

    Returns
    -------
    dict
        JSON-serialisable description.

    Raises
    ------
    InputError, ModelError
        The path is missing or unreadable.

    Examples
    --------
    >>> describe("stack.ome.zarr")["axes"]     # doctest: +SKIP
    'zyx'
    """
    if str(uri).endswith(".qs"):
        manifest = read_manifest(uri)
        return {k: manifest.get(k) for k in MODEL_KEYS if manifest.get(k) is not None}
    return open_image(uri, level=level, axes=axes).describe()


def list_methods() -> list[tuple[str, str]]:
    """The trainable methods: ``(name, first line of its docstring)`` for each."""
    out = []
    for name in available_methods():
        doc = (get_method_class(name).__doc__ or "").strip().splitlines()
        out.append((name, doc[0] if doc else ""))
    return out
