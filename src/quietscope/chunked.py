"""The chunked-prediction engine: output layout, block plan, resume, TIFF staging, run.

:func:`run_prediction` takes an image, a picklable *processor factory* (anything whose
``build()`` returns ``tile -> prediction``: a model, a filter, a test box), the halo and the
down-sampling factor, and writes the result block by block into a multiscale OME-Zarr (or a
TIFF, staged through a temporary OME-Zarr). It decides chunks, blocks and output layout and
logs each decision; the runner executes the plan; it never knows which method it runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quietscope.errors import ConfigError, OutputError, StorageError, storage_message
from quietscope.io import stores
from quietscope.io.reading import Image
from quietscope.io.stores import check_output_name, missing_chunks, probe_writable
from quietscope.io.validation import check_finite_sample, sample_chunk_slices
from quietscope.io.writing import (
    PYRAMID_AXES,
    STATE_ATTR,
    OutputSpec,
    block_local_levels,
    check_output_path,
    create_ome_zarr,
    level_write_units,
    omero_attrs,
    open_level,
    remove_output,
    update_root_attrs,
    write_tiff,
)
from quietscope.runner.cluster import ClusterOptions, client_for, thread_budget
from quietscope.runner.executor import (
    JobSpec,
    ProcessorFactory,
    Pyramid,
    RunState,
    block_region,
    count_blocks,
    iter_tasks,
    run_blocks,
)
from quietscope.runner.heap import peak_rss_bytes
from quietscope.runner.ledger import LEDGER_DIR, LOCK_NAME, JobLock, Ledger, busy_message, stale_reason
from quietscope.runner.pyramid import PyramidPlan
from quietscope.runner.subtiles import SubtiledFactory
from quietscope.tiling import (
    Factor,
    MemoryProfile,
    axes_layout,
    best_subtile,
    block_window,
    choose_block_shape,
    compute_factor,
    halo_factor,
    parse_bytes,
    per_axis,
    plan_memory_blocks,
)

log = logging.getLogger(__name__)


#: NGFF 0.4/0.5 space units (UDUNITS-2 names) and the spellings users type for them.
NGFF_SPACE_UNITS = ("angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot", "gigameter",
                    "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile", "millimeter",
                    "nanometer", "parsec", "petameter", "picometer", "terameter", "yard", "yoctometer", "yottameter",
                    "zeptometer", "zettameter")
UNIT_ALIASES = {"um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer", "nm": "nanometer",
                "mm": "millimeter", "cm": "centimeter", "m": "meter", "A": "angstrom", "Å": "angstrom"}


class OutputOptions(BaseModel):
    """What is written: chunking, dtype, format, pyramid, and whether an output may be replaced."""

    model_config = ConfigDict(extra="forbid")

    chunks: tuple[int, ...] | None = None
    dtype: str = "float32"
    ngff: str = "0.5"
    shards: tuple[int, ...] | None = None
    n_levels: int | None = Field(None, ge=1, le=12)
    overwrite: bool = False
    resume: bool = False
    scale: tuple[float, ...] | None = Field(None, description="physical pixel size per spatial axis (--scale)")
    unit: str | None = Field(None, description="unit of --scale (default micrometer)")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or any(not math.isfinite(x) or x <= 0 for x in v)):
            raise ValueError("--scale values must be positive numbers, one per spatial axis (e.g. 2,0.2,0.2)")
        return v

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = UNIT_ALIASES.get(v.strip(), v.strip().lower())
        if name not in NGFF_SPACE_UNITS:
            raise ValueError(f"--unit {v!r} is not an NGFF space unit; use e.g. micrometer (um), nanometer (nm), millimeter (mm)")
        return name

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        dt = np.dtype(v)
        if dt.kind not in "uif":
            raise ValueError(f"--dtype {v} is not a numeric type; use float32, uint16, uint8, ...")
        return dt.name

    @field_validator("ngff")
    @classmethod
    def _ngff(cls, v: str) -> str:
        if v not in ("0.4", "0.5"):
            raise ValueError("--ngff must be 0.4 or 0.5")
        return v


class BlockOptions(BaseModel):
    """How the image is cut into work: block shape, memory bound, tasks in flight."""

    model_config = ConfigDict(extra="forbid")

    block: tuple[int, ...] | None = None
    max_tile_voxels: int | None = Field(None, ge=1024, description="voxel bound for one block plus halo (no sub-tiles)")
    memory: int | None = Field(None, ge=1, description="bytes per worker (\"2GB\" accepted); default: a share of RAM")
    max_in_flight: int | None = Field(None, ge=1)
    blocks_per_task: int | None = Field(None, ge=1, description="default: runner.executor.blocks_per_task")
    stream_pyramid: bool = True

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None or v == "" else parse_bytes(v)

    @model_validator(mode="after")
    def _one_bound(self) -> BlockOptions:
        if self.memory is not None and self.max_tile_voxels is not None:
            raise ValueError("give --memory (bytes, sub-tiled blocks) or --max-tile-voxels (voxels), not both")
        return self


_FLAT_ALIASES = {"cluster_profile": "profile"}


class PredictOptions(BaseModel):
    """Options of ``quietscope predict`` / ``filter`` in three groups (validated at the edge).

    Flat keywords are accepted too and routed to their group, so
    ``PredictOptions(chunks=(256, 256), workers=2)`` equals
    ``PredictOptions(output={"chunks": (256, 256)}, compute={"workers": 2})``.
    """

    model_config = ConfigDict(extra="forbid")

    output: OutputOptions = Field(default_factory=OutputOptions)
    blocks: BlockOptions = Field(default_factory=BlockOptions)
    compute: ClusterOptions = Field(default_factory=ClusterOptions)
    device: str = "auto"
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _route_flat(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        groups = {"output": OutputOptions, "blocks": BlockOptions, "compute": ClusterOptions}
        out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items() if k in groups}
        for key, value in data.items():
            if key in groups and not isinstance(value, str):
                continue
            name = _FLAT_ALIASES.get(key, key)
            group = next((g for g, model in groups.items() if name in model.model_fields), None)
            if group is None:
                out[key] = value
            else:
                target = out.setdefault(group, {})
                if isinstance(target, dict):
                    target[name] = value
        return out

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> PredictOptions:
        """A copy with ``update`` applied; flat keys (``resume``, ``workers``...) reach their group."""
        if not update:
            return super().model_copy(deep=deep)
        routed = self._route_flat(dict(update))
        merged = {k: getattr(self, k).model_copy(update=v) if isinstance(v, dict) else v for k, v in routed.items()}
        return super().model_copy(update=merged, deep=deep)


@dataclass
class PredictResult:
    """What a prediction decided and measured (also returned on resume)."""

    output: str
    halo: tuple[int, ...]
    block: tuple[int, ...]
    chunks: tuple[int, ...]
    n_blocks: int
    n_done_before: int
    halo_factor: float
    seconds_level0: float = 0.0
    seconds_pyramid: float = 0.0
    voxels_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def default_chunks(image: Image) -> tuple[int, ...]:
    """Output chunks over the spatial axes: the input's when it is zarr, else 256² / 32×256².

    Parameters
    ----------
    image : Image
        The input.

    Returns
    -------
    tuple of int
        One chunk size per spatial axis.
    """
    spatial = image.spatial_shape
    if image.kind != "tiff":
        ch = tuple(c for c, a in zip(image.chunks, image.axes) if a in "zyx")
        if math.prod(ch) >= 4096:
            return ch
    return generic_chunks(spatial)


def generic_chunks(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """256² in 2D, 32×256² in 3D, capped at the image: the chunks of a TIFF input's output."""
    base = (256, 256) if len(spatial) == 2 else (32, 256, 256)
    return tuple(min(b, s) for b, s in zip(base, spatial))


def input_windows(image: Image, n_out: int, n_regions: int = 8, seed: int = 0) -> list[tuple[float, float]]:
    """Display windows (0.1 and 99.9 percentiles) from a few chunk-sized regions of the input.

    Written to ``omero`` before the first block so viewers do not auto-scale on empty data.

    Parameters
    ----------
    image : Image
        The input.
    n_out : int
        Output channels; per-channel windows when it equals the input's channel count, else
        one window spanning all channels.
    n_regions : int
        Regions sampled.
    seed : int
        Seed of the region choice.

    Returns
    -------
    list of (float, float)
        ``(low, high)`` per output channel.
    """
    rng = np.random.default_rng(seed)
    spatial = image.spatial_shape
    ch = default_chunks(image)
    samples = []
    for _ in range(n_regions):
        origin = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(spatial, ch)]
        t = int(rng.integers(image.n_timepoints))
        region = image.read_tc(t, tuple(slice(o, o + c) for o, c in zip(origin, ch)))
        samples.append(region.reshape(region.shape[0], -1).astype(np.float64))
    data = np.concatenate(samples, axis=1)
    data = data[:, np.isfinite(data).all(axis=0)]
    if data.size == 0:
        return [(0.0, 1.0)] * n_out
    per_c = [(float(np.percentile(c, 0.1)), float(np.percentile(c, 99.9))) for c in data]
    if n_out == len(per_c):
        return per_c
    lo, hi = min(w[0] for w in per_c), max(w[1] for w in per_c)
    return [(lo, hi)] * n_out


@dataclass(frozen=True)
class Layout:
    """The decided geometry of one prediction: chunks, shards, blocks and output axes."""

    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    block: tuple[int, ...]
    out_axes: str
    n_out: int
    n_t: int
    spatial_axes: str
    spatial_shape: tuple[int, ...]
    subtile: tuple[int, ...] | None = None  # sub-tile output extent, when blocks are sized by memory
    memory_budget: int | None = None  # bytes per task
    predicted_bytes: float | None = None  # predicted peak of one task
    max_in_flight: int | None = None

    def expand(self, spatial_values: tuple[int, ...], t: int = 1, c: int | None = None) -> tuple[int, ...]:
        """Per-spatial-axis values laid out over the output axes (t and c filled in)."""
        return axes_layout(self.out_axes, self.spatial_axes, spatial_values, t=t, c=self.n_out if c is None else c)


def is_tiff_output(output: str | Path) -> bool:
    """Whether ``output`` names a TIFF file (staged through a temporary OME-Zarr)."""
    return str(output).lower().endswith((".tif", ".tiff"))


def preflight(image: Image, output: str | Path, options: PredictOptions) -> None:
    """Checks that must pass before any model is loaded or worker started.

    Parameters
    ----------
    image : Image
        The input.
    output : str or pathlib.Path
        The output path or URL.
    options : PredictOptions
        For ``overwrite`` / ``resume``, ``dtype`` and the scheduler address.

    Raises
    ------
    OutputError
        The output exists and neither ``overwrite`` nor ``resume`` (of an existing output) is given,
        another job writes it, or its name is neither OME-Zarr nor TIFF.
    StorageError
        The output location is not writable (read-only, permission denied, ...).
    ConfigError
        ``overwrite`` with ``resume``, or a malformed or unreachable scheduler address.
    InputError
        The sampled chunks hold NaN or infinite values.
    """
    out = options.output
    if out.overwrite and out.resume:
        raise ConfigError("--overwrite and --resume contradict each other: --resume finishes an output, "
                          "--overwrite replaces it; give one")
    output = str(output)
    check_output_name(output)
    if not is_tiff_output(output):
        _refuse_if_busy(output)
    if not out.resume or not stores.exists(output):
        check_output_path(output, [image.ref.uri], out.overwrite)
    probe_scheduler(options.compute.scheduler)
    probe_writable(output, needed_bytes=_output_bytes(image, out.dtype))
    check_finite_sample(image)
    warn_saturation(image, out.dtype)


def _output_bytes(image: Image, dtype: str) -> int:
    # Level 0 plus the pyramid (a quarter per level in y/x: at most a third more).
    return int(math.prod(image.shape) * np.dtype(dtype).itemsize * 4 / 3)


_SCHEDULER = re.compile(r"^(tcp|tls)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})/?$")


def probe_scheduler(address: str | None, timeout: float = 5.0) -> None:
    """Refuse a malformed scheduler address, and one where nothing listens, within seconds.

    distributed would raise a bare ValueError for a malformed address and retry a closed port
    until its connect timeout: a TCP connect answers both at once.

    Raises
    ------
    ConfigError
        Not ``tcp://host:port`` / ``tls://host:port``, or nothing accepts connections there.
    """
    if not address:
        return
    m = _SCHEDULER.match(address.strip())
    if m is None:
        raise ConfigError(f"--scheduler {address!r} is not a scheduler address; give tcp://HOST:PORT or tls://HOST:PORT "
                          "(e.g. tcp://10.0.0.5:8786)")
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__ if not isinstance(exc, TimeoutError) else f"no answer in {timeout:.0f} s"
        raise ConfigError(f"cannot reach the dask scheduler at {address!r} ({reason}); check the address and that "
                          "the scheduler is running") from None


def warn_saturation(image: Image, dtype: str, limit: float = 0.01, n_chunks: int = 8) -> float:
    """Warn when an integer (or float16) output would clip more than ``limit`` of the voxels.

    Estimated on a sample of input chunks: denoised values stay in the input's range.

    Returns
    -------
    float
        The sampled fraction that would saturate.
    """
    dt = np.dtype(dtype)
    if dt.kind == "f" and dt.itemsize >= 4:
        return 0.0
    info = np.iinfo(dt) if dt.kind in "ui" else np.finfo(dt)
    rng = np.random.default_rng(0)
    values = np.concatenate([image.read(sl).ravel().astype(np.float64) for sl in sample_chunk_slices(image, n_chunks, rng)])
    frac = float(np.mean((values < float(info.min) - 0.5) | (values > float(info.max) + 0.5))) if values.size else 0.0
    if frac > limit:
        log.warning("--dtype %s would saturate about %.0f%% of the voxels (the input reaches %.6g, %s holds %g..%g): "
                    "the output would be clipped; use --dtype %s or float32", dt.name, 100 * frac, float(values.max()),
                    dt.name, float(info.min), float(info.max), "uint16" if values.max() < 65535.5 and values.min() >= 0 else "float32")
    return frac


def _given_chunks(options: OutputOptions, spatial: tuple[int, ...], sp_axes: str) -> tuple[int, ...] | None:
    if not options.chunks:
        return None
    chunks = tuple(options.chunks)
    if len(chunks) != len(spatial):
        raise ConfigError(
            f"--chunks has {len(chunks)} values but the data has {len(spatial)} spatial axes ({sp_axes}); give {len(spatial)}"
        )
    if any(c < 1 for c in chunks):
        raise ConfigError("--chunks values must be positive")
    return chunks


#: Share of the machine's RAM (or of one GPU's memory) the default --memory gives all tasks of
#: one worker together: small enough to leave room for viewers and other jobs on a shared node.
DEFAULT_MEMORY_SHARE = {"cpu": 1 / 16, "cuda": 1 / 2}
DEFAULT_MAX_TILE_VOXELS = 1_500_000


def default_memory(device: str = "cpu") -> int:
    """Default ``--memory`` of one worker: a share of RAM (CPU) or of the GPU's memory.

    Parameters
    ----------
    device : str
        ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` counts as CPU).

    Returns
    -------
    int
        Bytes.
    """
    if device.startswith("cuda"):
        import torch  # only for a CUDA device: filter-only runs never import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(DEFAULT_MEMORY_SHARE["cuda"] * torch.cuda.get_device_properties(index).total_memory)
    import psutil  # a dependency of distributed

    return int(DEFAULT_MEMORY_SHARE["cpu"] * psutil.virtual_memory().total)


def tasks_at_once(options: PredictOptions, ndim: int = 3) -> tuple[int, int | None]:
    """``(tasks sharing one worker's memory, max_in_flight)`` for a memory-sized plan.

    In-process (the default) a 3D plan runs one big sub-tiled block at a time with all cores on
    its convolutions (3D convolutions use intra-op threads well, and one task in flight gets the
    whole budget); a 2D plan keeps its task threads busy (reading and writing one block overlaps
    computing another) and splits the budget between them. With worker processes, each task
    thread of a worker gets an equal share.
    """
    comp, blk = options.compute, options.blocks
    if comp.scheduler or comp.cluster != "local" or comp.workers:
        per_worker = comp.threads or (thread_budget(comp.workers)[0] if comp.workers and comp.cluster == "local" else 1)
        return per_worker, blk.max_in_flight
    threads = comp.threads or 2
    if ndim < 3:
        return min(blk.max_in_flight or threads, threads), blk.max_in_flight
    in_flight = blk.max_in_flight or 1
    return min(in_flight, threads), in_flight


def _memory_plan(spatial: tuple[int, ...], align: tuple[int, ...], halo: tuple[int, ...], factor: Factor,
                 profile: MemoryProfile, options: PredictOptions, pow2: list[int]) -> dict[str, Any]:
    """Block and sub-tile for the per-task memory budget (``ConfigError`` when one tile cannot fit)."""
    blk = options.blocks
    total = blk.memory or default_memory(options.device if options.device != "auto" else "cpu")
    n_tasks, in_flight = tasks_at_once(options, len(spatial))
    budget = total // n_tasks
    f = per_axis(factor, len(spatial))
    try:
        if blk.block:
            block = tuple(blk.block)
            win = block_window(tuple(min(b, s) for b, s in zip(block, spatial)), halo, f)
            io = profile.io_bytes_per_voxel * math.prod(win)
            # the same constraints as the planner's, so a plan given back as --block gets its sub-tile
            tile = best_subtile(win, halo, f, lambda w: profile.net_bytes(w) <= min(0.8 * budget, budget - io))
            if tile is None:
                if profile.net_bytes(tuple(k + 2 * h for k, h in zip(f, halo))) > 0.8 * budget:
                    raise ValueError("the smallest sub-tile does not fit")
                tile = f  # the tile fits, the block's buffers do not: the --block error below says so
        else:
            block, tile = plan_memory_blocks(spatial, align, halo, f, profile, budget, pow2_axes=pow2)
    except ValueError:
        smallest = tuple(k + 2 * h for k, h in zip(f, halo))
        tile_bytes = profile.net_bytes(smallest)
        need = tile_bytes / 0.8 * n_tasks
        raise ConfigError(f"--memory {total / 1e9:.3g} GB cannot hold one tile of this net ({n_tasks} task(s) at once; "
                          f"the smallest tile, {'x'.join(map(str, smallest))} with its halo {halo}, needs "
                          f"{tile_bytes / 1e9:.2g} GB): give --memory {need / 1e9:.2g}GB or more") from None
    win = block_window(tuple(min(b, s) for b, s in zip(block, spatial)), halo, f)
    predicted = profile.task_bytes(win, tuple(min(t + 2 * h, w) for t, h, w in zip(tile, halo, win)))
    if predicted > budget:
        raise ConfigError(f"--block {block} needs {predicted / 1e9:.2g} GB per task, more than --memory allows "
                          f"({budget / 1e9:.2g} GB per task): give a smaller --block or a larger --memory")
    return {"block": block, "subtile": tile, "memory_budget": int(budget), "predicted_bytes": predicted,
            "max_in_flight": in_flight}


def plan_layout(image: Image, n_out: int, halo: tuple[int, ...], options: PredictOptions, as_tiff: bool,
                profile: MemoryProfile | None = None, factor: Factor = 1) -> Layout:
    """Decide chunks, shards, block shape (and sub-tile) and output axes for ``image``.

    Parameters
    ----------
    image : Image
        The input.
    n_out : int
        Output channels of the processor.
    halo : tuple of int
        Halo per spatial axis.
    options : PredictOptions
        The user's choices (chunks, shards, block, memory or voxel bound).
    as_tiff : bool
        Whether the output is a TIFF (one level, no block-local pyramid).
    profile : MemoryProfile, optional
        The processor's memory per voxel (a model's, probed): blocks and sub-tiles are then sized
        by ``options.blocks.memory`` unless ``max_tile_voxels`` is given. Without it blocks are
        bounded by ``max_tile_voxels`` and predicted whole.
    factor : int or tuple of int
        Down-sampling factor (sub-tiles are aligned to it).

    Returns
    -------
    Layout

    Raises
    ------
    ConfigError
        Chunks, shards or blocks that do not fit the data or each other, or a memory budget
        that cannot hold one tile.
    """
    out, blk = options.output, options.blocks
    spatial, sp_axes = image.spatial_shape, image.spatial_axes
    chunks = tuple(min(c, s) for c, s in zip(_given_chunks(out, spatial, sp_axes) or default_chunks(image), spatial))
    if out.shards:
        if out.ngff != "0.5" or as_tiff:
            raise ConfigError("--shards needs zarr v3: use --ngff 0.5 and an .ome.zarr output")
        if len(out.shards) != len(spatial) or any(s % c for s, c in zip(out.shards, chunks)):
            raise ConfigError(f"--shards {out.shards} must have one value per spatial axis, each a multiple of --chunks {chunks}")
    align = tuple(out.shards) if out.shards else chunks
    if blk.block and (len(blk.block) != len(spatial) or any(b % a for b, a in zip(blk.block, align))):
        raise ConfigError(f"--block {tuple(blk.block)} must have one value per spatial axis, each a multiple of {align} (chunks/shards)")
    # Powers of two of chunks in y and x let each block write its own coarse pyramid levels.
    pow2 = [i for i, a in enumerate(sp_axes) if a in "yx"] if blk.stream_pyramid and not as_tiff else []
    plan: dict[str, Any] = {}
    if profile is None and blk.memory is not None:
        raise ConfigError("--memory sizes blocks from a model's measured bytes per voxel; for this processor bound "
                          "blocks with --max-tile-voxels instead")
    if profile is not None and blk.max_tile_voxels is None:
        plan = _memory_plan(spatial, align, halo, factor, profile, options, pow2)
        block = plan.pop("block")
        if _given_chunks(out, spatial, sp_axes) is None and not (blk.block or out.shards):
            _warn_costly_chunks(spatial, chunks, block, plan["subtile"], halo, factor, profile, options, pow2)
    elif blk.block:
        block = tuple(blk.block)
    else:
        block = choose_block_shape(spatial, align, halo, blk.max_tile_voxels or DEFAULT_MAX_TILE_VOXELS, pow2_axes=pow2)
    out_axes = "".join(a for a in "tczyx" if (a == "t" and "t" in image.axes)
                       or (a == "c" and ("c" in image.axes or n_out > 1)) or a in sp_axes)
    return Layout(chunks, tuple(out.shards) if out.shards else None, block, out_axes, n_out, image.n_timepoints, sp_axes,
                  spatial, **plan)


def _warn_costly_chunks(spatial: tuple[int, ...], chunks: tuple[int, ...], block: tuple[int, ...], tile: tuple[int, ...],
                        halo: tuple[int, ...], factor: Factor, profile: MemoryProfile, options: PredictOptions,
                        pow2: list[int]) -> None:
    """Warn when the input's chunks, kept for the output, force a plan that computes far more.

    Blocks are whole output chunks, so chunks of a full plane (a TIFF series converted plane by
    plane: 1 x 2048 x 2048) leave a memory budget room only for thin blocks and small sub-tiles.
    """
    generic = generic_chunks(spatial)
    if generic == chunks:
        return
    f = per_axis(factor, len(spatial))
    cost = compute_factor(spatial, block, halo, f, tile)
    try:
        alt = _memory_plan(spatial, generic, halo, factor, profile, options, pow2)
    except ConfigError:
        return
    alt_cost = compute_factor(spatial, alt["block"], halo, f, alt["subtile"])
    if cost > 1.5 * alt_cost:
        log.warning("the output keeps the input's chunks %s, which makes the net compute %.1f voxels per voxel written "
                    "in this memory; --chunks %s would compute %.1f (%.1fx less work)", chunks, cost,
                    ",".join(map(str, generic)), alt_cost, cost / alt_cost)


def physical_scale(image: Image, options: OutputOptions) -> tuple[dict[str, float], dict[str, str | None]]:
    """Scale and unit per axis of the output: the input's, or ``--scale``/``--unit`` where given.

    Raises
    ------
    ConfigError
        ``--scale`` without one value per spatial axis.
    """
    scale_map = dict(zip(image.axes, image.scale))
    unit_map: dict[str, str | None] = dict(zip(image.axes, image.units))
    if options.scale is None:
        if options.unit is not None:
            raise ConfigError("--unit needs --scale (the pixel size in that unit, one value per spatial axis)")
        return scale_map, unit_map
    sp = image.spatial_axes
    if len(options.scale) != len(sp):
        raise ConfigError(f"--scale has {len(options.scale)} values but the data has {len(sp)} spatial axes ({sp}); give {len(sp)}")
    unit = options.unit or "micrometer"
    for a, v in zip(sp, options.scale):
        if unit_map.get(a) is not None and (unit_map[a] != unit or not math.isclose(scale_map[a], v)):
            log.warning("--scale replaces the input's %s scale %g %s with %g %s", a, scale_map[a], unit_map[a], v, unit)
        scale_map[a], unit_map[a] = float(v), unit
    return scale_map, unit_map


def output_spec(image: Image, layout: Layout, target: str, options: OutputOptions, as_tiff: bool,
                names: list[str], windows: list[tuple[float, float]], provenance: dict[str, Any]) -> OutputSpec:
    """The :class:`~quietscope.io.writing.OutputSpec` of a prediction (input axes, scale and origin kept)."""
    scale_map, unit_map = physical_scale(image, options)
    origin = dict(zip(image.axes, getattr(image, "translation", ()) or ()))
    return OutputSpec(
        path=target,
        axes=layout.out_axes,
        shape=layout.expand(image.spatial_shape, t=layout.n_t),
        chunks=layout.expand(layout.chunks),
        dtype=options.dtype,
        scale=tuple(scale_map.get(a, 1.0) for a in layout.out_axes),
        units=tuple(unit_map.get(a) for a in layout.out_axes),
        translation=tuple(float(origin.get(a, 0.0)) for a in layout.out_axes),
        ngff=options.ngff,
        n_levels=1 if as_tiff else options.n_levels,
        channel_names=names,
        channel_windows=windows,
        shards=layout.expand(layout.shards) if layout.shards else None,
        provenance=provenance,
    )


def job_record(image: Image, layout: Layout, spec: OutputSpec, token: str, halo: tuple[int, ...]) -> dict[str, Any]:
    """What identifies a job for ``--resume``: the same input, processor and geometry."""
    return {
        "input": image.ref.uri,
        "level": image.ref.level,
        "processor": token,
        "block": list(layout.block),
        "chunks": list(spec.chunks),
        "dtype": spec.dtype,
        "ngff": spec.ngff,
        "halo": list(halo),
        "shards": list(spec.shards) if spec.shards else None,
        "complete": False,
    }


def open_job(spec: OutputSpec, record: dict[str, Any], output: str, inputs: list[str], options: OutputOptions,
             staged: bool, layout: Layout | None = None, local_levels: int = 0) -> tuple[Ledger, set[str], bool]:
    """Take the output's lock, then create the output or reopen it for ``--resume``.

    Order: the lock, then the job record, then all levels and metadata: a run killed at any
    moment leaves an output that ``--resume`` finishes (or recreates when nothing was written).
    A resumed job's finished blocks whose chunks are missing are forgotten, so they are redone.

    Returns
    -------
    (Ledger, set of str, bool)
        The ledger (holding the lock, released by :func:`close_job`), the keys of blocks already
        done, and whether the job is complete (then no lock is taken and nothing is written).

    Raises
    ------
    OutputError
        Another live job holds the lock, or ``--resume`` of a different job.
    """
    ledger = Ledger(spec.path)
    if staged:
        create_ome_zarr(spec)
        ledger.create(record)
        ledger.mark_as_zarr_group()
        return ledger, set(), False
    existed = stores.exists(output)
    resumable = options.resume and existed and ledger.has_record()
    if resumable:
        ledger.check_same_job(record)
        if ledger.job().get("complete") and not _missing_blocks(spec, layout, local_levels, ledger, every_level=True):
            log.info("resuming %s: the job is complete", spec.path)
            return ledger, ledger.done(), True
    elif options.resume and existed and not _nothing_written(output):
        ledger.job()  # raises: not a quietscope output, nothing to resume
    elif not options.resume:
        _refuse_if_busy(output)
        check_output_path(output, inputs, options.overwrite)
    ledger.lock = JobLock(output)
    ledger.lock.acquire()
    try:
        if resumable:
            return ledger, _reopen(ledger, spec, record, layout, local_levels), False
        if existed:
            log.info("%s: replacing the existing output", output) if not options.resume else \
                log.info("resuming %s: no block of it is recorded; starting it afresh", output)
        stores.clear_except(output, f"{LEDGER_DIR}/{LOCK_NAME}")
        ledger.create(record)
        create_ome_zarr(spec)
        ledger.mark_as_zarr_group()
    except BaseException:
        close_job(ledger, remove_if_empty=not existed)
        raise
    return ledger, set(), False


def _refuse_if_busy(output: str) -> None:
    lock = JobLock(output).read()
    if lock is not None and stale_reason(lock) is None:
        raise OutputError(busy_message(output, lock))


def _nothing_written(output: str) -> bool:
    """An output with no job record that no block can have touched: only a lock folder, the
    metadata an older quietscope wrote before its ledger (blocks start after the ledger), or the
    stray chunks of a job whose output vanished under it (:func:`_only_stray_chunks`).
    """
    names = set(stores.list_names(output)) - {LEDGER_DIR}
    if not names or _only_stray_chunks(output, names):
        return True
    try:
        attrs = dict(zarr.open_group(stores.zarr_store_url(output), mode="r").attrs)
    except Exception:
        return False
    return "quietscope" in attrs and Ledger(output).done() == set()


def _only_stray_chunks(output: str, names: set[str]) -> bool:
    """Only level folders without metadata: the chunks that writes in flight put back after the
    output's folder vanished under a running job (the store recreates parent folders on write).
    No metadata means no array anyone could open, so nothing of value is replaced.
    """
    meta = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
    if not all(n.isdigit() for n in names) or any(stores.exists(f"{output}/{m}") for m in meta):
        return False
    return not any(stores.exists(f"{output}/{n}/{m}") for n in names for m in meta)


def _reopen(ledger: Ledger, spec: OutputSpec, record: dict[str, Any], layout: Layout | None, local_levels: int) -> set[str]:
    """Resume: the blocks done, less those whose chunks went missing (a complete job is reopened)."""
    job = ledger.job()
    if job.get("complete"):  # complete, but chunks are missing: the ledger comes back
        ledger.create({**job, "complete": False})
        plan = _plan_keys(layout) if layout is not None else set()
        for key in plan:
            ledger.mark_done(key)
    done = ledger.done()
    if not done:  # nothing finished: recreate (the metadata may be half-written by a kill or a full disk)
        stores.clear_except(ledger.output, f"{LEDGER_DIR}/{LOCK_NAME}")
        ledger.create(record)
        create_ome_zarr(spec)
        ledger.mark_as_zarr_group()
        return set()
    ledger.mark_as_zarr_group()
    # Coarse tiles whose level lost chunks are rebuilt (from the level below, which is checked too).
    lost = {int(k.split("-")[1]) for k in _missing_blocks(spec, layout, local_levels, ledger, every_level=True)
            if k.startswith("level-")}
    ledger.unmark_levels(lost)
    redo = _missing_blocks(spec, layout, local_levels, ledger, every_level=False) & done
    if redo:
        log.warning("resuming %s: %d finished block(s) have chunks missing from the store; they are redone",
                    spec.path, len(redo))
        ledger.unmark(redo)
        done -= redo
    log.info("resuming %s: %d blocks already done", spec.path, len(done))
    return done


def _plan_keys(layout: Layout) -> set[str]:
    return {t.key for t in iter_tasks(layout.spatial_shape, layout.block, layout.n_t)}


def _missing_blocks(spec: OutputSpec, layout: Layout | None, local_levels: int, ledger: Ledger,
                    every_level: bool) -> set[str]:
    """Keys of blocks owning a missing chunk on levels 0..``local_levels`` (``every_level``: any
    missing chunk on any level yields a non-empty set, for the pyramid built after level 0).
    """
    if layout is None:
        return set()
    gone = missing_chunks(spec.path, int(spec.n_levels or 1))
    units = level_write_units(spec)
    keys: set[str] = set()
    for k, indices in gone.items():
        if k > local_levels:
            if every_level:
                keys.add(f"level-{k}")
            continue
        for idx in indices:
            t, spatial = 0, []
            for a, i, u in zip(spec.axes, idx, units[k]):
                if a == "t":
                    t = i * u
                elif a in "zyx":
                    spatial.append(i * u * (2**k if a in PYRAMID_AXES else 1))
            block = "_".join(str(c // b) for c, b in zip(spatial, layout.block))
            keys.add(f"t{t}_{block}")
    return keys


def finish_job(ledger: Ledger, spec: OutputSpec, layout: Layout, local_levels: int, output: str) -> None:
    """Mark the job complete after checking every block and every chunk of every level is stored.

    Raises
    ------
    StorageError
        Blocks or chunks are missing (deleted under the run, or lost by the store); their blocks
        are forgotten so that ``--resume`` rewrites them.
    """
    not_done = _plan_keys(layout) - ledger.done()
    gone = _missing_blocks(spec, layout, local_levels, ledger, every_level=True)
    if not_done or gone:
        ledger.unmark({k for k in gone if not k.startswith("level-")})
        raise StorageError(
            f"output {output!r} is incomplete after the run ({len(not_done)} block(s) without a done marker, "
            f"{len(gone)} block(s)/level(s) with chunks missing): something deleted them or the store lost writes; "
            "make sure no other process touches the output and rerun with --resume to rewrite them")
    ledger.set_complete()


def close_job(ledger: Ledger, remove_if_empty: bool = False) -> None:
    """Release the lock (the ledger stays, for ``--resume``); never raises."""
    if ledger.lock is not None:
        ledger.lock.release()
        ledger.lock = None
    if remove_if_empty:
        try:
            names = set(stores.list_names(ledger.output))
            if names <= {LEDGER_DIR} and not stores.list_keys(ledger.output):
                stores.remove(ledger.output, recursive=True)
        except Exception as exc:
            log.debug("could not tidy %s: %s", ledger.output, exc)


def _log_plan(layout: Layout, spec: OutputSpec, halo: tuple[int, ...], factor: Factor, halo_reason: str,
              n_blocks: int, hf: float, local_levels: int) -> None:
    sp = layout.spatial_axes
    log.info(
        "halo %s voxels (%s, rounded to factor %s); block %s = %s chunks of %s; "
        "%d blocks x %d time points; halo factor %.3f; output %s %s NGFF %s, %d levels",
        dict(zip(sp, halo)), halo_reason, factor, dict(zip(sp, layout.block)),
        "x".join(str(-(-b // c)) for b, c in zip(layout.block, layout.chunks)), layout.chunks,
        n_blocks, layout.n_t, hf, spec.dtype, layout.out_axes, spec.ngff, spec.n_levels,
    )
    if spec.n_levels and spec.n_levels > 1:
        log.info("pyramid: %s", _pyramid_plan_text(local_levels, spec.n_levels))


def _pyramid_plan_text(local_levels: int, n_levels: int) -> str:
    """Which pyramid levels the block tasks write and which are tiled after their sources."""
    parts = [f"levels 1..{local_levels} written by each block as it finishes"] if local_levels else []
    if local_levels < n_levels - 1:
        parts.append(f"levels {local_levels + 1}..{n_levels - 1} tile by tile as soon as their sources are written")
    return "; ".join(parts)


def _subtiled(factory: ProcessorFactory, layout: Layout, halo: tuple[int, ...], factor: Factor) -> ProcessorFactory:
    """``factory`` predicting each block window in sub-tiles, when the window exceeds one sub-tile."""
    if layout.subtile is None:
        return factory
    win = block_window(tuple(min(b, s) for b, s in zip(layout.block, layout.spatial_shape)), halo, factor)
    if all(w <= t + 2 * h for w, t, h in zip(win, layout.subtile, halo)):
        return factory
    return SubtiledFactory(factory, tuple(halo), tuple(layout.subtile))


def _memory_report(layout: Layout, halo: tuple[int, ...], factor: Factor) -> dict[str, Any]:
    """Log and return the memory plan: sub-tile, budget, predicted peak, computed voxels per voxel written."""
    if layout.predicted_bytes is None:
        return {}
    cf = compute_factor(layout.spatial_shape, layout.block, halo, factor, layout.subtile)
    log.info("memory plan: %.2f GB per task (max in flight: %s); block %s predicted in sub-tiles of %s (+ halo); "
             "predicted peak %.2f GB per task; voxels computed per voxel written %.3f",
             (layout.memory_budget or 0) / 1e9, layout.max_in_flight or "default", layout.block, layout.subtile,
             layout.predicted_bytes / 1e9, cf)
    return {"subtile": layout.subtile, "memory_budget": layout.memory_budget, "predicted_bytes": layout.predicted_bytes,
            "compute_factor": cf}


#: Seconds between two updates of the visible run state in the group attributes.
STATE_INTERVAL_S = 2.0
#: Voxels read from level 0 (across the volume) for the final display windows.
WINDOW_SAMPLE_VOXELS = 1 << 22


def display_windows(values: np.ndarray, dtype: str) -> list[tuple[float, float, float, float]]:
    """``(start, end, min, max)`` per channel of ``(C, N)`` values.

    ``start``/``end``: the 0.1 and 99.9 percentiles. ``min``/``max`` (the slider's range in
    neuroglancer): the integer type's range, or for floats the values' range widened by half
    its span on each side, so that the slider reaches past what a sample has seen.
    """
    out = []
    dt = np.dtype(dtype)
    for ch in values.astype(np.float64):
        ch = ch[np.isfinite(ch)]
        if ch.size == 0:
            out.append((0.0, 1.0, 0.0, 1.0))
            continue
        lo, hi = float(np.percentile(ch, 0.1)), float(np.percentile(ch, 99.9))
        if hi <= lo:
            hi = lo + 1.0
        if dt.kind in "ui":
            wmin, wmax = float(np.iinfo(dt).min), float(np.iinfo(dt).max)
        else:
            span = max(float(ch.max() - ch.min()), hi - lo)
            wmin, wmax = float(ch.min()) - span / 2, float(ch.max()) + span / 2
        out.append((lo, hi, wmin, wmax))
    return out


def output_sample(spec: OutputSpec, budget: int = WINDOW_SAMPLE_VOXELS, seed: int = 0) -> np.ndarray:
    """``(C, N)`` values of level 0: all of it when it fits ``budget``, else chunk-sized regions
    drawn across the volume (time points and z included).
    """
    arr = open_level(spec.path, 0, "r")
    c_axis = spec.axes.index("c") if "c" in spec.axes else None

    def per_channel(data: np.ndarray) -> np.ndarray:
        if c_axis is None:
            return data.reshape(1, -1)
        return np.moveaxis(data, c_axis, 0).reshape(data.shape[c_axis], -1)

    if math.prod(spec.shape) <= budget:
        return per_channel(np.asarray(arr[...]))
    rng = np.random.default_rng(seed)
    chunk = tuple(min(c, s) for c, s in zip(spec.chunks, spec.shape))
    n = max(1, budget // math.prod(chunk))
    parts = []
    for _ in range(n):
        origin = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(spec.shape, chunk)]
        parts.append(per_channel(np.asarray(arr[tuple(slice(o, o + c) for o, c in zip(origin, chunk))])))
    return np.concatenate(parts, axis=1)


def _resume_command() -> str:
    """The command line to finish this job, when it was started from the CLI."""
    argv = list(sys.argv)
    if not argv or "quietscope" not in Path(argv[0]).name and "quietscope_cli" not in argv[0]:
        return "quietscope predict ... --resume"
    args = [a for a in argv[1:] if a != "--overwrite"]
    return shlex.join(["quietscope", *args, *([] if "--resume" in args else ["--resume"])])


class RunStateWriter:
    """The visible state of a run in the output group's ``quietscope_state`` attribute.

    Written when the job starts, then at most every :data:`STATE_INTERVAL_S` seconds while it
    runs, and when it ends (complete, or interrupted by an error or Ctrl-C). A job killed
    outright (SIGKILL, a lost node) cannot write; its state stays ``running`` with the host
    and process id, which ``quietscope info`` checks. Also writes the display windows from
    the first finished blocks.
    """

    def __init__(self, spec: OutputSpec, ledger: Ledger, blocks_total: int, done_before: int) -> None:
        self.spec, self.ledger = spec, ledger
        self.total, self.before = blocks_total, done_before
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.last = 0.0
        self.windows_written = False
        self.done_now = done_before

    def write(self, status: str, blocks_done: int | None = None) -> None:
        """Write the state (``running``, ``interrupted`` or ``complete``) with the blocks done."""
        if blocks_done is not None:
            self.done_now = blocks_done
        state = {"status": status, "blocks_done": self.done_now, "blocks_total": self.total,
                 "started": self.started, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "host": socket.gethostname(), "pid": os.getpid(), "resume_command": _resume_command()}
        update_root_attrs(self.spec.path, {STATE_ATTR: state}, tmp_dir=self.ledger.root)
        self.last = time.monotonic()

    def windows(self, values: np.ndarray) -> None:
        """Write display windows computed from ``(C, N)`` output values."""
        wins = display_windows(values, self.spec.dtype)
        update_root_attrs(self.spec.path, omero_attrs(self.spec, wins), tmp_dir=self.ledger.root)
        log.info("display windows from the output: %s", [(round(w[0], 4), round(w[1], 4)) for w in wins])

    def __call__(self, run: RunState) -> None:
        """Progress callback of the block stream: first windows, then the state at a bounded rate."""
        if run.samples is not None and run.samples and run.blocks_done >= min(8, self.total - self.before):
            self.windows(np.concatenate(run.samples, axis=1))
            run.samples = None  # the first finished blocks set them; the end refreshes them
        if time.monotonic() - self.last >= STATE_INTERVAL_S:
            self.write("running", self.before + run.blocks_done)


def _progressive_pyramid(spec: OutputSpec, layout: Layout, job: JobSpec, done: set[str], ledger: Ledger) -> Pyramid | None:
    """The coarse levels above the block-local ones, replayed from the ledger on ``--resume``."""
    if int(spec.n_levels or 1) - 1 <= job.local_levels:
        return None
    plan = PyramidPlan.build(spec.axes, spec.level_shapes(), layout.expand(layout.block), level_write_units(spec),
                             job.local_levels)
    shape0 = spec.level_shapes()[0]
    tasks = iter_tasks(layout.spatial_shape, layout.block, layout.n_t) if done else iter(())
    finished = (block_region(job, t, shape0) for t in tasks if t.key in done)
    return Pyramid.start(plan, finished, ledger.tiles_done())


def _execute(job: JobSpec, spec: OutputSpec, factory: ProcessorFactory, layout: Layout, done: set[str],
             options: PredictOptions, result: PredictResult, ledger: Ledger,
             on_progress: RunStateWriter | None = None) -> None:
    """Run the remaining blocks and, as their sources finish, the coarse pyramid tiles."""
    n_tasks = result.n_blocks - result.n_done_before
    pyramid = _progressive_pyramid(spec, layout, job, done, ledger)
    if n_tasks == 0 and not (pyramid and pyramid.pending):
        log.info("all %d blocks already done; nothing to predict", result.n_blocks)
        return
    with client_for(options.compute) as client:
        stats = run_blocks(
            client, job, factory, iter_tasks(layout.spatial_shape, layout.block, layout.n_t, done), n_tasks,
            max_in_flight=layout.max_in_flight or options.blocks.max_in_flight, progress=options.progress, group=options.blocks.blocks_per_task,
            pyramid=pyramid, on_progress=on_progress,
        )
    result.seconds_level0 = stats["seconds"]
    result.seconds_pyramid = stats["seconds_pyramid"]
    result.voxels_per_s = stats["voxels_per_s"]
    result.extra.update(blocks_per_task=stats["blocks_per_task"], tiles=stats["tiles"], lane_tasks=stats["lane_tasks"])
    log.info("level 0: %d blocks in %.1f s (%.3g voxel/s); %d coarse tiles in %d tasks, %.1f s after level 0",
             n_tasks, stats["seconds"], stats["voxels_per_s"], stats["tiles"], stats["lane_tasks"], stats["seconds_pyramid"])


@contextlib.contextmanager
def tiff_lock(output: str) -> Iterator[None]:
    """Hold the one-writer lock of a TIFF output for the whole job (staging included).

    A TIFF is computed into a private temporary OME-Zarr and written whole at the end, so two
    runs on one ``out.tif`` would both compute and then write the same file at once; the
    second is refused at the start instead, as for OME-Zarr outputs.

    Raises
    ------
    OutputError
        Another live job writes ``output``.
    """
    lock = JobLock(output)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _stage_tiff(output: str, inputs: list[str], overwrite: bool) -> str:
    check_output_path(output, inputs, overwrite)
    Path(output).resolve().parent.mkdir(parents=True, exist_ok=True)  # as zarr does for OME-Zarr outputs
    return tempfile.mkdtemp(prefix=".quietscope-", dir=str(Path(output).resolve().parent))


def _finish_tiff(output: str, spec: OutputSpec, tmpdir: str) -> None:
    data = np.asarray(zarr.open_array(store=str(Path(spec.path) / "0"), mode="r")[...])
    if Path(output).exists():
        remove_output(output)
    write_tiff(output, data, spec.axes, spec.scale, spec.units)
    shutil.rmtree(tmpdir, ignore_errors=True)


def run_prediction(
    image: Image,
    output: str | Path,
    factory: ProcessorFactory,
    out_names: list[str],
    halo: tuple[int, ...],
    factor: Factor,
    options: PredictOptions,
    provenance: dict[str, Any],
    channel_windows: list[tuple[float, float]] | None = None,
    halo_reason: str = "measured receptive field",
    memory: MemoryProfile | None = None,
) -> PredictResult:
    """Predict ``image`` block by block with ``factory``'s tile function into ``output``.

    Parameters
    ----------
    image : Image
        The input (opened lazily).
    output : str or pathlib.Path
        ``.ome.zarr`` (multiscale, written chunk by chunk) or ``.tif`` (small data).
    factory : ProcessorFactory
        Picklable; ``build()`` returns ``tile -> prediction`` and ``token`` identifies it.
    out_names : list of str
        Names of the output channels.
    halo : tuple of int
        Halo per spatial axis (measured for models, derived for filters).
    factor : int or tuple of int
        Down-sampling factor; read windows are aligned to it.
    options : PredictOptions
        Output, block and compute options.
    provenance : dict
        Written into the output's attributes.
    channel_windows : list of (float, float), optional
        Display windows; default: percentiles of the input.
    halo_reason : str
        Where the halo came from (for the log).
    memory : MemoryProfile, optional
        The processor's memory model (``inference_memory.memory_profile`` for a model): blocks
        and sub-tiles are then sized by ``options.blocks.memory`` (default :func:`default_memory`).

    Returns
    -------
    PredictResult

    Raises
    ------
    ConfigError
        Options that do not fit the data.
    OutputError
        An existing output without ``overwrite``, or ``resume`` of a different job.

    Examples
    --------
    >>> from quietscope.runner.testing import BoxProcessor          # doctest: +SKIP
    >>> run_prediction(open_image("in.ome.zarr"), "out.ome.zarr", BoxProcessor(), ["box"],
    ...                (1, 1), 1, PredictOptions(), {})             # doctest: +SKIP
    """
    output = str(output)
    as_tiff = is_tiff_output(output)
    layout = plan_layout(image, len(out_names), halo, options, as_tiff, memory, factor)
    factory = _subtiled(factory, layout, halo, factor)
    try:
        with tiff_lock(output) if as_tiff else contextlib.nullcontext():
            return _run(image, output, factory, out_names, halo, factor, options, provenance, channel_windows,
                        halo_reason, layout, as_tiff)
    except OSError as exc:  # also raised by workers: the client re-raises their exception
        raise StorageError(storage_message(exc, output)) from None
    except Exception as exc:
        if not stores.is_store_fault(exc):
            raise
        raise StorageError(stores.store_failure_message(exc, output)) from None


def _run(image: Image, output: str, factory: ProcessorFactory, out_names: list[str], halo: tuple[int, ...],
         factor: Factor, options: PredictOptions, provenance: dict[str, Any],
         channel_windows: list[tuple[float, float]] | None, halo_reason: str, layout: Layout, as_tiff: bool) -> PredictResult:
    tmpdir = _stage_tiff(output, [image.ref.uri], options.output.overwrite) if as_tiff else None
    target = str(Path(tmpdir) / "result.ome.zarr") if tmpdir else output
    windows = channel_windows if channel_windows is not None else input_windows(image, len(out_names))
    spec = output_spec(image, layout, target, options.output, as_tiff, out_names, windows, provenance)
    local_levels = block_local_levels(spec, layout.expand(layout.block)) if options.blocks.stream_pyramid else 0
    ledger, done, complete = open_job(spec, job_record(image, layout, spec, factory.token, halo), output,
                                      [image.ref.uri], options.output, as_tiff, layout, local_levels)
    try:
        n_blocks = count_blocks(image.spatial_shape, layout.block) * layout.n_t  # the plan itself stays lazy
        spatial_block = tuple(min(b, s) for b, s in zip(layout.block, image.spatial_shape))
        hf = halo_factor(spatial_block, halo)
        _log_plan(layout, spec, halo, factor, halo_reason, n_blocks // layout.n_t, hf, local_levels)
        n_tasks = 0 if complete else n_blocks - len(done)
        result = PredictResult(output=output, halo=halo, block=layout.block, chunks=layout.chunks, n_blocks=n_blocks,
                               n_done_before=n_blocks - n_tasks, halo_factor=hf,
                               extra={"local_levels": local_levels, **_memory_report(layout, halo, factor)})
        if complete:
            log.info("all %d blocks already done and the pyramid is complete; nothing to do", n_blocks)
            return result
        job = JobSpec(input=image.ref, output=target, out_axes=layout.out_axes, out_dtype=spec.dtype, halo=halo,
                      factor=factor, processor=factory.token, local_levels=local_levels,
                      level_shapes=tuple(spec.level_shapes()))
        _run_and_finish(job, spec, factory, layout, done, options, result, ledger, tmpdir, output)
        if layout.predicted_bytes is not None:
            result.extra["peak_rss_bytes"] = peak_rss_bytes()
            log.info("memory: peak RSS of this process %.2f GB (predicted %.2f GB per task, %.2f GB budget per task)",
                     result.extra["peak_rss_bytes"] / 1e9, layout.predicted_bytes / 1e9, (layout.memory_budget or 0) / 1e9)
        return result
    finally:
        close_job(ledger)


def _run_and_finish(job: JobSpec, spec: OutputSpec, factory: ProcessorFactory, layout: Layout, done: set[str],
                    options: PredictOptions, result: PredictResult, ledger: Ledger, tmpdir: str | None, output: str) -> None:
    """Run with the visible state kept up to date; refresh the display windows; mark complete."""
    # The visible state is written with atomic local renames; object-store outputs go without it.
    writer = None if tmpdir or not stores.is_local(spec.path) else RunStateWriter(spec, ledger, result.n_blocks,
                                                                                    result.n_done_before)
    if writer is not None:
        writer.write("running", result.n_done_before)
    try:
        _execute(job, spec, factory, layout, done, options, result, ledger, writer)
    except BaseException:
        if writer is not None:
            try:
                writer.write("interrupted")
            except Exception:  # the original error matters more than a failed state write
                log.debug("could not write the interrupted state", exc_info=True)
        raise
    if tmpdir:
        _finish_tiff(output, spec, tmpdir)
        return
    if writer is not None:
        writer.windows(output_sample(spec))  # refreshed across the whole volume
    finish_job(ledger, spec, layout, job.local_levels, output)
    if writer is not None:
        writer.write("complete", result.n_blocks)
