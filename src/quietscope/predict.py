"""Chunked prediction: model (or filter) + image -> halo -> block plan -> runner -> OME-Zarr.

This module decides (halo, block shape, chunks, output layout) and logs each decision; the
runner executes; the method predicts tiles. The whole-image reference used by the tests and
benchmarks (:func:`predict_whole`) shares :func:`predict_tile` with the block tasks, so the two
paths differ only in what they read.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quietscope import __version__
from quietscope.errors import ConfigError
from quietscope.io.reading import Image, open_image
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
from quietscope.runner.cluster import dask_client
from quietscope.runner.executor import JobSpec, ProcessorFactory, count_blocks, iter_tasks, run_blocks
from quietscope.runner.ledger import Ledger
from quietscope.tiling import (
    Factor,
    choose_block_shape,
    halo_factor,
    halo_from_radius,
    whole_window,
)

log = logging.getLogger(__name__)


class PredictOptions(BaseModel):
    """Options of ``quietscope predict`` / ``filter`` (validated at the edge)."""

    model_config = ConfigDict(extra="forbid")

    chunks: tuple[int, ...] | None = None
    block: tuple[int, ...] | None = None
    max_tile_voxels: int = Field(1_500_000, ge=1024, description="memory bound for one block plus halo")
    dtype: str = "float32"
    ngff: str = "0.5"
    overwrite: bool = False
    resume: bool = False
    scheduler: str | None = None
    threads: int | None = Field(None, ge=1)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker process (--workers)")
    device: str = "auto"
    max_in_flight: int | None = Field(None, ge=1)
    blocks_per_task: int | None = Field(None, ge=1, description="default: runner.executor.blocks_per_task")
    n_levels: int | None = Field(None, ge=1, le=12)
    shards: tuple[int, ...] | None = None
    progress: bool = True
    cluster: str = Field("local", pattern="^(local|slurm)$", description="local (this machine) or slurm (dask-jobqueue)")
    workers: int | None = Field(None, ge=1, description="local: worker processes; slurm: jobs (one GPU each)")
    cluster_profile: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stream_pyramid: bool = True

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


# ---- tiles ---------------------------------------------------------------------------------
def predict_tile(method: torch.nn.Module, tile: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Predict one tile ``(C, *spatial)`` (sizes multiples of the down-sampling factor)."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32))[None].to(device)
        return method.predict(x)[0].float().cpu().numpy()


def dihedral_mean(fn: Callable[[np.ndarray], np.ndarray], tile: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the mean of ``fn`` over the 8 flips/90° rotations of a tile's
    last two (y, x) axes, each prediction mapped back before averaging.

    The training patches are augmented with the same transforms, so each is an equally valid
    prediction; averaging them removes part of the network's orientation-dependent error.
    A block window starts and ends on multiples of the pooling factor, so its flipped and
    rotated copies keep the whole image's pooling grid and chunked == whole still holds.
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
    """Measured receptive-field radius plus the method's extra halo, rounded to its factor."""
    from quietscope.nets.receptive_field import method_receptive_radius

    radius = method_receptive_radius(method)
    extra = method.extra_halo
    return halo_from_radius(tuple(r + e for r, e in zip(radius, extra)), method.downsampling_factor)


def predict_whole(
    fn: Callable[[np.ndarray], np.ndarray], array: np.ndarray, halo: tuple[int, ...], factor: Factor
) -> np.ndarray:
    """Reference: predict a whole ``(C, *spatial)`` array in one tile (reflect-padded by ``halo``)."""
    spatial = array.shape[1:]
    wstart, wstop = whole_window(spatial, halo, factor)
    pad = [(0, 0)] + [(-a, b - s) for a, b, s in zip(wstart, wstop, spatial)]
    padded = np.pad(array.astype(np.float32), pad, mode="reflect")
    out = fn(padded)
    return out[(slice(None),) + tuple(slice(-a, -a + s) for a, s in zip(wstart, spatial))]


@dataclass(frozen=True)
class ModelProcessor:
    """Loads a model file once per worker and predicts tiles with it."""

    model_path: str
    device: str = "auto"
    token: str = ""
    inference: tuple[tuple[str, Any], ...] = ()
    tta: bool = False

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        from quietscope.modelfile import load_model
        from quietscope.training.loop import resolve_device

        dev = resolve_device(self.device)
        method, _ = load_model(self.model_path, dev)
        method.set_inference(**dict(self.inference))
        if self.tta:
            return lambda tile: dihedral_mean(lambda t: predict_tile(method, t, dev), tile)
        return lambda tile: predict_tile(method, tile, dev)


def file_token(path: str | Path, extra: str = "") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()[:16]


# ---- the pipeline --------------------------------------------------------------------------
@dataclass
class PredictResult:
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
    """Output chunks over the spatial axes: the input's when it is zarr, else 256² / 32×256²."""
    spatial = image.spatial_shape
    if image.kind != "tiff":
        ch = tuple(c for c, a in zip(image.chunks, image.axes) if a in "zyx")
        if math.prod(ch) >= 4096:
            return ch
    base = (256, 256) if len(spatial) == 2 else (32, 256, 256)
    return tuple(min(b, s) for b, s in zip(base, spatial))


def input_windows(image: Image, n_out: int, n_regions: int = 8, seed: int = 0) -> list[tuple[float, float]]:
    """Display windows (0.1 and 99.9 percentiles) from a few chunk-sized regions of the input,
    written to ``omero`` before the first block so viewers do not auto-scale on empty data."""
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

    ``halo_reason`` says in the log where the halo came from.
    """
    output = str(output)
    as_tiff = output.lower().endswith((".tif", ".tiff"))
    spatial = image.spatial_shape
    sp_axes = image.spatial_axes
    chunks = tuple(options.chunks) if options.chunks else default_chunks(image)
    if len(chunks) != len(spatial):
        raise ConfigError(
            f"--chunks has {len(chunks)} values but the data has {len(spatial)} spatial axes ({sp_axes}); give {len(spatial)}"
        )
    if any(c < 1 for c in chunks):
        raise ConfigError("--chunks values must be positive")
    chunks = tuple(min(c, s) for c, s in zip(chunks, spatial))
    if options.shards:
        if options.ngff != "0.5" or as_tiff:
            raise ConfigError("--shards needs zarr v3: use --ngff 0.5 and an .ome.zarr output")
        if len(options.shards) != len(spatial) or any(s % c for s, c in zip(options.shards, chunks)):
            raise ConfigError(f"--shards {options.shards} must have one value per spatial axis, each a multiple of --chunks {chunks}")
    align = tuple(options.shards) if options.shards else chunks
    if options.block:
        block = tuple(options.block)
        if len(block) != len(spatial) or any(b % a for b, a in zip(block, align)):
            raise ConfigError(f"--block {block} must have one value per spatial axis, each a multiple of {align} (chunks/shards)")
    else:
        # Powers of two of chunks in y and x let each block write its own coarse pyramid levels.
        pow2 = [i for i, a in enumerate(sp_axes) if a in "yx"] if options.stream_pyramid and not as_tiff else []
        block = choose_block_shape(spatial, align, halo, options.max_tile_voxels, pow2_axes=pow2)
    n_blocks = count_blocks(spatial, block)  # the plan itself stays lazy (iter_tasks)
    n_t = image.n_timepoints
    hf = halo_factor(tuple(min(b, s) for b, s in zip(block, spatial)), halo)

    n_out = len(out_names)
    out_axes = "".join(a for a in "tczyx" if (a == "t" and "t" in image.axes) or (a == "c" and ("c" in image.axes or n_out > 1)) or a in sp_axes)
    out_shape = tuple(
        n_t if a == "t" else n_out if a == "c" else spatial[sp_axes.index(a)] for a in out_axes
    )
    out_chunks = tuple(1 if a == "t" else n_out if a == "c" else chunks[sp_axes.index(a)] for a in out_axes)
    shards = None
    if options.shards:
        shards = tuple(1 if a == "t" else n_out if a == "c" else options.shards[sp_axes.index(a)] for a in out_axes)
    scale_map = dict(zip(image.axes, image.scale))
    unit_map = dict(zip(image.axes, image.units))

    if channel_windows is None:
        channel_windows = input_windows(image, n_out)
    target = output
    tmpdir = None
    if as_tiff:
        check_output_path(output, [image.ref.uri], options.overwrite)
        Path(output).resolve().parent.mkdir(parents=True, exist_ok=True)  # as zarr does for OME-Zarr outputs
        tmpdir = tempfile.mkdtemp(prefix=".quietscope-", dir=str(Path(output).resolve().parent))
        target = str(Path(tmpdir) / "result.ome.zarr")
    spec = OutputSpec(
        path=target,
        axes=out_axes,
        shape=out_shape,
        chunks=out_chunks,
        dtype=options.dtype,
        scale=tuple(scale_map.get(a, 1.0) for a in out_axes),
        units=tuple(unit_map.get(a) for a in out_axes),
        ngff=options.ngff,
        n_levels=1 if as_tiff else options.n_levels,
        channel_names=out_names,
        channel_windows=channel_windows,
        shards=shards,
        provenance=provenance,
    )
    job_record = {
        "input": image.ref.uri,
        "level": image.ref.level,
        "processor": factory.token,
        "block": list(block),
        "chunks": list(out_chunks),
        "dtype": options.dtype,
        "ngff": options.ngff,
        "halo": list(halo),
        "shards": list(shards) if shards else None,
        "complete": False,
    }
    ledger = Ledger(target)
    done: set[str] = set()
    complete = False
    if not as_tiff and options.resume and Path(target).exists():
        ledger.check_same_job(job_record)
        complete = bool(ledger.job().get("complete"))
        done = ledger.done()
        log.info("resuming %s: %s", target, "the job is complete" if complete else f"{len(done)} of {n_blocks * n_t} blocks already done")
    else:
        if not as_tiff:
            check_output_path(output, [image.ref.uri], options.overwrite)
            if Path(output).exists():
                remove_output(output)
        create_ome_zarr(spec)
        ledger.create(job_record)

    log.info(
        "halo %s voxels (%s, rounded to factor %s); block %s = %s chunks of %s; "
        "%d blocks x %d time points; halo factor %.3f; output %s %s NGFF %s, %d levels",
        dict(zip(sp_axes, halo)), halo_reason, factor, dict(zip(sp_axes, block)),
        "x".join(str(-(-b // c)) for b, c in zip(block, chunks)), chunks,
        n_blocks, n_t, hf, options.dtype, out_axes, options.ngff, spec.n_levels,
    )
    block_out = tuple(1 if a == "t" else n_out if a == "c" else block[sp_axes.index(a)] for a in out_axes)
    local_levels = block_local_levels(spec, block_out) if options.stream_pyramid else 0
    if spec.n_levels and spec.n_levels > 1:
        log.info("pyramid: levels 1..%d written by each block as it finishes%s", local_levels,
                 f"; levels {local_levels + 1}..{spec.n_levels - 1} built after level 0 (blocks not aligned to 2^k x chunks there)"
                 if local_levels < spec.n_levels - 1 else "")
    job = JobSpec(
        input=image.ref, output=target, out_axes=out_axes, out_dtype=options.dtype,
        halo=halo, factor=factor, processor=factory.token,
        local_levels=local_levels, level_shapes=tuple(spec.level_shapes()),
    )
    n_tasks = 0 if complete else n_blocks * n_t - len(done)
    result = PredictResult(
        output=output, halo=halo, block=block, chunks=chunks, n_blocks=n_blocks * n_t,
        n_done_before=n_blocks * n_t - n_tasks, halo_factor=hf,
    )
    result.extra["local_levels"] = local_levels
    need_pyramid = bool(spec.n_levels and spec.n_levels - 1 > local_levels)
    if complete:
        log.info("all %d blocks already done and the pyramid is complete; nothing to do", n_blocks * n_t)
        return result
    with dask_client(
        options.scheduler, options.threads, cluster=options.cluster, workers=options.workers,
        profile=options.cluster_profile, tls_ca=options.tls_ca, tls_cert=options.tls_cert, tls_key=options.tls_key,
        torch_threads=options.torch_threads,
    ) as client:
        if n_tasks > 0:
            stats = run_blocks(
                client, job, factory, iter_tasks(spatial, block, n_t, done), n_tasks,
                max_in_flight=options.max_in_flight, progress=options.progress, group=options.blocks_per_task,
            )
            result.seconds_level0 = stats["seconds"]
            result.voxels_per_s = stats["voxels_per_s"]
            result.extra["blocks_per_task"] = stats["blocks_per_task"]
            log.info("level 0: %d blocks in %.1f s (%.3g voxel/s)", n_tasks, stats["seconds"], stats["voxels_per_s"])
        else:
            log.info("all %d blocks already done; nothing to predict", n_blocks * n_t)
        t0 = time.perf_counter()
        if need_pyramid:
            build_pyramid(spec, client, start_level=local_levels + 1)
        result.seconds_pyramid = time.perf_counter() - t0
    if as_tiff:
        import zarr

        data = np.asarray(zarr.open_array(store=str(Path(target) / "0"), mode="r")[...])
        if Path(output).exists():
            remove_output(output)
        write_tiff(output, data, out_axes, spec.scale)
        shutil.rmtree(tmpdir, ignore_errors=True)
    else:
        ledger.set_complete()
    return result


def predict(
    model_path: str | Path,
    input_uri: str | Path,
    output: str | Path,
    options: PredictOptions | None = None,
    axes: str | None = None,
    level: int = 0,
    inference: dict[str, Any] | None = None,
    tta: bool = False,
) -> PredictResult:
    """``quietscope predict``: apply a trained model to an image, chunked, into OME-Zarr (or TIFF).

    ``inference`` holds prediction-time method options (e.g. ``{"estimate": "prior"}``);
    ``tta`` averages the 8 flips/90° rotations in y/x of every block (:func:`dihedral_mean`,
    8x the compute).
    """
    from quietscope.modelfile import check_matches, load_model
    from quietscope.training.loop import resolve_device

    options = options or PredictOptions()
    image = open_image(input_uri, level=level, axes=axes)
    method, manifest = load_model(model_path, "cpu")
    inference = {k: v for k, v in (inference or {}).items() if v is not None}
    method.set_inference(**inference)
    check_matches(manifest, image.spatial_axes, image.n_channels, f"input {str(input_uri)!r}", method.predict_in_channels)
    if not options.resume or not Path(output).exists():
        check_output_path(output, [image.ref.uri], options.overwrite)
    check_finite_sample(image)
    device = resolve_device(options.device)
    halo = method_halo(method)
    if tta:
        if not method.supports_tta:
            raise ConfigError(f"--tta does not apply to {manifest['method']['method']!r} (its outputs include sample "
                              "spreads); leave --tta out and use --samples for a smoother estimate")
        halo = tta_halo(halo)
        log.info("test-time augmentation: mean of 8 flips/rotations in y/x per block (halo %s)", list(halo))
    stats = manifest.get("data_stats", {})
    windows = None
    if stats:
        lo, hi = float(stats.get("min", 0.0)), float(stats.get("max", 1.0))
        windows = [(lo, hi)] * len(method.output_names)
    inference_items = tuple(sorted(inference.items()))
    factory = ModelProcessor(
        str(Path(model_path).resolve()), str(device), file_token(model_path, str(device) + repr(inference_items) + f"tta={tta}"),
        inference_items, tta,
    )
    provenance = {
        "quietscope_version": __version__,
        "model": str(model_path),
        "method": manifest["method"]["method"],
        "input": str(input_uri),
        "input_level": level,
        "inference": inference,
        "tta": tta,
    }
    log.info("method %s, device %s, normalisation mean %s std %s", manifest["method"]["method"], device,
             [round(v, 4) for v in method.norm_mean.tolist()], [round(v, 4) for v in method.norm_std.tolist()])
    return run_prediction(
        image, output, factory, method.output_names, halo, method.downsampling_factor, options, provenance, windows
    )
