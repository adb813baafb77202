"""One self-describing, code-free model file.

A ``.qs`` file is a zip archive holding

* ``manifest.json`` – format version, quietscope/torch versions, the validated method config,
  training config, axes, patch size, data statistics, training history, noise-model summaries;
* ``tensors.safetensors`` – every tensor of the method (weights, normalisation, noise models).

Models travel between labs and facilities, so loading must never execute code from the
file: nothing is unpickled (JSON + safetensors only). A pickle, or anything that is not this
layout, is refused with a clear error.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from quietscope import __version__
from quietscope.errors import ModelError
from quietscope.methods import build_method

FORMAT = "quietscope-model"
FORMAT_VERSION = 1


def save_model(path: str | Path, method: torch.nn.Module, info: dict[str, Any]) -> Path:
    """Write ``method`` (its config and all tensors) and ``info`` to ``path`` atomically."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quietscope_version": __version__,
        "torch_version": torch.__version__,
        "method": method.config.model_dump(mode="json"),
        **info,
    }
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, default=str))
        zf.writestr("tensors.safetensors", save(tensors))
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check the manifest only (cheap)."""
    manifest, _ = _open(path, tensors=False)
    return manifest


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model file: returns ``(method, manifest)``; the method is in eval mode."""

    manifest, tensors = _open(path, tensors=True)
    method = build_method(manifest["method"])
    try:
        method.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(f"model file {str(path)!r} does not match its own configuration ({first}); re-train or re-export it") from None
    return method.to(device).eval(), manifest


def _open(path: str | Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {str(path)!r} does not exist; check the path or train one with 'quietscope train'")
    if not zipfile.is_zipfile(p):
        raise ModelError(
            f"{str(path)!r} is not a quietscope model file (expected a .qs zip with manifest.json); "
            "refusing to load it (other formats, e.g. pickles, could run code)"
        )
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            if not {"manifest.json", "tensors.safetensors"} <= names:
                raise ModelError(
                    f"{str(path)!r} is a zip but not a quietscope model (missing manifest.json or tensors.safetensors); "
                    "refusing to load it"
                )
            manifest = json.loads(zf.read("manifest.json"))
            raw = zf.read("tensors.safetensors") if tensors else b""
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model file {str(path)!r} is corrupt ({exc}); re-train or copy it again") from None
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{str(path)!r} is not a quietscope model file; refusing to load it")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(
            f"{str(path)!r} was written by quietscope {manifest.get('quietscope_version')} in a newer format; upgrade quietscope"
        )
    if not tensors:
        return manifest, {}
    try:
        tens = load(raw)
    except (SafetensorError, Exception) as exc:  # safetensors raises its own or a generic error
        raise ModelError(f"weights in {str(path)!r} are unreadable ({exc}); refusing to load them") from None
    return manifest, tens


def check_matches(
    manifest: dict[str, Any], spatial_axes: str, n_channels: int, where: str, expected_channels: int | None = None
) -> None:
    """Check a model fits the data (spatial dimensionality and channels); one-line error if not."""
    cfg = manifest["method"]
    nd = int(cfg["spatial_ndim"])
    if nd != len(spatial_axes):
        hint = (
            "treat z as time with --axes tyx-style axes (e.g. --axes tyx) to denoise plane by plane"
            if nd == 2
            else "train a 2D model for 2D data"
        )
        raise ModelError(
            f"the model is {nd}D but {where} has {len(spatial_axes)} spatial axes ({spatial_axes}); {hint}"
        )
    cin = int(expected_channels if expected_channels is not None else cfg.get("in_channels", 1))
    if cin != n_channels:
        raise ModelError(
            f"the model expects {cin} channel(s) but {where} has {n_channels}; use a model trained on data with {n_channels} channel(s)"
        )
