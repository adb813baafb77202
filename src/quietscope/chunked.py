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
import shutil
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
    OutputSpec,
    block_local_levels,
    build_pyramid,
    check_output_path,
    create_ome_zarr,
    remove_output,
    write_tiff,
)
from quietscope.runner.cluster import ClusterOptions, client_for, thread_budget
from quietscope.runner.executor import JobSpec, ProcessorFactory, count_blocks, iter_tasks, run_blocks
from quietscope.runner.ledger import Ledger
from quietscope.runner.subtiles import SubtiledFactory
from quietscope.tiling import (
    Factor,
    MemoryProfile,
    axes_layout,
    block_window,
    choose_block_shape,
    choose_subtile,
    compute_factor,
    halo_factor,
    parse_bytes,
    per_axis,
    plan_memory_blocks,
)

log = logging.getLogger(__name__)


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
            tile = choose_subtile(spatial, halo, f, (0.8 * budget - profile.fixed_bytes) / profile.net_bytes_per_voxel)
        else:
            block, tile = plan_memory_blocks(spatial, align, halo, f, profile, budget, pow2_axes=pow2)
    except ValueError:
        need = profile.net_bytes(tuple(k + 2 * h for k, h in zip(f, halo))) / 0.8 * n_tasks
        raise ConfigError(f"--memory {total / 1e9:.3g} GB cannot hold one tile of this net ({n_tasks} task(s) at once, "
                          f"{profile.net_bytes_per_voxel:.0f} bytes per voxel, halo {halo}): give --memory "
                          f"{need / 1e9:.2g}GB or more") from None
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
    elif blk.block:
        block = tuple(blk.block)
    else:
        block = choose_block_shape(spatial, align, halo, blk.max_tile_voxels or DEFAULT_MAX_TILE_VOXELS, pow2_axes=pow2)
    out_axes = "".join(a for a in "tczyx" if (a == "t" and "t" in image.axes)
                       or (a == "c" and ("c" in image.axes or n_out > 1)) or a in sp_axes)
    return Layout(chunks, tuple(out.shards) if out.shards else None, block, out_axes, n_out, image.n_timepoints, sp_axes,
                  spatial, **plan)


def output_spec(image: Image, layout: Layout, target: str, options: OutputOptions, as_tiff: bool,
                names: list[str], windows: list[tuple[float, float]], provenance: dict[str, Any]) -> OutputSpec:
    """The :class:`~quietscope.io.writing.OutputSpec` of a prediction (input axes and scale kept)."""
    scale_map = dict(zip(image.axes, image.scale))
    unit_map = dict(zip(image.axes, image.units))
    return OutputSpec(
        path=target,
        axes=layout.out_axes,
        shape=layout.expand(image.spatial_shape, t=layout.n_t),
        chunks=layout.expand(layout.chunks),
        dtype=options.dtype,
        scale=tuple(scale_map.get(a, 1.0) for a in layout.out_axes),
        units=tuple(unit_map.get(a) for a in layout.out_axes),
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
                 f"; levels {local_levels + 1}..{spec.n_levels - 1} built after level 0 (blocks not aligned to 2^k x chunks there)"
                 if local_levels < spec.n_levels - 1 else "")


def _subtiled(factory: ProcessorFactory, layout: Layout, halo: tuple[int, ...], factor: Factor) -> ProcessorFactory:
    """``factory`` predicting each block window in sub-tiles, when the window exceeds one sub-tile."""
    if layout.subtile is None:
        return factory
    win = block_window(tuple(min(b, s) for b, s in zip(layout.block, layout.spatial_shape)), halo, factor)
    if all(w <= t + 2 * h for w, t, h in zip(win, layout.subtile, halo)):
        return factory
    return SubtiledFactory(factory, tuple(halo), tuple(layout.subtile))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource  # POSIX only
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


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


def _execute(job: JobSpec, spec: OutputSpec, factory: ProcessorFactory, layout: Layout, done: set[str],
             options: PredictOptions, result: PredictResult) -> None:
    """Run the remaining blocks, then the coarse levels the blocks could not write themselves."""
    n_tasks = result.n_blocks - result.n_done_before
    with client_for(options.compute) as client:
        if n_tasks > 0:
            stats = run_blocks(
                client, job, factory, iter_tasks(layout.spatial_shape, layout.block, layout.n_t, done), n_tasks,
                max_in_flight=layout.max_in_flight or options.blocks.max_in_flight, progress=options.progress, group=options.blocks.blocks_per_task,
            )
            result.seconds_level0 = stats["seconds"]
            result.voxels_per_s = stats["voxels_per_s"]
            result.extra["blocks_per_task"] = stats["blocks_per_task"]
            log.info("level 0: %d blocks in %.1f s (%.3g voxel/s)", n_tasks, stats["seconds"], stats["voxels_per_s"])
        else:
            log.info("all %d blocks already done; nothing to predict", result.n_blocks)
        t0 = time.perf_counter()
        if spec.n_levels and spec.n_levels - 1 > job.local_levels:
            build_pyramid(spec, client, start_level=job.local_levels + 1)
        result.seconds_pyramid = time.perf_counter() - t0


def _stage_tiff(output: str, inputs: list[str], overwrite: bool) -> str:
    check_output_path(output, inputs, overwrite)
    Path(output).resolve().parent.mkdir(parents=True, exist_ok=True)  # as zarr does for OME-Zarr outputs
    return tempfile.mkdtemp(prefix=".quietscope-", dir=str(Path(output).resolve().parent))


def _finish_tiff(output: str, spec: OutputSpec, tmpdir: str) -> None:
    data = np.asarray(zarr.open_array(store=str(Path(spec.path) / "0"), mode="r")[...])
    if Path(output).exists():
        remove_output(output)
    write_tiff(output, data, spec.axes, spec.scale)
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
                           n_done_before=n_blocks - n_tasks, halo_factor=hf,
                           extra={"local_levels": local_levels, **_memory_report(layout, halo, factor)})
    if complete:
        log.info("all %d blocks already done and the pyramid is complete; nothing to do", n_blocks)
        return result
    job = JobSpec(input=image.ref, output=target, out_axes=layout.out_axes, out_dtype=spec.dtype, halo=halo,
                  factor=factor, processor=factory.token, local_levels=local_levels, level_shapes=tuple(spec.level_shapes()))
    _execute(job, spec, factory, layout, done, options, result)
    if layout.predicted_bytes is not None:
        result.extra["peak_rss_bytes"] = peak_rss_bytes()
        log.info("memory: peak RSS of this process %.2f GB (predicted %.2f GB per task, %.2f GB budget per task)",
                 result.extra["peak_rss_bytes"] / 1e9, layout.predicted_bytes / 1e9, (layout.memory_budget or 0) / 1e9)
    if tmpdir:
        _finish_tiff(output, spec, tmpdir)
    else:
        ledger.set_complete()
    return result
