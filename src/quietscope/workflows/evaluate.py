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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quietscope.errors import InputError
from quietscope.io.reading import open_image
from quietscope.metrics import mean_and_sem, psnr, range_invariant_psnr, snr, ssim
from quietscope.metrics.streaming import streamed_metrics

log = logging.getLogger(__name__)

METRICS = ("psnr", "ri_psnr", "ssim", "snr")


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All four metrics of one 2D/3D image (PSNR and SSIM with the ground truth's range)."""
    return {
        "psnr": psnr(pred, gt),
        "ri_psnr": range_invariant_psnr(pred, gt),
        "ssim": ssim(pred, gt),
        "snr": snr(pred, gt),
    }


@dataclass
class Evaluation:
    """Per-image rows and their mean ± standard error."""

    prediction: str
    ground_truth: str
    axes: str
    shape: tuple[int, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The evaluation as JSON-ready data."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def table(self, per_image: bool = False) -> str:
        """Plain-text table: one line per image (when asked), then mean ± s.e."""
        head = f"{'image':<12}" + "".join(f"{m:>18}" for m in METRICS)
        lines = [head]
        if per_image:
            for r in self.rows:
                lines.append(f"{r['image']:<12}" + "".join(f"{r[m]:>18.4f}" for m in METRICS))
        cells = []
        for m in METRICS:
            s = self.summary[m]
            cells.append(f"{s['mean']:>10.4f} ± {s['sem']:<6.4f}" if np.isfinite(s["sem"]) else f"{s['mean']:>18.4f}")
        lines.append(f"{'mean ± s.e.':<12}" + "".join(f"{c:>18}" for c in cells))
        lines.append(f"({len(self.rows)} image(s); PSNR/SSIM data range from the ground truth)")
        return "\n".join(lines)


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, axes: str, names: tuple[str, str] = ("prediction", "ground truth")) -> Evaluation:
    """Evaluate in-memory arrays in canonical ``axes`` (``t`` and ``c`` split into images)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"{names[0]} has shape {pred.shape} but {names[1]} has shape {gt.shape} (axes {axes}); "
                         "compare images of the same shape (crop or pick the matching level)")
    ev = Evaluation(names[0], names[1], axes, pred.shape)
    _fill(ev, lambda t, c: image_metrics(_plane(pred, axes, t, c), _plane(gt, axes, t, c)),
          pred.shape[axes.index("t")] if "t" in axes else 1, pred.shape[axes.index("c")] if "c" in axes else 1)
    return ev


def _plane(a: np.ndarray, axes: str, t: int, c: int) -> np.ndarray:
    idx = tuple(t if x == "t" else c if x == "c" else slice(None) for x in axes)
    return a[idx]


def _fill(ev: Evaluation, metrics_of: Any, n_t: int, n_c: int) -> None:
    for t in range(n_t):
        for c in range(n_c):
            row: dict[str, Any] = {"image": f"t{t}_c{c}", "t": t, "c": c}
            row.update(metrics_of(t, c))
            ev.rows.append(row)
    for m in METRICS:
        mean, sem = mean_and_sem([r[m] for r in ev.rows])
        ev.summary[m] = {"mean": mean, "sem": sem}


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

    _fill(ev, metrics_of, p_img.n_timepoints, len(p_c))
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
