"""``quietscope evaluate``: image-quality metrics of a prediction against a ground truth.

Each ``(t, c)`` pair is one "image" (a 2D plane or a 3D volume) and gets one row of PSNR
(data range from the ground truth image), range-invariant PSNR, SSIM and SNR; the summary is
the mean ± standard error over images. Files are read block by block
(:func:`quietscope.metrics.streaming.streamed_metrics`), so memory holds a few blocks of each
input, never a whole volume; the numbers equal the whole-image metric functions'.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from quietscope.errors import InputError
from quietscope.io.reading import open_image
from quietscope.metrics.evaluation import METRICS, Evaluation, evaluate_arrays, fill_rows, image_metrics
from quietscope.metrics.streaming import streamed_metrics

__all__ = ["METRICS", "Evaluation", "evaluate", "evaluate_arrays", "image_metrics", "write_json"]

log = logging.getLogger(__name__)

def evaluate(
    prediction: str | Path,
    ground_truth: str | Path,
    axes: str | None = None,
    gt_axes: str | None = None,
    level: int = 0,
    channel: int | None = None,
    max_voxels: int = 2**22,
) -> Evaluation:
    """Compare a prediction with a ground truth, both OME-Zarr, zarr or TIFF, block by block.

    Parameters
    ----------
    prediction, ground_truth : str or Path
        Images of the same shape (after dropping singleton ``t``/``c`` axes).
    axes, gt_axes : str, optional
        Axes for inputs whose metadata lack them.
    level : int, optional
        Resolution level of both (multiscale inputs).
    channel : int, optional
        Evaluate only this channel of the prediction (e.g. one output of a multi-output
        model) against a single-channel ground truth.
    max_voxels : int, optional
        Largest block read at once (plus a 3-voxel SSIM halo); bounds memory, not the result.

    Returns
    -------
    Evaluation
        PSNR, range-invariant PSNR, SSIM and SNR per image (t, c) and their mean ± s.e.

    Raises
    ------
    InputError
        Missing or unreadable images, shapes that differ, or a channel that does not exist.

    Examples
    --------
    >>> evaluate("denoised.ome.zarr", "clean.tif").table()     # doctest: +SKIP
    """
    p_img = open_image(prediction, level=level, axes=axes)
    g_img = open_image(ground_truth, level=level, axes=gt_axes)
    if p_img.spatial_axes != g_img.spatial_axes or p_img.spatial_shape != g_img.spatial_shape:
        raise InputError(
            f"prediction is {p_img.spatial_axes} {p_img.spatial_shape} but ground truth is "
            f"{g_img.spatial_axes} {g_img.spatial_shape}; compare images of the same spatial shape "
            "(crop, or pick the matching --level)"
        )
    p_c = [channel] if channel is not None else list(range(p_img.n_channels))
    if channel is not None and not 0 <= channel < p_img.n_channels:
        raise InputError(f"--channel {channel} is out of range: the prediction has {p_img.n_channels} channel(s)")
    if len(p_c) != g_img.n_channels or p_img.n_timepoints != g_img.n_timepoints:
        raise InputError(
            f"prediction has {p_img.n_timepoints} time point(s) x {len(p_c)} channel(s) but ground truth has "
            f"{g_img.n_timepoints} x {g_img.n_channels}; pass matching images (or --channel to pick one output)"
        )
    ev = Evaluation(str(prediction), str(ground_truth), p_img.axes, p_img.shape)

    def metrics_of(t: int, c: int) -> dict[str, float]:
        return streamed_metrics(lambda sl: p_img.read_tc(t, sl, p_c[c])[0], lambda sl: g_img.read_tc(t, sl, c)[0],
                                p_img.spatial_shape, max_voxels=max_voxels)

    fill_rows(ev, metrics_of, p_img.n_timepoints, len(p_c))
    log.info("evaluated %d image(s) of %s %s", len(ev.rows), p_img.spatial_axes, p_img.spatial_shape)
    return ev


def write_json(ev: Evaluation, path: str | Path) -> None:
    """Write rows and summary as JSON (NaN standard errors become null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    Path(path).write_text(json.dumps(clean(ev.to_dict()), indent=2))
