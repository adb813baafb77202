"""``quietscope predict``: a model file and an image in, a multiscale OME-Zarr (or TIFF) out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from quietscope import __version__
from quietscope.chunked import BlockOptions, PredictOptions, PredictResult, preflight, run_prediction
from quietscope.device import resolve_device, resolve_precision, set_module_precision
from quietscope.errors import ConfigError
from quietscope.inference import (
    GPU_MEMORY_FRACTION,
    ModelProcessor,
    file_token,
    gpu_work_voxels,
    load_for_inference,
    probe_bytes_per_voxel,
)
from quietscope.inference_memory import memory_profile
from quietscope.io.reading import open_image
from quietscope.runner.cluster import check_gpus_local, resolve_gpus
from quietscope.runner.heap import ENV_VAR as HEAP_ENV_VAR
from quietscope.runner.heap import bound_heap

log = logging.getLogger(__name__)


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
    """Apply a trained model to an image, block by block, into OME-Zarr (or TIFF).

    Parameters
    ----------
    model_path : str or pathlib.Path
        ``.qs`` model file from ``quietscope train``.
    input_uri : str or pathlib.Path
        OME-Zarr, zarr array or TIFF; opened read-only.
    output : str or pathlib.Path
        ``.ome.zarr`` or ``.tif``.
    options : PredictOptions, optional
        Output, block and compute options (default: :class:`PredictOptions`).
    axes : str, optional
        Axes of the input when its metadata lacks them.
    level : int
        Resolution level of a multiscale input.
    inference : dict, optional
        Prediction-time method options, e.g. ``{"estimate": "prior", "n_samples": 8}``.
    tta : bool
        Average the 8 flips/90° rotations in y/x of every block (8x the compute).

    Returns
    -------
    PredictResult
        Halo, block, chunks, block counts and throughput.

    Raises
    ------
    InputError
        The input is missing, unreadable or holds NaNs.
    ModelError
        The model file is unreadable or does not match the data.
    OutputError
        The output exists (without ``overwrite``) or belongs to another job (``resume``).
    ConfigError
        Options that do not fit the data or the method.

    Examples
    --------
    >>> predict("model.qs", "stack.ome.zarr", "denoised.ome.zarr",
    ...         PredictOptions(chunks=(256, 256)))                # doctest: +SKIP
    """
    options = options or PredictOptions()
    # Before the model loads and the probes run: their freed tensors would otherwise raise glibc's
    # dynamic threshold and fragment the heap before the first block (benchmarks §9d).
    # "cpu" and "auto" resolve without raising; an explicit GPU is resolved after the input and
    # model checks, so their errors come first.
    device = resolve_device(options.device) if options.device in ("cpu", "auto") else None
    threshold = bound_heap() if device is not None and device.type == "cpu" else 0
    image = open_image(input_uri, level=level, axes=axes)
    inference = {k: v for k, v in (inference or {}).items() if v is not None}
    # Checked on the CPU before any worker starts: a mismatch must not cost a cluster start.
    model = load_for_inference(model_path, "cpu", inference, tta, image.spatial_axes, image.n_channels,
                               f"input {str(input_uri)!r}")
    _check_gpu_options(options)
    preflight(image, output, options)
    device = device or resolve_device(options.device)
    precision = resolve_precision(options.compute.precision, device)
    bytes_per_voxel = None
    if device.type == "cuda":
        bytes_per_voxel, options = _size_for_gpu(model_path, device, precision, inference, tta, options)
    if tta:
        log.info("test-time augmentation: mean of 8 flips/rotations in y/x per block (halo %s)", list(model.halo))
    stats = model.manifest.get("data_stats", {})
    names = model.method.output_names
    windows = [(float(stats.get("min", 0.0)), float(stats.get("max", 1.0)))] * len(names) if stats else None
    items = tuple(sorted(inference.items()))
    # fp32 keeps the token of earlier versions (their outputs resume); other precisions differ.
    token_extra = str(device) + repr(items) + f"tta={tta}" + (f"precision={precision}" if precision != "fp32" else "")
    factory = ModelProcessor(str(Path(model_path).resolve()), str(device), file_token(model_path, token_extra), items, tta,
                             precision=precision, bytes_per_voxel=bytes_per_voxel)
    provenance = {"quietscope_version": __version__, "model": str(model_path), "method": model.name,
                  "input": str(input_uri), "input_level": level, "inference": inference, "tta": tta}
    log.info("method %s, device %s, precision %s, normalisation mean %s std %s", model.name, device, precision,
             [round(v, 4) for v in model.method.norm_mean.tolist()], [round(v, 4) for v in model.method.norm_std.tolist()])
    if getattr(model.method, "estimate", None) is not None:
        source = "--estimate" if inference.get("estimate") else "the model file's default"
        log.info("estimate: %s (%s)", model.method.estimate, source)
    memory = memory_profile(model.method, len(names))
    if threshold:
        log.info("heap: allocations of %d MB and more mapped on their own, so freed memory returns to the system "
                 "and the peak stays near the plan (%s=0 leaves the allocator as it is)", threshold >> 20, HEAP_ENV_VAR)
    options = options.model_copy(update={"device": str(device)})  # the default --memory follows the device
    log.info("memory per voxel: %.0f bytes of activations (probed, with slack), %.0f of block buffers",
             memory.net_bytes_per_voxel, memory.io_bytes_per_voxel)
    return run_prediction(image, output, factory, names, model.halo, model.factor, options, provenance, windows,
                          memory=memory)


def _check_gpu_options(options: PredictOptions) -> None:
    """``--gpus`` errors before anything is written or started (one line each)."""
    if not options.compute.gpus:
        return
    check_gpus_local(options.compute)
    if options.device not in ("auto", "cuda"):
        raise ConfigError(f"--gpus gives each worker its own GPU (it is cuda there); --device {options.device} "
                          "contradicts it: leave --device at auto (or cuda)")
    resolve_gpus(options.compute.gpus)


def _size_for_gpu(model_path: str | Path, device: Any, precision: str, inference: dict[str, Any], tta: bool,
                  options: PredictOptions) -> tuple[float, PredictOptions]:
    """Measure the model's device memory per voxel once; size the blocks from the GPU's memory.

    Blocks are planned from the GPU's *total* memory (the same plan on every run, so --resume
    finds the same blocks); each worker then bounds its passes by its own free memory.
    """
    probe = load_for_inference(model_path, str(device), inference, tta)
    set_module_precision(probe.method.net, precision, device.type)
    bpv = probe_bytes_per_voxel(probe.method, device)
    del probe
    total = torch.cuda.mem_get_info(device)[1]
    plan_voxels = gpu_work_voxels(total, bpv)
    default = BlockOptions.model_fields["max_tile_voxels"].default
    log.info("GPU sizing: %.0f bytes/voxel measured at %s; %.1f GiB on %s -> passes of <= %d voxels (%.0f%% of memory)",
             bpv, precision, total / 2**30, device, plan_voxels, 100 * GPU_MEMORY_FRACTION)
    if options.blocks.block is None and options.blocks.max_tile_voxels == default:
        options = options.model_copy(update={"max_tile_voxels": plan_voxels})
    return bpv, options
