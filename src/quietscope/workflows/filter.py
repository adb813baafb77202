"""``quietscope filter``: a classic filter (box, box3d, gaussian, median) block by block."""

from __future__ import annotations

import logging
from pathlib import Path

from quietscope import __version__
from quietscope.chunked import PredictOptions, PredictResult, preflight, run_prediction
from quietscope.errors import ConfigError
from quietscope.io.reading import open_image
from quietscope.methods.filters import DEFAULT_TRUNCATE, filter_processor
from quietscope.runner.cluster import resolve_gpus

log = logging.getLogger(__name__)


def filter_image(
    input_uri: str | Path,
    output: str | Path,
    kind: str,
    size: int | None = None,
    sigma: float | None = None,
    options: PredictOptions | None = None,
    truncate: float = DEFAULT_TRUNCATE,
    axes: str | None = None,
    level: int = 0,
) -> PredictResult:
    """``quietscope filter``: apply a classic filter block by block into a multiscale OME-Zarr.

    Parameters
    ----------
    input_uri : str or Path
        OME-Zarr, zarr array or TIFF.
    output : str or Path
        ``.ome.zarr`` (or ``.tif`` for small data).
    kind : {"box", "box3d", "gaussian", "median"}
        See :func:`filter_sizes`.
    size, sigma : optional
        Footprint edge (box/box3d/median) or Gaussian std in voxels (gaussian).
    options : PredictOptions, optional
        Chunks, block, dtype, scheduler, ... as for ``quietscope predict``.
    truncate : float, optional
        Gaussian cut-off in sigmas; the halo is ``ceil(truncate * sigma)``.

    Returns
    -------
    PredictResult

    Raises
    ------
    ConfigError
        An unknown filter kind or size, or options that do not fit the data.
    InputError, OutputError
        As for :func:`quietscope.workflows.predict.predict`.

    Examples
    --------
    >>> filter_image("stack.ome.zarr", "smoothed.ome.zarr", "gaussian", sigma=1.5)  # doctest: +SKIP
    """
    options = options or PredictOptions()
    image = open_image(input_uri, level=level, axes=axes)
    proc = filter_processor(kind, len(image.spatial_axes), size, sigma, truncate)
    if options.compute.precision not in ("auto", "fp32"):
        raise ConfigError(f"--precision {options.compute.precision}: filters compute in float32; --precision is for predict")
    if options.compute.gpus:
        resolve_gpus(options.compute.gpus)  # no GPU: one clear line before anything is written
    preflight(image, output, options)
    names = ["filtered"] if image.n_channels == 1 else [f"filtered_ch{i}" for i in range(image.n_channels)]
    provenance = {
        "quietscope_version": __version__,
        "filter": {"kind": kind, "size": size, "sigma": sigma, "truncate": truncate},
        "input": str(input_uri),
        "input_level": level,
    }
    log.info("filter %s, footprint %s, sigma %s, halo = filter radius %s", kind,
             dict(zip(image.spatial_axes, proc.sizes)), dict(zip(image.spatial_axes, proc.sigmas)),
             dict(zip(image.spatial_axes, proc.halo)))
    return run_prediction(image, output, proc, names, proc.halo, 1, options, provenance, halo_reason="filter radius")
