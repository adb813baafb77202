"""Bootstrapped PN2V vs N2V when both are trained on the whole field, as a user trains.

``benchmarks/quality.py`` trains every method on its 192² test crop alone (36 864 pixels). PN2V
learns a *distribution* per pixel, not just a mean, and may need more data than that. This
script repeats the bootstrapped PN2V-GMM row with both networks trained on the whole
680 × 1100 BPAE actin field (noise drawn once on the field), scored on the same centre crop.

Run with the project's venv (about 15 minutes per seed on 2 CPU cores; the two noise levels
run side by side, one thread each)::

    .venv/bin/python -m benchmarks.pn2v_field [--steps 3000] [--seeds 0 1 2] [--jobs 2]

Protocol, per noise level and seed: noise as in ``quality.py`` (moderate: Poisson 25 photons
at the crop's mean + Gaussian 0.1 × the image std; strong: 5 photons + 0.2 × std) on the
whole field, seed 0; N2V (U-Net depth 2, 16 filters, no batch norm, 2 % masked, batch 16,
32² patches, Adam lr 1e-3 cosine) trained on the field and predicted over it through the
chunked pipeline; a GMM noise model (3 components, linear coefficients) fitted to (N2V
prediction, noisy) pairs of the whole field, dropping the 0.5 % extreme pseudo-signals (PPN2V
protocol); PN2V (64 prior samples) trained on the field with it, same budget; both scored on the
192² centre crop (PSNR with the clean crop's range). PN2V's prior mean (``--estimate prior``,
the centre pixel left out) is scored too, to separate the prior from the fold-in. A third PN2V
is trained on the same bootstrapped pairs with their residuals rescaled to the data's own
Poisson–Gaussian variance line (``noise-model bootstrap --variance-from-data``). The N2V row
also records what the best fold-in of the centre pixel into N2V's prediction could add if its
weight may depend on intensity only (the binned fold-in of ``centre_pixel.py``, fitted with the clean
crop: a bound, not a method; ``harness.binned_fold_in_mse``).
Results go to ``benchmarks/results/pn2v_field.json``.

``--levels w2s`` runs the same rows on real camera noise: the whole 512² W2S frame fov081 ch1
(one real noisy frame) as the field, scored on ``quality.py``'s 192² W2S test crop (y 160, x 60)
against the 400-frame mean after an affine least-squares fit (the W2S images were stretched one
by one, see shared/data/README.md). Write it to its own JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    CROP,
    FIELD_BUDGET,
    RESULTS,
    SIM_LEVELS,
    binned_fold_in_mse,
    bpae_field_noise,
    data_dir,
    fmt_mean_sem,
    machine,
    markdown_table,
    mean_and_sem,
    predict,
    psnr_db,
    run_in_processes,
    single_thread,
    train_with_budget,
    write_json,
)
from quietscope.io.reading import open_image
from quietscope.io.sample_data import read_tiff
from quietscope.metrics import affine_fit
from quietscope.noise_models import fit_gmm, match_variance_line, pairs_from_prediction
from quietscope.simulate import poisson_gaussian
from quietscope.workflows.demo import write_ome_zarr_image
from quietscope.workflows.noise_model import data_variance_line

LEVELS = SIM_LEVELS
VFD = "pn2v-gmm bootstrapped, variance from data (field)"


W2S_FOV, W2S_ORIGIN = "fov081_ch1", (160, 60)  # quality.py's W2S test crop


def w2s_field() -> tuple[np.ndarray, np.ndarray]:
    """The real noisy W2S frame and its 400-frame mean (float32, 512²)."""
    return tuple(read_tiff(data_dir() / "w2s" / kind / f"{W2S_FOV}.tif").astype(np.float32)  # type: ignore[return-value]
                 for kind in ("noisy", "clean"))


def make_data(work: Path, level: str) -> dict[str, Any]:
    """The noisy field as OME-Zarr and the clean crop as npy; returns the crop's origin."""
    if level == "w2s":
        noisy, img = w2s_field()
        cy, cx = W2S_ORIGIN
    else:
        img, (cy, cx), scale, _ = bpae_field_noise(level)
        _, g = LEVELS[level]
        noisy = poisson_gaussian(img, scale, g, float(img.std()), seed=0).astype(np.float32)
    d = work / level
    d.mkdir(parents=True, exist_ok=True)
    write_ome_zarr_image(d / "field.ome.zarr", noisy, "yx", (256, 256))
    np.save(d / "clean.npy", img[cy:cy + CROP, cx:cx + CROP])
    np.save(d / "noisy_crop.npy", noisy[cy:cy + CROP, cx:cx + CROP])
    return {"dir": str(d), "origin": (cy, cx)}


def run_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    single_thread()
    logging.basicConfig(level=logging.WARNING)
    d, level, seed, steps = Path(task["dir"]), task["level"], task["seed"], task["steps"]
    cy, cx = task["origin"]
    clean = np.load(d / "clean.npy")
    src = d / "field.ome.zarr"
    # Another gain/offset than the noisy frame (W2S): compare after an affine fit.
    metric = "psnr_affine" if level == "w2s" else "psnr"

    def crop(a: np.ndarray) -> np.ndarray:
        return a[cy:cy + CROP, cx:cx + CROP]

    def train(model: Path, options: dict[str, Any]) -> float | None:
        return train_with_budget(src, model, options, steps, seed, reuse=bool(task.get("reuse"))).seconds

    rows = []
    n2v_model = d / f"n2v_s{seed}.qs"
    t_n2v = train(n2v_model, {"method": "n2v"})
    n2v_field = predict(n2v_model, src, d / f"n2v_s{seed}.ome.zarr")
    noisy_field = np.asarray(open_image(str(src)).array).astype(np.float32)
    # What any fold-in of the centre pixel into N2V's prediction can add when its weight may
    # depend on intensity only (harness.binned_fold_in_mse), in the noisy data's units.
    n2v_c, noisy_c, clean_c = (a.astype(np.float64) for a in (crop(n2v_field), crop(noisy_field), clean))
    signal_c = affine_fit(clean_c, noisy_c) if level == "w2s" else clean_c
    bound_db = 10 * np.log10(float(np.mean((n2v_c - signal_c) ** 2)) / binned_fold_in_mse(n2v_c, noisy_c, signal_c))
    rows.append({"level": level, "seed": seed, "row": "n2v (field)", "psnr": psnr_db(crop(n2v_field), clean, metric),
                 "train_s": t_n2v, "binned_fold_in_gain_db": float(bound_db)})
    s, x = pairs_from_prediction(n2v_field, noisy_field)
    t0 = time.perf_counter()
    full = (float(noisy_field.min()), float(noisy_field.max()))  # as noise-model bootstrap does
    nm = fit_gmm(s, x, n_gaussian=3, n_coeff=2, seed=seed, observed_range=full)
    fit_s = time.perf_counter() - t0
    pn2v_model = d / f"pn2v_boot_s{seed}.qs"
    t_pn2v = train(pn2v_model, {"method": "pn2v", "noise_model": nm.to_dict()})
    mmse = predict(pn2v_model, src, d / f"pn2v_boot_s{seed}.ome.zarr")
    prior = predict(pn2v_model, src, d / f"pn2v_boot_prior_s{seed}.ome.zarr", inference={"estimate": "prior"})
    rows.append({"level": level, "seed": seed, "row": "pn2v-gmm bootstrapped (field)", "psnr": psnr_db(crop(mmse), clean, metric),
                 "train_s": t_pn2v, "gmm_fit_s": fit_s, "n_pairs": int(s.size)})
    rows.append({"level": level, "seed": seed, "row": "pn2v prior mean (field)", "psnr": psnr_db(crop(prior), clean, metric)})
    if task.get("variance_from_data", True):
        # The same bootstrap with its residuals rescaled to the data's own Poisson-Gaussian
        # variance line (noise-model bootstrap --variance-from-data).
        gain, intercept = data_variance_line(str(src), seed=seed)
        x_fit, _, factor = match_variance_line(s, x, gain, intercept)
        nm_v = fit_gmm(s, x_fit, n_gaussian=3, n_coeff=2, seed=seed, observed_range=full)
        model_v = d / f"pn2v_vfd_s{seed}.qs"
        t_v = train(model_v, {"method": "pn2v", "noise_model": nm_v.to_dict()})
        mmse_v = predict(model_v, src, d / f"pn2v_vfd_s{seed}.ome.zarr")
        rows.append({"level": level, "seed": seed, "row": "pn2v-gmm bootstrapped, variance from data (field)",
                     "psnr": psnr_db(crop(mmse_v), clean, metric), "train_s": t_v, "gain": gain, "intercept": intercept,
                     "factor_min": float(factor.min()), "factor_median": float(np.median(factor)), "factor_max": float(factor.max())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=[*LEVELS, "w2s"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/qs-pn2v-field")
    ap.add_argument("--output", default=str(RESULTS / "pn2v_field.json"))
    ap.add_argument("--reuse", action="store_true", help="keep models an earlier run left in --workdir (same options)")
    args = ap.parse_args()
    work = Path(args.workdir)
    t_start = time.perf_counter()
    data = {level: make_data(work, level) for level in args.levels}
    tasks = [{"dir": data[lv]["dir"], "origin": data[lv]["origin"], "level": lv, "seed": s, "steps": args.steps,
              "reuse": args.reuse}
             for s in args.seeds for lv in args.levels]
    rows = run_in_processes(run_task, tasks, args.jobs)

    table, summary = [], []
    for level in args.levels:
        by_row: dict[str, list[float]] = {}
        for r in rows:
            if r["level"] == level:
                by_row.setdefault(r["row"], []).append(r["psnr"])
        seeds_done = sorted({r["seed"] for r in rows if r["level"] == level})
        bounds = [r["binned_fold_in_gain_db"] for r in rows
                  if r["level"] == level and r["row"] == "n2v (field)" and "binned_fold_in_gain_db" in r]
        diffs, diffs_v = [], []
        for s in seeds_done:
            got = {r["row"]: r["psnr"] for r in rows if r["level"] == level and r["seed"] == s}
            if "n2v (field)" in got and "pn2v-gmm bootstrapped (field)" in got:
                diffs.append(got["pn2v-gmm bootstrapped (field)"] - got["n2v (field)"])
            if "n2v (field)" in got and VFD in got:
                diffs_v.append(got[VFD] - got["n2v (field)"])

        entry = {"level": level, "n": len(seeds_done), **{k: mean_and_sem(v) for k, v in by_row.items()},
                 "pn2v_minus_n2v": mean_and_sem(diffs) if diffs else None, "pn2v_vfd_minus_n2v": mean_and_sem(diffs_v) if diffs_v else None,
                 "binned_fold_in_bound": mean_and_sem(bounds) if bounds else None}
        summary.append(entry)
        table.append([level, str(len(seeds_done))] + [fmt_mean_sem(*entry[k]) if k in entry else "–"
                      for k in ("n2v (field)", "pn2v prior mean (field)", "pn2v-gmm bootstrapped (field)", VFD)]
                     + [fmt_mean_sem(*entry[k]) if entry[k] else "–" for k in ("pn2v_minus_n2v", "pn2v_vfd_minus_n2v", "binned_fold_in_bound")])
    print(markdown_table(["noise", "seeds", "N2V (field)", "PN2V prior (field)", "PN2V-GMM boot. (field)",
                          "… variance from data", "boot. − N2V", "var. from data − N2V", "fold-in bound − N2V"], table))
    write_json(args.output, {"machine": machine(), "budget": {**FIELD_BUDGET, "steps": args.steps, "seeds": args.seeds},
                             "levels": {k: LEVELS.get(k, "real camera noise") for k in args.levels}, "rows": rows, "summary": summary,
                             "wall_seconds": time.perf_counter() - t_start})
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
