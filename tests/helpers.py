"""Small builders shared by tests (tiny images and models, written to tmp paths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from quietscope.methods import build_method
from quietscope.methods.modelfile import save_model
from quietscope.workflows.demo import write_ome_zarr_image


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    from quietscope.io.sample_data import synthetic_clean

    return synthetic_clean(shape, seed)


def write_zarr_array(path: Path, data: np.ndarray, chunks: tuple[int, ...], dims: list[str] | None = None) -> str:
    kwargs = {"dimension_names": dims} if dims else {}
    z = zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, **kwargs)
    z[...] = data
    return str(path)


def write_ome(path: Path, data: np.ndarray, axes: str, chunks: tuple[int, ...], scale=None) -> str:
    write_ome_zarr_image(path, data, axes, chunks, scale=scale)
    return str(path)


def random_model(
    path: Path,
    spatial_ndim: int,
    in_channels: int = 1,
    method: str = "n2v",
    depth: int = 2,
    filters: int = 8,
    batch_norm: bool = True,
    z_pool: bool = True,
    mean: float = 100.0,
    std: float = 20.0,
    seed: int = 0,
    **extra,
) -> str:
    """A model file with random weights (exactness does not need training)."""
    torch.manual_seed(seed)
    m = build_method({"method": method, "spatial_ndim": spatial_ndim, "in_channels": in_channels,
                      "net": {"depth": depth, "filters": filters, "batch_norm": batch_norm, "z_pool": z_pool}, **extra})
    # Non-trivial batch-norm statistics so eval-mode normalisation is exercised (batch norm is
    # off by default but still an option, and old model files have it).
    for mod in m.modules():
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.set_normalization([mean] * in_channels, [std] * in_channels)
    save_model(path, m.eval(), {"data_stats": {"min": 0.0, "max": 255.0}})
    return str(path)


def read_levels(path: Path) -> list[np.ndarray]:
    """Every pyramid level ``0, 1, ...`` of an OME-Zarr output, whole."""
    out, k = [], 0
    while (path / str(k)).exists():
        out.append(zarr.open_array(store=str(path / str(k)), mode="r")[...])
        k += 1
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (or the file itself) with its bytes, to prove an input is untouched."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_weights(a, b) -> None:
    """Two methods hold bit-identical weights (resumed or paused training against a straight run)."""
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
