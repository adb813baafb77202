"""bayes-poisson vs N2V at low photon counts, both trained on the whole field, as a user trains.

``benchmarks/quality.py``'s photon rows train on the 192² test crop alone (36 864 pixels), and
there bayes-poisson over-fits within a few hundred steps: every pixel is in its loss, so 3000
steps of 16 × 32² patches visit the crop's pixels ~1300 times (docs/benchmarks.md, section 3).
This script trains both methods on the whole 680 × 1100 BPAE actin field instead (20× the
pixels; a realistic image is larger still) and scores them on the same centre crop.

Run with the project's venv (about 20 minutes for two seeds at one photon level on 2 CPU cores,
one thread per task)::

    .venv/bin/python -m benchmarks.bayes_field [--photons 5] [--steps 3000] [--seeds 0 1] [--jobs 2]

Protocol, per photon level: the clean field scaled so that the 99.9th percentile of the centre
192² crop is ``p`` photons (quality.py's photon-peak rows use the same crop and scaling), Poisson
noise drawn once on the field (seed 0), data in photons. N2V (U-Net depth 2, 16 filters, no batch
norm, 2 % masked) and bayes-poisson (blind-spot net depth 2, 16 filters): batch 16, 32² patches,
Adam lr 1e-3 cosine, ``steps`` steps, validation every ``steps/10`` on the held-apart slab, the
best validation weights kept (the default). Both predicted over the field through the chunked
pipeline; bayes-poisson twice, ``--estimate mmse`` (the posterior mean, the default) and
``--estimate prior`` (the blind prior alone). Scored on the centre crop: PSNR with the clean
crop's range. Two bounds, fitted *with* the clean crop (``harness.binned_fold_in_mse``):
what the best fold-in of the observed count could add to N2V's prediction and to bayes-poisson's
prior when its weight may depend on intensity only. A Gaussian filter, its sigma tuned on a
held-out crop of the same field (left of the test crop), is the classic reference.
Results go to ``benchmarks/results/bayes_field.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from benchmarks.harness import (
    CROP,
    FIELD_BUDGET,
    RESULTS,
    binned_fold_in_mse,
    centre_origin,
    fmt_mean_sem,
    machine,
    markdown_table,
    mean_and_sem,
    predict,
    psnr_db,
    read_bpae,
    run_in_processes,
    single_thread,
    train_with_budget,
    write_json,
)
from quietscope.io.reading import open_image
from quietscope.methods.modelfile import load_model
from quietscope.simulate import poisson_gaussian
from quietscope.workflows.demo import write_ome_zarr_image

GAUSS_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 2.5)  # quality.py's grid


def make_data(work: Path, photons: float) -> dict[str, Any]:
    """The noisy field (photons) as OME-Zarr, the clean field as npy; the crops' origins."""
    img = read_bpae("actin")
    cy, cx = centre_origin(img.shape)
    peak = float(np.percentile(img[cy:cy + CROP, cx:cx + CROP], 99.9))
    clean = img / peak * photons
    noisy = poisson_gaussian(clean, 1.0, None, 1.0, seed=0).astype(np.float32)
    d = work / f"photon-peak{photons:g}"
    d.mkdir(parents=True, exist_ok=True)
    write_ome_zarr_image(d / "field.ome.zarr", noisy, "yx", (256, 256))
    np.save(d / "clean_field.npy", clean)
    return {"dir": str(d), "photons": photons, "origin": (cy, cx), "heldout": (cy, cx - CROP - 16)}


def _crop(a: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    y, x = origin
    return np.asarray(a[y:y + CROP, x:x + CROP], dtype=np.float64)


def _bound_db(estimate: np.ndarray, noisy: np.ndarray, clean: np.ndarray) -> float:
    return float(10 * np.log10(np.mean((estimate - clean) ** 2) / binned_fold_in_mse(estimate, noisy, clean)))


def gaussian_row(ds: dict[str, Any]) -> dict[str, Any]:
    """Gaussian filter, sigma tuned on the held-out crop of the same noisy field."""
    d = Path(ds["dir"])
    clean = np.load(d / "clean_field.npy")
    noisy = np.asarray(open_image(str(d / "field.ome.zarr")).array, dtype=np.float64).squeeze()
    tune = {s: psnr_db(_crop(ndi.gaussian_filter(noisy, s, mode="mirror"), ds["heldout"]), _crop(clean, ds["heldout"]))
            for s in GAUSS_SIGMAS}
    best = max(tune, key=tune.get)
    pred = ndi.gaussian_filter(noisy, best, mode="mirror")
    return {"photons": ds["photons"], "seed": 0, "row": "gaussian", "sigma": best,
            "psnr": psnr_db(_crop(pred, ds["origin"]), _crop(clean, ds["origin"]))}


def run_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one method on the field for one seed, predict, score on the centre crop."""
    single_thread()
    ds, method, seed, steps = task["ds"], task["method"], task["seed"], task["steps"]
    d, origin = Path(ds["dir"]), ds["origin"]
    src = d / "field.ome.zarr"
    clean = _crop(np.load(d / "clean_field.npy"), origin)
    noisy = _crop(np.asarray(open_image(str(src)).array).squeeze(), origin)
    model = d / f"{method}_s{seed}.qs"
    train_s = train_with_budget(src, model, {"method": method}, steps, seed, reuse=task.get("reuse", False)).seconds
    kept = load_model(model)[1].get("kept_step")
    base = {"photons": ds["photons"], "seed": seed, "train_s": train_s, "kept_step": kept}
    if method == "n2v":
        pred = _crop(predict(model, src, d / f"n2v_s{seed}.ome.zarr"), origin)
        return [{**base, "row": "n2v", "psnr": psnr_db(pred, clean), "binned_fold_in_gain_db": _bound_db(pred, noisy, clean)}]
    post = _crop(predict(model, src, d / f"{method}_s{seed}.ome.zarr"), origin)
    prior = _crop(predict(model, src, d / f"{method}_prior_s{seed}.ome.zarr", inference={"estimate": "prior"}), origin)
    return [{**base, "row": f"{method} prior", "psnr": psnr_db(prior, clean),
             "binned_fold_in_gain_db": _bound_db(prior, noisy, clean)},
            {**base, "row": method, "psnr": psnr_db(post, clean)}]


ROWS = ("gaussian", "n2v", "bayes-poisson prior", "bayes-poisson")


def summarise(rows: list[dict[str, Any]], levels: list[float]) -> tuple[list[dict[str, Any]], list[list[str]]]:
    summary, table = [], []
    for p in levels:
        mine = [r for r in rows if r["photons"] == p]
        by_row = {k: [r["psnr"] for r in mine if r["row"] == k] for k in ROWS}
        bound = {k: [r["binned_fold_in_gain_db"] for r in mine if r["row"] == k and "binned_fold_in_gain_db" in r]
                 for k in ("n2v", "bayes-poisson prior")}
        diffs = []
        for s in sorted({r["seed"] for r in mine}):
            got = {r["row"]: r["psnr"] for r in mine if r["seed"] == s}
            if "n2v" in got and "bayes-poisson" in got:
                diffs.append(got["bayes-poisson"] - got["n2v"])
        kept = {k: [r["kept_step"] for r in mine if r["row"] == k] for k in ("n2v", "bayes-poisson")}
        entry = {"photons": p, **{k: mean_and_sem(v) for k, v in by_row.items() if v},
                 "bayes_minus_n2v": mean_and_sem(diffs) if diffs else None, "bayes_minus_n2v_per_seed": diffs,
                 "bound_n2v": mean_and_sem(bound["n2v"]) if bound["n2v"] else None,
                 "bound_prior": mean_and_sem(bound["bayes-poisson prior"]) if bound["bayes-poisson prior"] else None,
                 "kept_step": kept}
        summary.append(entry)
        cell = (lambda k: fmt_mean_sem(*entry[k]) if entry.get(k) else "–")
        table.append([f"{p:g}", str(len(diffs))] + [cell(k) for k in ROWS]
                     + [cell(k) for k in ("bayes_minus_n2v", "bound_n2v", "bound_prior")])
    return summary, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photons", type=float, nargs="+", default=[5.0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/qs-bayes-field")
    ap.add_argument("--output", default=str(RESULTS / "bayes_field.json"))
    ap.add_argument("--reuse", action="store_true", help="keep models an earlier run left in --workdir (same options)")
    args = ap.parse_args()
    work = Path(args.workdir)
    t_start = time.perf_counter()
    data = [make_data(work, p) for p in args.photons]
    rows: list[dict[str, Any]] = [gaussian_row(ds) for ds in data]
    # bayes-poisson costs ~4x N2V per step (four branches): submitted first.
    tasks = [{"ds": ds, "method": m, "seed": s, "steps": args.steps, "reuse": args.reuse}
             for m in ("bayes-poisson", "n2v") for ds in data for s in args.seeds]
    rows += run_in_processes(run_task, tasks, args.jobs)
    summary, table = summarise(rows, args.photons)
    print(markdown_table(["photons (peak)", "seeds", "Gaussian (tuned)", "N2V", "bayes-poisson prior", "bayes-poisson",
                          "bayes − N2V", "fold-in bound on N2V", "fold-in bound on the prior"], table))
    write_json(args.output, {"machine": machine(), "budget": {**FIELD_BUDGET, "steps": args.steps, "seeds": args.seeds},
                             "crop": CROP, "rows": rows, "summary": summary,
                             "wall_seconds": time.perf_counter() - t_start})
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
