"""``quietscope predict``: a model file and an image in, a multiscale OME-Zarr (or TIFF) out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quietscope import __version__
from quietscope.chunked import PredictOptions, PredictResult, preflight, run_prediction
from quietscope.device import resolve_device
from quietscope.inference import ModelProcessor, file_token, load_for_inference
from quietscope.inference_memory import memory_profile
from quietscope.io.reading import open_image

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
    image = open_image(input_uri, level=level, axes=axes)
    inference = {k: v for k, v in (inference or {}).items() if v is not None}
    # Checked on the CPU before any worker starts: a mismatch must not cost a cluster start.
    model = load_for_inference(model_path, "cpu", inference, tta, image.spatial_axes, image.n_channels,
                               f"input {str(input_uri)!r}")
    preflight(image, output, options)
    device = resolve_device(options.device)
    if tta:
        log.info("test-time augmentation: mean of 8 flips/rotations in y/x per block (halo %s)", list(model.halo))
    stats = model.manifest.get("data_stats", {})
    names = model.method.output_names
    windows = [(float(stats.get("min", 0.0)), float(stats.get("max", 1.0)))] * len(names) if stats else None
    items = tuple(sorted(inference.items()))
    factory = ModelProcessor(str(Path(model_path).resolve()), str(device),
                             file_token(model_path, str(device) + repr(items) + f"tta={tta}"), items, tta)
    provenance = {"quietscope_version": __version__, "model": str(model_path), "method": model.name,
                  "input": str(input_uri), "input_level": level, "inference": inference, "tta": tta}
    log.info("method %s, device %s, normalisation mean %s std %s", model.name, device,
             [round(v, 4) for v in model.method.norm_mean.tolist()], [round(v, 4) for v in model.method.norm_std.tolist()])
    memory = memory_profile(model.method, len(names))
    options = options.model_copy(update={"device": str(device)})  # the default --memory follows the device
    log.info("memory per voxel: %.0f bytes of activations (probed, with slack), %.0f of block buffers",
             memory.net_bytes_per_voxel, memory.io_bytes_per_voxel)
    return run_prediction(image, output, factory, names, model.halo, model.factor, options, provenance, windows,
                          memory=memory)

