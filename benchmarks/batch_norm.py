"""Does batch normalisation help or hurt N2V at workstation batch sizes?

Run with the project's venv (about 15 minutes on 2 CPU cores at 3000 steps)::

    .venv/bin/python benchmarks/batch_norm.py [--steps 3000] [--seeds 0] [--jobs 2]

Data: BPAE actin (shared/data/bpae, CC-BY-4.0), the whole 680 x 1100 field with the quality
benchmark's *moderate* noise (Poisson, 25 photons at the mean of the 192² centre crop, plus
Gaussian of 0.1 x the image std; noise seed 0, drawn once on the whole field). N2V (U-Net depth 2,
16 filters, 2 % masked pixels, batch 16, 32² patches, Adam lr 1e-3 cosine) is trained either on
the **field** (cells and empty background, as a user trains) or on the 192² **crop** alone, with
and without batch norm; every model is scored on the centre crop. For the field model with
batch norm, a third row re-estimates the running statistics after training (cumulative average
over 200 batches of training patches) to tell noisy running statistics from the train/eval
mismatch itself. Filters (box, Gaussian) are tuned on a held-out crop of the same noisy field.
Results go to ``benchmarks/results/batch_norm.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fmt_mean_sem, machine, markdown_table, write_json  # noqa: E402

CROP = 192
BUDGET = {"batch": 16, "patch": 32, "depth": 2, "filters": 16, "lr": 1e-3, "mask_percent": 2.0}


def make_data(work: Path) -> dict[str, Any]:
    """Noisy field and crop as OME-Zarr, clean and held-out crops as npy."""
    from quietscope.io.sample_data import find_data_dir, read_tiff
    from quietscope.simulate import poisson_gaussian
    from quietscope.workflows.demo import write_ome_zarr_image

    data = find_data_dir()
    if data is None:
        raise SystemExit("shared/data not found (set QUIETSCOPE_DATA); this benchmark needs the real images")
    img = read_tiff(data / "bpae" / "bpae_actin.tif").astype(np.float32)
    n = CROP
    cy, cx = (img.shape[0] - n) // 2, (img.shape[1] - n) // 2
    hy, hx = cy, cx - n - 16
    crop = (slice(cy, cy + n), slice(cx, cx + n))
    held = (slice(hy, hy + n), slice(hx, hx + n))
    scale = 25.0 / float(img[crop].mean())
    noisy = poisson_gaussian(img, scale, 0.1, float(img.std()), seed=0).astype(np.float32)
    work.mkdir(parents=True, exist_ok=True)
    write_ome_zarr_image(work / "field.ome.zarr", noisy, "yx", (256, 256))
    write_ome_zarr_image(work / "crop.ome.zarr", np.ascontiguousarray(noisy[crop]), "yx", (n, n))
    for name, arr in {"clean": img[crop], "noisy": noisy[crop], "clean_held": img[held], "noisy_held": noisy[held]}.items():
        np.save(work / f"{name}.npy", arr)
    return {"crop_origin": (cy, cx), "scale": scale}


def _score(pred: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    from quietscope.metrics import psnr

    bright = clean > np.percentile(clean, 90)
    return {"psnr": psnr(pred, clean, data_range=float(clean.max() - clean.min())),
            "bright_mean_ratio": float(pred[bright].mean() / clean[bright].mean())}


def filters(work: Path) -> list[dict[str, Any]]:
    from scipy import ndimage as ndi

    clean, noisy = np.load(work / "clean.npy"), np.load(work / "noisy.npy")
    ch, nh = np.load(work / "clean_held.npy"), np.load(work / "noisy_held.npy")
    grids = {"box": (lambda a, v: ndi.uniform_filter(a, int(v), mode="reflect"), [3, 5, 7]),
             "gaussian": (lambda a, v: ndi.gaussian_filter(a, v, mode="reflect"), [0.5, 0.75, 1.0, 1.5, 2.0])}
    rows = [{"row": "noisy", **_score(noisy, clean)}]
    for kind, (f, grid) in grids.items():
        best = max(grid, key=lambda v, f=f: _score(f(nh, v), ch)["psnr"])
        rows.append({"row": kind, "param": best, **_score(f(noisy, best), clean)})
    return rows


def _predict_crop(model: Path, src: Path, out: Path, origin: tuple[int, int] | None) -> np.ndarray:
    from quietscope.chunked import PredictOptions
    from quietscope.io.reading import open_image
    from quietscope.workflows.predict import predict

    predict(model, src, out, PredictOptions(progress=False, overwrite=True, n_levels=1, threads=1, device="cpu"))
    arr = np.asarray(open_image(str(out)).array).squeeze()
    if origin is None:
        return arr
    y, x = origin
    return arr[y:y + CROP, x:x + CROP]


def recalibrate_batch_norm(model: Path, src: Path, out_model: Path, batches: int = 200, seed: int = 5) -> None:
    """Re-estimate every batch-norm layer's running statistics as a cumulative average."""
    import torch

    from quietscope.io.reading import open_image
    from quietscope.methods.modelfile import load_model, save_model
    from quietscope.training.sampler import PatchSampler

    method, info = load_model(model)
    sampler = PatchSampler(open_image(str(src)), (BUDGET["patch"],) * 2, augment=True)
    rng = np.random.default_rng(seed)
    for mod in method.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative moving average
    method.train()
    with torch.no_grad():
        for _ in range(batches):
            method.net(method.normalize(torch.from_numpy(sampler.sample(BUDGET["batch"], rng))))
    save_model(out_model, method.eval(), info)


def run_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    from quietscope.workflows.train import train_model

    work, train_on, bn, seed, steps = Path(task["work"]), task["train_on"], task["bn"], task["seed"], task["steps"]
    src = work / f"{train_on}.ome.zarr"
    origin = tuple(task["crop_origin"]) if train_on == "field" else None
    tag = f"{train_on}_bn{int(bn)}_s{seed}"
    model = work / f"{tag}.qs"
    t0 = time.perf_counter()
    train_model(str(src), model,
                {"method": "n2v", "masked_pixel_percentage": BUDGET["mask_percent"],
                 "net": {"depth": BUDGET["depth"], "filters": BUDGET["filters"], "batch_norm": bn}},
                {"patch": (BUDGET["patch"],), "batch": BUDGET["batch"], "steps": steps, "lr": BUDGET["lr"], "seed": seed,
                 "val_every": max(steps // 10, 1), "checkpoint_every": max(steps // 10, 1), "pool_size": 256, "device": "cpu"},
                overwrite=True, progress=False)
    train_s = time.perf_counter() - t0
    clean = np.load(work / "clean.npy")
    label = f"n2v on {train_on}, batch norm {'on' if bn else 'off'}"
    rows = [{"row": label, "seed": seed, "train_s": train_s,
             **_score(_predict_crop(model, src, work / f"{tag}.ome.zarr", origin), clean)}]
    if bn and train_on == "field":
        recal = work / f"{tag}_recal.qs"
        recalibrate_batch_norm(model, src, recal)
        rows.append({"row": f"{label}, running statistics re-estimated", "seed": seed, "train_s": train_s,
                     **_score(_predict_crop(recal, src, work / f"{tag}_recal.ome.zarr", origin), clean)})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    order: list[str] = []
    for r in rows:
        if r["row"] not in order:
            order.append(r["row"])
    table = []
    for name in order:
        rs = [r for r in rows if r["row"] == name]
        p = np.array([r["psnr"] for r in rs])
        b = np.array([r["bright_mean_ratio"] for r in rs])
        sem = (lambda a: float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else None)
        note = str(rs[0]["param"]) if "param" in rs[0] else (f"n={len(rs)}" if "seed" in rs[0] else "")
        table.append([name, fmt_mean_sem(float(p.mean()), sem(p)), fmt_mean_sem(float(b.mean()), sem(b), 3), note])
    return markdown_table(["row", "PSNR on the crop (dB)", "bright-region mean / clean", "note"], table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/quietscope-bench-batchnorm")
    ap.add_argument("--output", default=str(RESULTS / "batch_norm.json"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    info = make_data(work)
    rows = filters(work)
    tasks = [{"work": str(work), "train_on": on, "bn": bn, "seed": s, "steps": args.steps, "crop_origin": info["crop_origin"]}
             for s in args.seeds for on in ("field", "crop") for bn in (True, False)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(run_task, tasks):
            rows.extend(result)
    table = render(rows)
    print(table)
    write_json(args.output, {"machine": machine(), "budget": {**BUDGET, "steps": args.steps}, "seeds": args.seeds,
                             "wall_s": time.perf_counter() - t0, "rows": rows, "table": table})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
