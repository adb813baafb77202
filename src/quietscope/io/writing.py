"""Create multiscale OME-Zarr outputs up front, write regions, build the pyramid.

The group, every level's array and all metadata exist before the first pixel is written, so
a viewer (napari, neuroglancer) can open the output while a run is still filling it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quietscope.errors import OutputError
from quietscope.io import stores

log = logging.getLogger(__name__)

#: Axes that the pyramid down-samples (by 2 per level). z is left alone: lightsheet and
#: confocal stacks are usually anisotropic, and napari/neuroglancer handle that fine.
PYRAMID_AXES = "yx"

#: Group attribute with the run's visible state (docs/guide/watching-a-run.md):
#: ``{"status": "running" | "interrupted" | "complete", "blocks_done": N, "blocks_total": M, ...}``.
STATE_ATTR = "quietscope_state"


@dataclass
class OutputSpec:
    """Everything needed to create an output image (all plain data: JSON-serialisable)."""

    path: str
    axes: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str = "float32"
    scale: tuple[float, ...] = ()
    units: tuple[str | None, ...] = ()
    ngff: str = "0.5"
    translation: tuple[float, ...] = ()
    n_levels: int | None = None
    channel_names: list[str] | None = None
    channel_windows: list[tuple[float, float]] | None = None
    shards: tuple[int, ...] | None = None
    name: str = "quietscope"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.chunks = tuple(int(min(c, s)) for c, s in zip(self.chunks, self.shape))
        if not self.scale:
            self.scale = (1.0,) * len(self.axes)
        if not self.units:
            self.units = (None,) * len(self.axes)
        if not self.translation:
            self.translation = (0.0,) * len(self.axes)
        if self.n_levels is None:
            self.n_levels = default_n_levels(self.shape, self.chunks, self.axes)

    def level_shapes(self) -> list[tuple[int, ...]]:
        """Shape of every pyramid level (y and x halved per level, rounded up)."""
        shapes = [self.shape]
        for _ in range(1, int(self.n_levels or 1)):
            prev = shapes[-1]
            shapes.append(tuple(-(-s // 2) if a in PYRAMID_AXES else s for s, a in zip(prev, self.axes)))
        return shapes

    def level_scales(self) -> list[list[float]]:
        """Physical scale of every pyramid level (doubled in y and x per level)."""
        return [
            [s * (2**k if a in PYRAMID_AXES else 1) for s, a in zip(self.scale, self.axes)]
            for k in range(int(self.n_levels or 1))
        ]

    def level_translations(self) -> list[list[float]]:
        """Per level, the physical position of its first voxel's centre.

        NGFF puts a voxel's coordinate at its centre; a level-k voxel is the mean of
        ``2**k`` level-0 voxels along each pyramid axis, so its centre lies ``(2**k - 1) / 2``
        level-0 voxels past theirs: a half-pixel shift per level (of that level's pixel).
        """
        return [
            [t + ((2**k - 1) / 2 * s if a in PYRAMID_AXES else 0.0)
             for t, s, a in zip(self.translation, self.scale, self.axes)]
            for k in range(int(self.n_levels or 1))
        ]


def default_n_levels(shape: Sequence[int], chunks: Sequence[int], axes: str, max_levels: int = 8) -> int:
    """Levels until the coarsest level's y and x fit in one chunk."""
    n = 1
    cur = list(shape)
    while n < max_levels:
        if all(cur[axes.index(a)] <= chunks[axes.index(a)] for a in PYRAMID_AXES if a in axes):
            break
        cur = [-(-s // 2) if a in PYRAMID_AXES else s for s, a in zip(cur, axes)]
        n += 1
    return n


def check_output_path(output: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse an output inside an input (or an input inside it) and existing outputs without overwrite.

    Paths and URLs are compared by location (:func:`quietscope.io.stores.canonical`).
    Writability is checked separately, before any work (:func:`quietscope.io.stores.probe_writable`).
    """
    out = stores.canonical(output)
    for inp in inputs:
        i = stores.canonical(inp)
        if out == i or out.startswith(i.rstrip("/") + "/") or i.startswith(out.rstrip("/") + "/"):
            raise OutputError(f"output {str(output)!r} is inside (or is) input {str(inp)!r}; choose an output path elsewhere")
    if stores.exists(output) and not overwrite:
        raise OutputError(f"output {str(output)!r} already exists; pass --overwrite to replace it (or --resume to finish it)")


def remove_output(path: str | Path) -> None:
    """Delete an output (directory tree or file) that the caller may replace."""
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def create_ome_zarr(spec: OutputSpec) -> None:
    """Create the group, all level arrays and the NGFF metadata (no pixels)."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    zarr_format = 3 if spec.ngff == "0.5" else 2
    # Not mode "w": that would delete the lock and job record the engine writes first (the
    # caller clears an old output); arrays of the same name are replaced.
    group = zarr.open_group(stores.zarr_store_url(spec.path), mode="a", zarr_format=zarr_format)
    datasets = []
    levels = zip(spec.level_shapes(), spec.level_scales(), spec.level_translations())
    for k, (shape, scale, translation) in enumerate(levels):
        chunks = tuple(min(c, s) for c, s in zip(spec.chunks, shape))
        kwargs: dict[str, Any] = dict(name=str(k), shape=shape, chunks=chunks, dtype=spec.dtype, fill_value=0, overwrite=True)
        if zarr_format == 3:
            kwargs["dimension_names"] = list(spec.axes)
            if spec.shards is not None:
                kwargs["shards"] = level_shards(spec.shards, shape, chunks)
        else:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        group.create_array(**kwargs)
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if any(translation):
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    axes = []
    for a, u in zip(spec.axes, spec.units):
        entry: dict[str, str] = {"name": a, "type": {"t": "time", "c": "channel"}.get(a, "space")}
        if u and a != "c":
            entry["unit"] = u
        axes.append(entry)
    fmt = FormatV05() if spec.ngff == "0.5" else FormatV04()
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=spec.name)
    attrs = dict(group.attrs)
    attrs.update(omero_attrs(spec, spec.channel_windows, ome=attrs.get("ome")))
    attrs["quietscope"] = json.loads(json.dumps(spec.provenance, default=str))
    group.attrs.update(attrs)


def omero_attrs(spec: OutputSpec, windows: Sequence[tuple[float, ...]] | None,
                ome: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``omero`` block where both viewers read it.

    napari-ome-zarr (through ome-zarr-py) reads ``ome.omero`` in NGFF 0.5 and ``omero`` in 0.4;
    neuroglancer's OME reader (``src/datasource/zarr/ome.ts``, ``parseOmeMetadata``) reads the
    top-level ``omero`` for every version. In 0.5 the block is therefore written twice.
    Each window is ``(start, end)`` or ``(start, end, min, max)``: ``start``/``end`` set the
    contrast, ``min``/``max`` the slider's range (neuroglancer clamps ``start``/``end`` to it).
    """
    omero = _omero(spec, windows)
    if spec.ngff == "0.5":
        ome = dict(ome if ome is not None else read_root_attrs(spec.path).get("ome", {}))
        return {"ome": {**ome, "omero": omero}, "omero": omero}
    return {"omero": omero}


def _omero(spec: OutputSpec, windows_in: Sequence[tuple[float, ...]] | None) -> dict[str, Any]:
    n_c = spec.shape[spec.axes.index("c")] if "c" in spec.axes else 1
    names = spec.channel_names or [f"ch{i}" for i in range(n_c)]
    names = (list(names) + [f"ch{i}" for i in range(len(names), n_c)])[:n_c]
    windows = list(windows_in or [(0.0, 1.0)])
    windows = (windows * n_c)[:n_c]  # one window given for several channels applies to all
    colors = ["FFFFFF", "00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000"]
    channels = []
    for i in range(n_c):
        lo, hi = float(windows[i][0]), float(windows[i][1])
        wmin, wmax = (float(windows[i][2]), float(windows[i][3])) if len(windows[i]) >= 4 else (lo, hi)
        channels.append(
            {
                "label": names[i],
                "color": colors[i % len(colors)] if n_c > 1 else "FFFFFF",
                "active": True,
                "window": {"min": min(wmin, lo), "max": max(wmax, hi), "start": lo, "end": hi},
            }
        )
    return {"channels": channels, "rdefs": {"model": "color" if n_c > 1 else "greyscale"}}


def _attrs_file(path: str | Path) -> tuple[Path, bool]:
    root = Path(path)
    return (root / "zarr.json", True) if (root / "zarr.json").exists() else (root / ".zattrs", False)


def read_root_attrs(path: str | Path) -> dict[str, Any]:
    """The output group's attributes, read straight from its metadata file (no zarr caching)."""
    meta, v3 = _attrs_file(path)
    doc = json.loads(meta.read_text())
    return dict(doc.get("attributes", {})) if v3 else dict(doc)


def update_root_attrs(path: str | Path, updates: dict[str, Any], tmp_dir: str | Path | None = None) -> None:
    """Set top-level attributes of the output group, atomically.

    A viewer may read the group's metadata at any moment while a run updates its state or its
    display windows: the file is replaced by a rename (``os.replace``), never rewritten in
    place, so a reader sees the old or the new document, never half of one (zarr's own
    attribute update writes in place).
    """
    meta, v3 = _attrs_file(path)
    doc = json.loads(meta.read_text())
    attrs = doc.setdefault("attributes", {}) if v3 else doc
    attrs.update(json.loads(json.dumps(updates, default=str)))
    tmp = (Path(tmp_dir) if tmp_dir and Path(tmp_dir).is_dir() else meta.parent) / f".{meta.name}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, meta)


def level_shards(shards: Sequence[int], shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """Shard shape of one level.

    The requested shards, clipped to the level rounded up to whole chunks (zarr requires
    shards to be multiples of the chunks).
    """
    return tuple(min(s, -(-n // c) * c) for s, n, c in zip(shards, shape, chunks))


def level_write_units(spec: OutputSpec) -> list[tuple[int, ...]]:
    """Per level, the smallest region two writers must never share: the shard (sharded) or chunk."""
    units = []
    for shape in spec.level_shapes():
        chunks = tuple(min(c, s) for c, s in zip(spec.chunks, shape))
        sharded = spec.shards is not None and spec.ngff == "0.5"
        units.append(level_shards(spec.shards, shape, chunks) if sharded else chunks)  # type: ignore[arg-type]
    return units


def block_local_levels(spec: OutputSpec, block: Sequence[int]) -> int:
    """How many coarse levels (1..K) each block task can write from its own output alone.

    ``block`` is the level-0 block shape in ``spec.axes`` (t: 1, c: all). Level k qualifies
    when, along y and x, every block boundary falls on a multiple of ``2**k`` and on a write
    unit (chunk or shard) boundary of level k, i.e. the block is aligned to ``2**k x unit_k``:
    each task then owns whole chunks/shards at level k and computes exactly what
    :func:`build_pyramid` computes there. Levels past K are written tile by tile as their sources
    finish (``runner.pyramid``).
    """
    units = level_write_units(spec)
    k_ok = 0
    for k in range(1, int(spec.n_levels or 1)):
        ok = True
        for i, a in enumerate(spec.axes):
            if a not in PYRAMID_AXES or block[i] >= spec.shape[i]:
                continue  # one block spans the axis: it owns all of it
            if block[i] % (2**k) or (block[i] // 2**k) % units[k][i]:
                ok = False
        if not ok:
            break
        k_ok = k
    return k_ok


def downsample2(data: np.ndarray, axes: set[int] | Sequence[int], prev_shape: Sequence[int],
                region: Sequence[slice], dtype: str) -> np.ndarray:
    """One pyramid step of a region, exactly as :func:`build_pyramid` computes it.

    ``data`` is the region ``region`` of a level of shape ``prev_shape``; along ``axes`` it is
    mean-reduced by 2 (float64), padding by edge value only where the region ends at an odd
    level edge, then rounded/clipped/cast to ``dtype``.
    """
    pad = [(0, 0)] * data.ndim
    for i in axes:
        if region[i].stop == prev_shape[i] and prev_shape[i] % 2:
            pad[i] = (0, 1)
    if any(p[1] for p in pad):
        data = np.pad(data, pad, mode="edge")
    factors = {i: (2 if i in axes else 1) for i in range(data.ndim)}
    newshape: list[int] = []
    for i in range(data.ndim):
        newshape += [data.shape[i] // factors[i], factors[i]]
    down = _mean_f64(data.reshape(newshape), axis=tuple(range(1, data.ndim * 2, 2)))
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        down = np.clip(np.round(down), info.min, info.max)
    return down.astype(dt)


def cast_to(data: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Cast float predictions to ``dtype``, rounding and clipping integers to their range."""
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return np.clip(np.rint(data), info.min, info.max).astype(dt)
    return data.astype(dt, copy=False)


def open_level(path: str | Path, level: int, mode: str = "r+") -> Any:
    """Open pyramid level ``level`` of an OME-Zarr output as a zarr array."""
    import zarr

    return zarr.open_array(store=stores.zarr_store_url(f"{str(path).rstrip('/')}/{level}"), mode=mode)  # URLs too


def build_pyramid(spec: OutputSpec, client: Any | None = None, start_level: int = 1) -> None:
    """Fill levels ``start_level``.. from the level above, each by 2× mean down-sampling in y and x.

    The post-hoc reference pyramid: ``predict`` no longer calls it (its levels fill in during the
    run, ``runner.pyramid``, and are tested equal to this bit for bit); kept for tools that
    rebuild the levels of an existing output.

    Memory is bounded by dask: each output chunk is computed from the few input chunks
    it covers. Runs on ``client`` (the job's cluster) when given, so workers do the I/O.
    """
    import dask.array as da

    shapes = spec.level_shapes()
    for k in range(max(1, start_level), len(shapes)):
        src = da.from_zarr(open_level(spec.path, k - 1, "r"))
        dst = open_level(spec.path, k)
        factors = {i: 2 for i, a in enumerate(spec.axes) if a in PYRAMID_AXES}
        pad = [(0, (s % 2) if i in factors else 0) for i, s in enumerate(src.shape)]
        if any(p[1] for p in pad):
            src = da.pad(src, pad, mode="edge")
        down = da.coarsen(_mean_f64, src, factors, trim_excess=False)
        down = down.rechunk(dst.chunks if not getattr(dst, "shards", None) else dst.shards)
        if np.dtype(spec.dtype).kind in "ui":
            info = np.iinfo(np.dtype(spec.dtype))
            down = da.clip(da.round(down), info.min, info.max)
        down = down.astype(spec.dtype)
        store = da.store(down, dst, lock=False, compute=False)
        if client is not None:
            client.compute(store).result()
        else:
            store.compute(scheduler="threads")


def _mean_f64(a: np.ndarray, axis: Any = None, **kwargs: Any) -> np.ndarray:
    return np.mean(a, axis=axis, dtype=np.float64)


#: ImageJ's spelling of the NGFF units it knows.
_IMAGEJ_UNITS = {"micrometer": "um", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m"}


def write_tiff(path: str | Path, data: np.ndarray, axes: str, scale: Sequence[float],
               units: Sequence[str | None] = ()) -> None:
    """Small outputs only: one TIFF, ImageJ-compatible, with the pixel size of y/x.

    Without a known unit for x the resolution tags are left at their default (1 per unit),
    which readers (quietscope's included) take as "pixel size unknown".
    """
    import tifffile

    ij_axes = axes.upper()
    kwargs: dict[str, Any] = {}
    meta: dict[str, Any] = {"axes": ij_axes}
    unit = dict(zip(axes, units)).get("x")
    if "x" in axes and unit in _IMAGEJ_UNITS:
        sx = scale[axes.index("x")]
        kwargs["resolution"] = (1.0 / sx, 1.0 / sx)
        meta["unit"] = _IMAGEJ_UNITS[unit]
    if "z" in axes:
        meta["spacing"] = scale[axes.index("z")]
    imagej = data.dtype in (np.uint8, np.uint16, np.float32) and set(axes) <= set("tczyx")
    tifffile.imwrite(str(path), data, imagej=imagej, metadata=meta if imagej else {"axes": ij_axes}, **kwargs)


def estimate_size_bytes(shape: Sequence[int], dtype: str) -> int:
    """Uncompressed size in bytes of an array of ``shape`` and ``dtype``."""
    return int(math.prod(shape) * np.dtype(dtype).itemsize)
