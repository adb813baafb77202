"""Anisotropic 3D stacks: does a U-Net that keeps full z resolution (``train --z-pool no``,
chosen by ``--z-pool auto`` when the z step is >= 2x the pixel size) denoise as well as one that
pools z, and how much halo and prediction time does it save?

Run with the project's venv (about 15 minutes on 2 CPU cores with the defaults)::

    .venv/bin/python -m benchmarks.anisotropic [--steps 600] [--seeds 0 1] [--no-yeast]

**Synthetic, with ground truth.** A clean volume is drawn on an isotropic 0.4 µm grid
(``quietscope.io.sample_data.synthetic_clean``: blobs and filaments), blurred along z by a
Gaussian axial PSF (σ = 3 voxels = 1.2 µm, as a light-sheet or confocal axial response is
several times wider than the lateral one) and sampled every 5th plane: a 20 × 160 × 160 stack
with voxel size 2.0 × 0.4 × 0.4 µm, written with that scale. Noise: Poisson with 10 photons at
the mean signal plus Gaussian of 0.05 × the volume's std (seeded). N2V (U-Net depth 2, 16 filters,
batch 8, 8 × 32 × 32 patches, 2 % masked, Adam lr 1e-3 cosine, same steps) is trained with
``z_pool`` *auto* (off here) and *yes*, and predicted through the chunked pipeline
(``quietscope.chunked.predict``, input chunks 10 × 64 × 64, default blocks). Reported: PSNR and
SSIM against the clean stack, the self-supervised validation loss, the measured halo, the
halo factor and the prediction time.

**Real, without ground truth.** ``shared/data/yeast3d`` (live yeast mitochondria, 4 × 17 × 192 ×
279, nellie sample data, BSD-3; its TIFF carries no z spacing, so both settings are given
explicitly): the same two trainings, reported by validation loss, halo and prediction time.

Results go to ``benchmarks/results/anisotropic.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from benchmarks.harness import (
    RESULTS,
    find_data_dir,
    fmt_mean_sem,
    machine,
    markdown_table,
    mean_and_sem,
    predict_run,
    read_output,
    score,
    train,
    write_json,
)
from quietscope.io.sample_data import synthetic_clean
from quietscope.methods.modelfile import load_model
from quietscope.simulate import poisson_gaussian
from quietscope.workflows.demo import write_ome_zarr_image

ISO_SHAPE = (100, 160, 160)  # isotropic 0.4 µm grid
Z_STEP = 5  # planes kept: every 5th -> z step 2.0 µm
SCALE = (0.4 * Z_STEP, 0.4, 0.4)
AXIAL_SIGMA = 3.0  # isotropic voxels
PHOTONS = 10.0
GAUSS_REL = 0.05
BUDGET = {"batch": 8, "patch": (8, 32, 32), "depth": 2, "filters": 16, "lr": 1e-3, "mask_percent": 2.0}
SETTINGS = {"auto": "auto", "yes": True}


def make_synthetic(work: Path, seed: int = 0) -> dict[str, Any]:
    """Clean and noisy anisotropic stacks (OME-Zarr with the physical scale; clean as npy)."""
    iso = synthetic_clean(ISO_SHAPE, seed=seed)
    iso = ndi.gaussian_filter(iso, (AXIAL_SIGMA, 0, 0))
    clean = np.ascontiguousarray(iso[Z_STEP // 2 :: Z_STEP]).astype(np.float32)
    noisy = poisson_gaussian(clean, PHOTONS / float(clean.mean()), GAUSS_REL, float(clean.std()), seed=seed)
    noisy = noisy.astype(np.float32)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "aniso.ome.zarr"
    write_ome_zarr_image(src, noisy, "zyx", (10, 64, 64), scale=SCALE)
    np.save(work / "clean.npy", clean)
    return {"src": str(src), "clean": clean, "noisy": noisy}


def train_and_predict(src: str, work: Path, name: str, z_pool: Any, seed: int, steps: int) -> dict[str, Any]:
    model = work / f"{name}.qs"
    b = BUDGET
    res = train(
        src, model,
        {"method": "n2v", "masked_pixel_percentage": b["mask_percent"],
         "net": {"depth": b["depth"], "filters": b["filters"], "z_pool": z_pool}},
        {"patch": b["patch"], "batch": b["batch"], "steps": steps, "lr": b["lr"], "seed": seed,
         "checkpoint_every": steps, "val_every": max(1, steps // 6)},
    ).result
    method, _ = load_model(model)
    out = work / f"{name}.ome.zarr"
    t0 = time.perf_counter()
    # The library's default prediction options (full pyramid, default threads and device): the
    # predict time is the one a user sees.
    pres = predict_run(model, src, out, options={"overwrite": True, "progress": False})
    seconds = time.perf_counter() - t0
    pred = read_output(out)
    return {
        "z_pool": bool(method.config.net.z_pool),
        "factor": method.downsampling_factor,
        "halo": list(pres.halo),
        "block": list(pres.block),
        "halo_factor": pres.halo_factor,
        "predict_seconds": seconds,
        "train_seconds": res.seconds,
        "best_val_loss": res.best_val,
        "pred": pred,
    }


def psnr_ssim(pred: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    return score(pred, clean, only=("psnr", "ssim"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--no-yeast", action="store_true", help="skip the real yeast3d stack")
    ap.add_argument("--workdir", default="/tmp/qs-aniso")
    ap.add_argument("--output", default=str(RESULTS / "anisotropic.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    t_start = time.perf_counter()

    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        data = make_synthetic(work / f"synthetic_s{seed}", seed=seed)
        noisy_score = psnr_ssim(data["noisy"], data["clean"])
        runs.append({"dataset": "synthetic", "seed": seed, "setting": "noisy input", **noisy_score})
        for label, z_pool in SETTINGS.items():
            r = train_and_predict(data["src"], work / f"synthetic_s{seed}", f"n2v_{label}", z_pool, seed, args.steps)
            pred = r.pop("pred")
            runs.append({"dataset": "synthetic", "seed": seed, "setting": f"z_pool {label}", **r, **psnr_ssim(pred, data["clean"])})
            print(runs[-1] | {"factor": str(r["factor"])}, flush=True)

    if not args.no_yeast:
        root = find_data_dir()
        if root is None:
            print("shared/data not found: the yeast3d rows are skipped")
        else:
            src = str(root / "yeast3d" / "yeast_mito_tzyx.tif")
            for label, z_pool in (("no", False), ("yes", True)):
                r = train_and_predict(src, work / "yeast", f"n2v_{label}", z_pool, args.seeds[0], args.steps)
                r.pop("pred")
                runs.append({"dataset": "yeast3d", "seed": args.seeds[0], "setting": f"z_pool {label}", **r})
                print(runs[-1] | {"factor": str(r["factor"])}, flush=True)

    def rows_of(dataset: str, setting: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["dataset"] == dataset and r["setting"] == setting]

    summary, table = [], []
    for dataset, settings in (("synthetic", ["noisy input", "z_pool auto", "z_pool yes"]), ("yeast3d", ["z_pool no", "z_pool yes"])):
        for setting in settings:
            rs = rows_of(dataset, setting)
            if not rs:
                continue
            row: dict[str, Any] = {"dataset": dataset, "setting": setting, "n": len(rs)}
            for key in ("psnr", "ssim", "best_val_loss", "predict_seconds", "train_seconds", "halo_factor"):
                if rs[0].get(key) is not None:
                    row[key] = mean_and_sem([r[key] for r in rs])
            if "halo" in rs[0]:
                row["halo"], row["factor"], row["z_pool"] = rs[0]["halo"], rs[0]["factor"], rs[0]["z_pool"]
            summary.append(row)

            def cell(key: str, digits: int = 2) -> str:
                return fmt_mean_sem(*row[key], digits=digits) if key in row else "–"

            table.append([dataset, setting + (f" (→ {'on' if row['z_pool'] else 'off'})" if "auto" in setting else ""),
                          cell("psnr"), cell("ssim", 3), cell("best_val_loss", 4),
                          str(row.get("halo", "–")), cell("halo_factor"), cell("predict_seconds", 1), cell("train_seconds", 0)])
    header = ["data", "setting", "PSNR (dB)", "SSIM", "val. loss", "halo (z, y, x)", "halo factor", "predict (s)", "train (s)"]
    print(markdown_table(header, table))
    write_json(args.output, {
        "machine": machine(),
        "budget": {**BUDGET, "steps": args.steps, "seeds": args.seeds},
        "synthetic": {"iso_shape": ISO_SHAPE, "z_step": Z_STEP, "scale_um": SCALE, "axial_sigma_vox": AXIAL_SIGMA,
                      "photons_at_mean": PHOTONS, "gauss_rel": GAUSS_REL},
        "runs": runs,
        "summary": summary,
        "wall_seconds": time.perf_counter() - t_start,
    })
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
