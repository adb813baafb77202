"""Image-quality metrics of a prediction against a ground truth, one row per (t, c) image.

Each ``(t, c)`` pair is one "image" (a 2D plane or a 3D volume) and gets one row of PSNR
(data range from the ground truth image), range-invariant PSNR, SSIM and SNR; the summary is
the mean ± standard error over images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from quietscope.errors import InputError
from quietscope.metrics.image_quality import mean_and_sem, psnr, range_invariant_psnr, snr, ssim

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
    fill_rows(ev, lambda t, c: image_metrics(_plane(pred, axes, t, c), _plane(gt, axes, t, c)),
          pred.shape[axes.index("t")] if "t" in axes else 1, pred.shape[axes.index("c")] if "c" in axes else 1)
    return ev


def _plane(a: np.ndarray, axes: str, t: int, c: int) -> np.ndarray:
    idx = tuple(t if x == "t" else c if x == "c" else slice(None) for x in axes)
    return a[idx]


def fill_rows(ev: Evaluation, metrics_of: Any, n_t: int, n_c: int) -> None:
    """Add one row per (t, c) image from ``metrics_of(t, c)``, then the mean ± s.e. summary."""
    for t in range(n_t):
        for c in range(n_c):
            row: dict[str, Any] = {"image": f"t{t}_c{c}", "t": t, "c": c}
            row.update(metrics_of(t, c))
            ev.rows.append(row)
    for m in METRICS:
        mean, sem = mean_and_sem([r[m] for r in ev.rows])
        ev.summary[m] = {"mean": mean, "sem": sem}
