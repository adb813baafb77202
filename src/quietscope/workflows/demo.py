"""``quietscope demo``: noisy sample -> N2V trained on sampled patches -> chunked prediction -> OME-Zarr.

Uses a real image from ``../shared/data`` with synthetic Poisson–Gaussian noise when present,
else a generated one, and reports PSNR before and after against the clean reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from quietscope.chunked import PredictOptions
from quietscope.errors import OutputError
from quietscope.io.sample_data import real_clean_2d, synthetic_clean
from quietscope.io.writing import OutputSpec, create_ome_zarr, open_level, remove_output
from quietscope.metrics import psnr
from quietscope.simulate import poisson_gaussian
from quietscope.workflows.predict import predict
from quietscope.workflows.train import train_model

log = logging.getLogger(__name__)


def write_ome_zarr_image(path: str | Path, data: np.ndarray, axes: str, chunks: tuple[int, ...], scale=None) -> None:
    """Write a small in-memory array as a (single-level) OME-Zarr image."""
    lo, hi = float(np.percentile(data, 0.5)), float(np.percentile(data, 99.5))
    spec = OutputSpec(
        path=str(path), axes=axes, shape=data.shape, chunks=chunks, dtype=str(data.dtype),
        scale=tuple(scale) if scale else (), n_levels=1, channel_windows=[(lo, hi)],
        units=tuple("micrometer" if a in "zyx" else None for a in axes),
    )
    create_ome_zarr(spec)
    open_level(path, 0)[...] = data


def run_demo(
    output_dir: str | Path = "demo_output",
    steps: int = 300,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline on a small sample: simulate noise, train N2V, predict chunked, score.

    Parameters
    ----------
    output_dir : str or pathlib.Path
        Folder for the sample, the model and the result.
    steps : int
        Training steps (about a minute on 2 CPU cores at the default).
    seed : int
        Seed of the noise and the training.
    overwrite : bool
        Replace an existing ``output_dir``.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        ``sample``, ``shape``, ``model``, ``output`` paths and ``psnr_noisy_db`` /
        ``psnr_denoised_db`` against the clean sample.

    Raises
    ------
    OutputError
        ``output_dir`` exists and ``overwrite`` is not given.

    Examples
    --------
    >>> run_demo("demo_output", steps=300)["psnr_denoised_db"]    # doctest: +SKIP
    """
    out = Path(output_dir)
    if out.exists():
        if not overwrite:
            raise OutputError(f"demo output {str(out)!r} exists; pass --overwrite (make demo does) or choose --output")
        remove_output(out)
    out.mkdir(parents=True)
    real = real_clean_2d(256)
    if real is not None:
        clean, source = real
    else:
        clean, source = synthetic_clean((256, 256), seed), "synthetic blobs and filaments (shared/data not found)"
    # Low light: ~1 photon per 4 grey levels of the clean image, plus read noise of 10% of its std.
    noisy = poisson_gaussian(clean, poisson_scale=0.25 * 100 / max(float(clean.mean()), 1e-6), gauss_rel=0.1,
                             data_std=float(clean.std()), seed=seed)
    noisy_path = out / "noisy.ome.zarr"
    write_ome_zarr_image(noisy_path, noisy.astype(np.float32), "yx", (128, 128), scale=(0.1, 0.1))
    np.save(out / "clean.npy", clean)
    model_path = out / "n2v.qs"
    log.info("demo sample: %s, %s, noisy PSNR %.2f dB", source, clean.shape, psnr(noisy, clean))
    train_model(
        noisy_path, model_path,
        {"method": "n2v", "net": {"depth": 2, "filters": 16}, "masked_pixel_percentage": 2.0},
        {"patch": (64,), "batch": 16, "steps": steps, "lr": 1e-3, "seed": seed, "val_every": 50,
         "checkpoint_every": 100, "pool_size": 256},
        progress=progress,
    )
    result_path = out / "denoised.ome.zarr"
    res = predict(model_path, noisy_path, result_path, PredictOptions(chunks=(128, 128), block=(128, 128), progress=progress))
    denoised = np.asarray(open_level(result_path, 0, "r")[...])
    summary = {
        "sample": source,
        "shape": list(clean.shape),
        "input": str(noisy_path),
        "model": str(model_path),
        "output": str(result_path),
        "psnr_noisy_db": round(psnr(noisy, clean), 2),
        "psnr_denoised_db": round(psnr(denoised, clean), 2),
        "halo": list(res.halo),
        "blocks": res.n_blocks,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
