"""``quietscope info`` and ``quietscope methods``: describe an image or a model file; list methods."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from quietscope.io import open_image, stores
from quietscope.io.writing import STATE_ATTR
from quietscope.methods import available_methods, get_method_class
from quietscope.methods.modelfile import read_manifest
from quietscope.runner.ledger import Ledger

#: Manifest keys ``info`` shows for a model file.
MODEL_KEYS = ("quietscope_version", "torch_version", "method", "train", "axes", "data_stats", "best_val_loss",
              "best_step", "noise_models", "calibration", "pn2v_boot")


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
    image = open_image(uri, level=level, axes=axes)
    desc = image.describe()
    state = output_state(uri, image.metadata)
    if state is not None:
        desc["status"] = state
    return desc


def _alive(state: dict[str, Any]) -> bool:
    """Whether the process that wrote a ``running`` state still runs (only knowable on its host)."""
    if state.get("host") != socket.gethostname() or not isinstance(state.get("pid"), int):
        return True  # another machine: trust the state
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def output_state(uri: str | Path, attrs: dict[str, Any]) -> str | None:
    """One line on a quietscope output: ``complete``, or ``incomplete: N of M blocks — finish with ...``.

    The count comes from the resume ledger (the truth; the state attribute is updated only every
    few seconds). None for images quietscope did not write.

    Parameters
    ----------
    uri : str or pathlib.Path
        The output.
    attrs : dict
        Its group attributes.

    Returns
    -------
    str or None
    """
    state = attrs.get(STATE_ATTR)
    job = attrs.get("quietscope_job")
    ledger = Ledger(uri)
    if not isinstance(state, dict) and not isinstance(job, dict) and not stores.exists(ledger.root):
        return None
    state = state if isinstance(state, dict) else {}
    if (isinstance(job, dict) and job.get("complete")) and not stores.exists(ledger.root):
        return "complete"
    total = state.get("blocks_total")
    done = len(ledger.done()) if stores.exists(ledger.done_dir) else state.get("blocks_done", 0)
    how = state.get("status", "running")
    if how == "running" and not _alive(state):
        how = "interrupted"
    command = state.get("resume_command") or "quietscope predict ... --resume"
    return f"incomplete: {done} of {total if total is not None else '?'} blocks ({how}) — finish with `{command}`"


def list_methods() -> list[tuple[str, str]]:
    """The trainable methods: ``(name, first line of its docstring)`` for each."""
    out = []
    for name in available_methods():
        doc = (get_method_class(name).__doc__ or "").strip().splitlines()
        out.append((name, doc[0] if doc else ""))
    return out
