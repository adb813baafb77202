"""Does batch normalisation help or hurt N2V at workstation batch sizes?

Run with the project's venv (about 15 minutes on 2 CPU cores at 3000 steps)::

    .venv/bin/python -m benchmarks.batch_norm [--steps 3000] [--seeds 0] [--jobs 2]

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from benchmarks.harness import (
    CROP,
    FIELD_BUDGET,
    RESULTS,
    SIM_LEVELS,
    centre_origin,
    fmt_mean_sem,
    machine,
    markdown_table,
    predict,
    psnr_db,
    read_bpae,
    run_in_processes,
    single_thread,
    train_with_budget,
    write_json,
)
from quietscope.io.reading import open_image
from quietscope.methods.modelfile import load_model, save_model
from quietscope.simulate import poisson_gaussian
from quietscope.training.sampler import PatchSampler
from quietscope.workflows.demo import write_ome_zarr_image

BUDGET = FIELD_BUDGET


def make_data(work: Path) -> dict[str, Any]:
    """Noisy field and crop as OME-Zarr, clean and held-out crops as npy."""
    img = read_bpae("actin")
    n = CROP
    cy, cx = centre_origin(img.shape, n)
    hy, hx = cy, cx - n - 16
    crop = (slice(cy, cy + n), slice(cx, cx + n))
    held = (slice(hy, hy + n), slice(hx, hx + n))
    photons, g = SIM_LEVELS["moderate"]
    scale = photons / float(img[crop].mean())
    noisy = poisson_gaussian(img, scale, g, float(img.std()), seed=0).astype(np.float32)
    work.mkdir(parents=True, exist_ok=True)
    write_ome_zarr_image(work / "field.ome.zarr", noisy, "yx", (256, 256))
    write_ome_zarr_image(work / "crop.ome.zarr", np.ascontiguousarray(noisy[crop]), "yx", (n, n))
    for name, arr in {"clean": img[crop], "noisy": noisy[crop], "clean_held": img[held], "noisy_held": noisy[held]}.items():
        np.save(work / f"{name}.npy", arr)
    return {"crop_origin": (cy, cx), "scale": scale}


def _score(pred: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    bright = clean > np.percentile(clean, 90)
    return {"psnr": psnr_db(pred, clean),
            "bright_mean_ratio": float(pred[bright].mean() / clean[bright].mean())}


def filters(work: Path) -> list[dict[str, Any]]:
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
    arr = predict(model, src, out)
    if origin is None:
        return arr
    y, x = origin
    return arr[y:y + CROP, x:x + CROP]


def recalibrate_batch_norm(model: Path, src: Path, out_model: Path, batches: int = 200, seed: int = 5) -> None:
    """Re-estimate every batch-norm layer's running statistics as a cumulative average."""
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
    single_thread()
    work, train_on, bn, seed, steps = Path(task["work"]), task["train_on"], task["bn"], task["seed"], task["steps"]
    src = work / f"{train_on}.ome.zarr"
    origin = tuple(task["crop_origin"]) if train_on == "field" else None
    tag = f"{train_on}_bn{int(bn)}_s{seed}"
    model = work / f"{tag}.qs"
    net = {"depth": BUDGET["depth"], "filters": BUDGET["filters"], "batch_norm": bn}
    train_s = train_with_budget(src, model, {"method": "n2v", "net": net}, steps, seed).seconds
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
    rows += run_in_processes(run_task, tasks, args.jobs, ordered=True, echo=False)
    table = render(rows)
    print(table)
    write_json(args.output, {"machine": machine(), "budget": {**BUDGET, "steps": args.steps}, "seeds": args.seeds,
                             "wall_s": time.perf_counter() - t0, "rows": rows, "table": table})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
