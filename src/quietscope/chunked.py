"""The chunked-prediction engine: output layout, block plan, resume, TIFF staging, run.

:func:`run_prediction` takes an image, a picklable *processor factory* (anything whose
``build()`` returns ``tile -> prediction``: a model, a filter, a test box), the halo and the
down-sampling factor, and writes the result block by block into a multiscale OME-Zarr (or a
TIFF, staged through a temporary OME-Zarr). It decides chunks, blocks and output layout and
logs each decision; the runner executes the plan; it never knows which method it runs.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quietscope.errors import ConfigError
from quietscope.io.reading import Image
from quietscope.io.validation import check_finite_sample
from quietscope.io.writing import (
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
from quietscope.runner.cluster import ClusterOptions, client_for
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
from quietscope.runner.ledger import Ledger
from quietscope.runner.pyramid import PyramidPlan
from quietscope.tiling import Factor, axes_layout, choose_block_shape, halo_factor

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
    max_tile_voxels: int = Field(1_500_000, ge=1024, description="memory bound for one block plus halo")
    max_in_flight: int | None = Field(None, ge=1)
    blocks_per_task: int | None = Field(None, ge=1, description="default: runner.executor.blocks_per_task")
    stream_pyramid: bool = True


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
        The output path.
    options : PredictOptions
        For ``overwrite`` / ``resume``.

    Raises
    ------
    OutputError
        The output exists and neither ``overwrite`` nor ``resume`` (of an existing output) is given.
    InputError
        The sampled chunks hold NaN or infinite values.
    """
    if not options.output.resume or not Path(output).exists():
        check_output_path(output, [image.ref.uri], options.output.overwrite)
    check_finite_sample(image)


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


def plan_layout(image: Image, n_out: int, halo: tuple[int, ...], options: PredictOptions, as_tiff: bool) -> Layout:
    """Decide chunks, shards, block shape and output axes for ``image``.

    Parameters
    ----------
    image : Image
        The input.
    n_out : int
        Output channels of the processor.
    halo : tuple of int
        Halo per spatial axis.
    options : PredictOptions
        The user's choices (chunks, shards, block, memory bound).
    as_tiff : bool
        Whether the output is a TIFF (one level, no block-local pyramid).

    Returns
    -------
    Layout

    Raises
    ------
    ConfigError
        Chunks, shards or blocks that do not fit the data or each other.
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
    if blk.block:
        block = tuple(blk.block)
        if len(block) != len(spatial) or any(b % a for b, a in zip(block, align)):
            raise ConfigError(f"--block {block} must have one value per spatial axis, each a multiple of {align} (chunks/shards)")
    else:
        # Powers of two of chunks in y and x let each block write its own coarse pyramid levels.
        pow2 = [i for i, a in enumerate(sp_axes) if a in "yx"] if blk.stream_pyramid and not as_tiff else []
        block = choose_block_shape(spatial, align, halo, blk.max_tile_voxels, pow2_axes=pow2)
    out_axes = "".join(a for a in "tczyx" if (a == "t" and "t" in image.axes)
                       or (a == "c" and ("c" in image.axes or n_out > 1)) or a in sp_axes)
    return Layout(chunks, tuple(out.shards) if out.shards else None, block, out_axes, n_out, image.n_timepoints, sp_axes, spatial)


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
             staged: bool) -> tuple[Ledger, set[str], bool]:
    """Create the output (all levels and metadata first) or reopen it for ``--resume``.

    Returns
    -------
    (Ledger, set of str, bool)
        The ledger, the keys of blocks already done, and whether the job is complete.
    """
    ledger = Ledger(spec.path)
    if not staged and options.resume and Path(spec.path).exists():
        ledger.check_same_job(record)
        done, complete = ledger.done(), bool(ledger.job().get("complete"))
        log.info("resuming %s: %s", spec.path, "the job is complete" if complete else f"{len(done)} blocks already done")
        return ledger, done, complete
    if not staged:
        check_output_path(output, inputs, options.overwrite)
        if Path(output).exists():
            remove_output(output)
    create_ome_zarr(spec)
    ledger.create(record)
    return ledger, set(), False


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
        log.info("pyramid: levels 1..%d written by each block as it finishes%s", local_levels,
                 f"; levels {local_levels + 1}..{spec.n_levels - 1} tile by tile as soon as their sources are written"
                 if local_levels < spec.n_levels - 1 else "")


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
    drawn across the volume (time points and z included)."""
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
        if blocks_done is not None:
            self.done_now = blocks_done
        state = {"status": status, "blocks_done": self.done_now, "blocks_total": self.total,
                 "started": self.started, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "host": socket.gethostname(), "pid": os.getpid(), "resume_command": _resume_command()}
        update_root_attrs(self.spec.path, {STATE_ATTR: state}, tmp_dir=self.ledger.root)
        self.last = time.monotonic()

    def windows(self, values: np.ndarray) -> None:
        wins = display_windows(values, self.spec.dtype)
        update_root_attrs(self.spec.path, omero_attrs(self.spec, wins), tmp_dir=self.ledger.root)
        log.info("display windows from the output: %s", [(round(w[0], 4), round(w[1], 4)) for w in wins])

    def __call__(self, run: RunState) -> None:
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
            max_in_flight=options.blocks.max_in_flight, progress=options.progress, group=options.blocks.blocks_per_task,
            pyramid=pyramid, on_progress=on_progress,
        )
    result.seconds_level0 = stats["seconds"]
    result.seconds_pyramid = stats["seconds_pyramid"]
    result.voxels_per_s = stats["voxels_per_s"]
    result.extra.update(blocks_per_task=stats["blocks_per_task"], tiles=stats["tiles"], lane_tasks=stats["lane_tasks"])
    log.info("level 0: %d blocks in %.1f s (%.3g voxel/s); %d coarse tiles in %d tasks, %.1f s after level 0",
             n_tasks, stats["seconds"], stats["voxels_per_s"], stats["tiles"], stats["lane_tasks"], stats["seconds_pyramid"])


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
    layout = plan_layout(image, len(out_names), halo, options, as_tiff)
    tmpdir = _stage_tiff(output, [image.ref.uri], options.output.overwrite) if as_tiff else None
    target = str(Path(tmpdir) / "result.ome.zarr") if tmpdir else output
    windows = channel_windows if channel_windows is not None else input_windows(image, len(out_names))
    spec = output_spec(image, layout, target, options.output, as_tiff, out_names, windows, provenance)
    ledger, done, complete = open_job(spec, job_record(image, layout, spec, factory.token, halo), output,
                                      [image.ref.uri], options.output, as_tiff)
    n_blocks = count_blocks(image.spatial_shape, layout.block) * layout.n_t  # the plan itself stays lazy
    spatial_block = tuple(min(b, s) for b, s in zip(layout.block, image.spatial_shape))
    hf = halo_factor(spatial_block, halo)
    local_levels = block_local_levels(spec, layout.expand(layout.block)) if options.blocks.stream_pyramid else 0
    _log_plan(layout, spec, halo, factor, halo_reason, n_blocks // layout.n_t, hf, local_levels)
    n_tasks = 0 if complete else n_blocks - len(done)
    result = PredictResult(output=output, halo=halo, block=layout.block, chunks=layout.chunks, n_blocks=n_blocks,
                           n_done_before=n_blocks - n_tasks, halo_factor=hf, extra={"local_levels": local_levels})
    if complete:
        log.info("all %d blocks already done and the pyramid is complete; nothing to do", n_blocks)
        return result
    job = JobSpec(input=image.ref, output=target, out_axes=layout.out_axes, out_dtype=spec.dtype, halo=halo,
                  factor=factor, processor=factory.token, local_levels=local_levels, level_shapes=tuple(spec.level_shapes()))
    _run_and_finish(job, spec, factory, layout, done, options, result, ledger, tmpdir, output)
    return result


def _run_and_finish(job: JobSpec, spec: OutputSpec, factory: ProcessorFactory, layout: Layout, done: set[str],
                    options: PredictOptions, result: PredictResult, ledger: Ledger, tmpdir: str | None, output: str) -> None:
    """Run with the visible state kept up to date; refresh the display windows; mark complete."""
    writer = None if tmpdir else RunStateWriter(spec, ledger, result.n_blocks, result.n_done_before)
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
    assert writer is not None
    writer.windows(output_sample(spec))  # refreshed across the whole volume
    ledger.set_complete()
    writer.write("complete", result.n_blocks)
