"""Denoising quality of every method against classic filters, on real images.

Run with the project's venv (about 30 minutes on 2 CPU cores; ``--quick`` for a smoke test)::

    .venv/bin/python -m benchmarks.quality [--quick] [--only n2v,gaussian] [--jobs 2]

Sections (each row goes through the real pipeline: ``quietscope.workflows.train.train_model`` ->
``quietscope.chunked.predict`` on an OME-Zarr, filters through ``quietscope.methods.filters.
filter_image``):

* ``sim``: BPAE crops (shared/data/bpae) with denoiSplit-style Poisson+Gaussian noise at two
  levels; PSNR against the clean crop (data range from the clean crop).
* ``w2s``: the real W2S noisy/clean pair (8-bit, contrast-stretched one by one): PSNR after an
  affine least-squares fit of the prediction onto the clean image (and the range-invariant PSNR).
* ``photon``: Poisson-only noise at peak 5, 20 and 100 photons (bayes-poisson vs bayes-gauss).
* ``deconv``: N2V-deconv on BPAE blurred by a Gaussian PSF (sigma 0.5, 1.0, 1.5), with and
  without the positivity term.

Filter sizes are chosen per dataset by the best PSNR on a held-out crop of the same image with
the same noise, then applied to the test crop. "Calibrated" noise models come from a stack of
noise realisations of the held-out clean crop (simulated data) or from the held-out noisy/clean
pair (W2S); "bootstrapped" ones from the N2V prediction of the test image (PPN2V protocol).
Results go to ``benchmarks/results/quality.json`` (updated after every finished task).

Models keep the weights of their best validation loss (validation every 100 steps), as
``quietscope train`` does by default since 2026-11-29; results recorded before then kept the last
step's weights (``--keep last``); at 300 steps the best is one of steps 100, 200 and 300.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from benchmarks.harness import (
    CROP,
    RESULTS,
    SIM_LEVELS,
    budget_train_options,
    centre_origin,
    data_dir,
    filter_output,
    fmt_mean_sem,
    machine,
    markdown_table,
    output_channels,
    predict_run,
    psnr_db,
    read_bpae,
    read_output,
    run_in_processes,
    score,
    single_thread,
    train,
    write_json,
)
from quietscope.io.sample_data import read_tiff
from quietscope.methods import available_methods
from quietscope.methods.filters import filter_array
from quietscope.metrics import affine_fit, mean_and_sem
from quietscope.noise_models import (
    fit_gmm,
    fit_histogram,
    load_noise_model,
    pairs_from_calibration,
    pairs_from_prediction,
)
from quietscope.simulate import poisson_gaussian
from quietscope.workflows.demo import write_ome_zarr_image

log = logging.getLogger("quality")

FULL_BUDGET = {"steps": 300, "batch": 16, "patch": 32, "depth": 2, "filters": 16, "lr": 1e-3, "seeds": 3}
QUICK_BUDGET = {"steps": 10, "batch": 4, "patch": 32, "depth": 2, "filters": 8, "lr": 1e-3, "seeds": 1}
FILTER_GRID = {"box": [3, 5, 7, 9], "median": [3, 5, 7], "gaussian": [0.5, 0.75, 1.0, 1.5, 2.0, 2.5]}

# Rows per section: (row label, method name or filter kind, extra).
SIM_ROWS = ["noisy", "box", "gaussian", "median", "n2v", "pn2v-histogram (calibrated)",
            "pn2v-gmm (calibrated)", "pn2v-gmm (bootstrapped)"]
PHOTON_ROWS = ["noisy", "gaussian", "n2v", "bayes-poisson", "bayes-gauss"]
DECONV_ROWS = ["noisy", "n2v-deconv (positivity)", "n2v-deconv (no positivity)"]
ROW_METHOD = {
    "n2v": "n2v", "pn2v-histogram (calibrated)": "pn2v", "pn2v-gmm (calibrated)": "pn2v",
    "pn2v-gmm (bootstrapped)": "pn2v", "bayes-poisson": "bayes-poisson", "bayes-gauss": "bayes-gauss",
    "n2v-deconv (positivity)": "n2v-deconv", "n2v-deconv (no positivity)": "n2v-deconv",
}
#: Masking of the N2V family (n2v, pn2v, n2v-deconv), as in the demo: 2 % of a patch's pixels.
N2V_MASK = {"masked_pixel_percentage": 2.0}
#: Positivity weight of the "with" rows (the "without" rows use 0).
POSITIVITY_LAMBDA = 1.0


# ---- data ----------------------------------------------------------------------------------
def _crop(img: np.ndarray, y: int, x: int, n: int) -> np.ndarray:
    return np.ascontiguousarray(img[y : y + n, x : x + n]).astype(np.float32)


def build_datasets(work: Path, sections: list[str], quick: bool, images: tuple[str, ...] = ("actin",)) -> list[dict[str, Any]]:
    """Write every dataset's noisy test/held-out images (OME-Zarr) and clean references (npy)."""
    data = data_dir()
    n = CROP
    out: list[dict[str, Any]] = []

    def save(name: str, section: str, clean_t, noisy_t, clean_h, noisy_h, **extra) -> dict[str, Any]:
        d = work / name.replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        write_ome_zarr_image(d / "noisy.ome.zarr", noisy_t.astype(np.float32), "yx", (n, n))
        np.save(d / "clean.npy", clean_t)
        np.save(d / "noisy.npy", noisy_t)
        np.save(d / "clean_heldout.npy", clean_h)
        np.save(d / "noisy_heldout.npy", noisy_h)
        for stale in d.glob("nm_*.json"):
            stale.unlink()
        ds = {"name": name, "section": section, "dir": str(d), "noisy": str(d / "noisy.ome.zarr"), **extra}
        out.append(ds)
        return ds

    actin, mito = read_bpae("actin"), read_bpae("mito")
    # Test crop in the cell-rich centre, held-out crop beside it (no overlap).
    cy, cx = centre_origin(actin.shape, n)
    hy, hx = cy, cx - n - 16
    if "sim" in sections:
        # denoiSplit-style levels: mean photon count of the clean crop, Gaussian std relative to its std.
        for img_name, img in (("actin", actin), ("mito", mito)):
            if img_name not in images:
                continue
            for level, (photons, g) in SIM_LEVELS.items():
                if quick and (img_name, level) != ("actin", "moderate"):
                    continue
                ct, ch = _crop(img, cy, cx, n), _crop(img, hy, hx, n)
                scale = photons / float(ct.mean())
                std = float(img.std())
                nt = poisson_gaussian(ct, scale, g, std, seed=0)
                nh = poisson_gaussian(ch, scale, g, std, seed=1)
                calib = np.stack([poisson_gaussian(ch, scale, g, std, seed=100 + k) for k in range(30)])
                ds = save(f"bpae-{img_name}/{level}", "sim", ct, nt, ch, nh, metric="psnr",
                          noise=f"Poisson {photons:g} photons/mean + Gaussian {g:g} x std")
                np.save(Path(ds["dir"]) / "calibration.npy", calib)
    if "w2s" in sections:
        fov = "fov081_ch1"
        noisy_full = read_tiff(data / "w2s" / "noisy" / f"{fov}.tif").astype(np.float32)
        clean_full = read_tiff(data / "w2s" / "clean" / f"{fov}.tif").astype(np.float32)
        # Test crop left of centre, held-out crop to its right (no overlap).
        ty, tx, hx2 = 160, 60, 60 + n + 16
        ct, nt = _crop(clean_full, ty, tx, n), _crop(noisy_full, ty, tx, n)
        ch, nh = _crop(clean_full, ty, hx2, n), _crop(noisy_full, ty, hx2, n)
        ds = save(f"w2s-{fov}", "w2s", ct, nt, ch, nh, metric="psnr_affine",
                  noise="real widefield camera noise (one frame vs 400-frame mean)")
        # The clean image is in another gain/offset than the noisy one; map it onto the noisy
        # units (least squares) so that the noise model's signal axis is in input units.
        np.save(Path(ds["dir"]) / "paired_signal.npy", affine_fit(ch, nh).astype(np.float32))
    if "photon" in sections:
        ct, ch = _crop(actin, cy, cx, n), _crop(actin, hy, hx, n)
        peak = float(np.percentile(ct, 99.9))
        for p in (5, 20, 100):
            if quick and p != 5:
                continue
            st, sh = ct / peak * p, ch / peak * p
            nt = poisson_gaussian(st, 1.0, None, 1.0, seed=0)
            nh = poisson_gaussian(sh, 1.0, None, 1.0, seed=1)
            save(f"photon-peak{p}", "photon", st, nt, sh, nh, metric="psnr",
                 noise=f"Poisson, peak (99.9th percentile) {p} photons, data in photons")
    if "deconv" in sections:
        ct = _crop(actin, cy, cx, n)
        for s in (0.5, 1.0, 1.5):
            if quick and s != 1.0:
                continue
            blurred = ndi.gaussian_filter(ct.astype(np.float64), s, mode="mirror").astype(np.float32)
            scale = 25.0 / float(blurred.mean())
            nt = poisson_gaussian(blurred, scale, 0.1, float(blurred.std()), seed=0)
            ds = save(f"deconv-psf{s:g}", "deconv", blurred, nt, blurred, nt, metric="psnr", psf_sigma=s,
                      noise="Gaussian PSF blur, then Poisson 25 photons/mean + Gaussian 0.1 x std")
            np.save(Path(ds["dir"]) / "sharp.npy", ct)
    return out


# ---- filters -------------------------------------------------------------------------------
def run_filters(ds: dict[str, Any], kinds: list[str], work: Path) -> list[dict[str, Any]]:
    """Tune each filter on the held-out crop, apply the best through the chunked pipeline."""
    d = Path(ds["dir"])
    ch, nh = np.load(d / "clean_heldout.npy"), np.load(d / "noisy_heldout.npy")
    ct = np.load(d / "clean.npy")
    rows = []
    for kind in kinds:
        grid = FILTER_GRID[kind]
        key = "sigma" if kind == "gaussian" else "size"
        tune = [psnr_db(filter_array(nh, kind, **{key: v}), ch, ds["metric"]) for v in grid]
        best = grid[int(np.argmax(tune))]
        t0 = time.perf_counter()
        pred = filter_output(ds["noisy"], d / f"{kind}.ome.zarr", kind, **{key: best})
        rows.append({"dataset": ds["name"], "row": kind, "seed": 0, "param": {key: best},
                     "seconds": time.perf_counter() - t0, **score(pred, ct, ds["metric"])})
    return rows


# ---- trained rows (run in worker processes) -------------------------------------------------
def _worker_init() -> None:
    single_thread()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)


def _train_predict(ds: dict[str, Any], row: str, seed: int, method_options: dict[str, Any],
                   budget: dict[str, Any], tag: str, inference: dict | None = None) -> tuple[dict[str, Any], Path]:
    d = Path(ds["dir"])
    model = d / f"{tag}_s{seed}.qs"
    out = d / f"{tag}_s{seed}.ome.zarr"
    opts = {"method": method_options["method"], "net": {"depth": budget["depth"], "filters": budget["filters"]}}
    opts.update({k: v for k, v in method_options.items() if k != "method"})
    steps = budget["steps"]
    trained = train(ds["noisy"], model, opts, budget_train_options(
        budget, steps, seed, val_every=min(100, max(steps // 3, 1)), checkpoint_every=max(steps // 3, 1)))
    t1 = time.perf_counter()
    predict_run(model, ds["noisy"], out, inference=inference)
    t2 = time.perf_counter()
    return {"dataset": ds["name"], "row": row, "seed": seed, "train_s": trained.seconds, "predict_s": t2 - t1}, out


def run_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    """One trained row for one seed (n2v also bootstraps pn2v-gmm from its own prediction)."""
    ds, row, seed, budget = task["ds"], task["row"], task["seed"], task["budget"]
    d = Path(ds["dir"])
    ct = np.load(d / "clean.npy")
    rows: list[dict[str, Any]] = []
    try:
        if row == "fit-noise-models":
            fit_calibrated_models(ds, task.get("kinds", ("histogram", "gmm")))
            return []
        if row == "n2v":
            res, out = _train_predict(ds, "n2v", seed, {"method": "n2v", **N2V_MASK}, budget, "n2v")
            pred = read_output(out)
            rows.append({**res, **score(pred, ct, ds["metric"])})
            if task.get("bootstrap"):
                noisy = np.load(d / "noisy.npy")
                s, x = pairs_from_prediction(pred, noisy)
                # The whole data range, as `noise-model bootstrap` gives it (clipping drops the brightest).
                nm = fit_gmm(s, x, n_gaussian=3, n_coeff=2, seed=seed, observed_range=(float(noisy.min()), float(noisy.max())))
                res, out = _train_predict(ds, "pn2v-gmm (bootstrapped)", seed,
                                          {"method": "pn2v", "noise_model": nm.to_dict(), **N2V_MASK}, budget, "pn2v_boot")
                rows.append({**res, **score(read_output(out), ct, ds["metric"])})
        elif row.startswith("pn2v"):
            nm_file = d / ("nm_histogram.json" if "histogram" in row else "nm_gmm.json")
            for _ in range(1800):  # written by the fit-noise-models task, submitted first
                if nm_file.exists():
                    break
                time.sleep(1)
            nm = load_noise_model(nm_file)
            tag = "pn2v_hist" if "histogram" in row else "pn2v_gmm"
            res, out = _train_predict(ds, row, seed, {"method": "pn2v", "noise_model": nm.to_dict(), **N2V_MASK}, budget, tag)
            rows.append({**res, **score(read_output(out), ct, ds["metric"])})
        elif row in ("bayes-poisson", "bayes-gauss"):
            res, out = _train_predict(ds, row, seed, {"method": row}, budget, row)
            rows.append({**res, **score(read_output(out), ct, ds["metric"])})
        elif row.startswith("n2v-deconv"):
            lam = 0.0 if "no positivity" in row else POSITIVITY_LAMBDA
            tag = "deconv_nopos" if lam == 0 else "deconv_pos"
            res, out = _train_predict(ds, row, seed, {"method": "n2v-deconv", "psf_sigma": [ds["psf_sigma"]],
                                                      "positivity_lambda": lam, **N2V_MASK}, budget, tag)
            # The denoised image (s convolved with the PSF) vs the noise-free blurred image, and
            # the deconvolved s vs the sharp crop.
            r = {**res, **score(read_output(out, "denoised"), ct, "psnr")}
            try:
                names = output_channels(out)
                other = [n for n in names if n != "denoised"]
                if other:
                    sharp = np.load(d / "sharp.npy")
                    r["deconvolved_psnr"] = score(read_output(out, other[0]), sharp, "psnr")["psnr"]
                    r["deconvolved_channel"] = other[0]
            except Exception as exc:  # the primary number is already in r
                r["deconvolved_error"] = str(exc)
            rows.append(r)
    except Exception as exc:
        rows.append({"dataset": ds["name"], "row": row, "seed": seed,
                     "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]})
    return rows


# ---- main ----------------------------------------------------------------------------------
#: Rows the issue's targets are stated on come first, all their seeds; then seed 0 of every
#: other row, then the other seeds: a run cut short (--max-minutes) still answers the targets.
TARGET_ROWS = {("sim", "n2v"), ("photon", "n2v"), ("photon", "bayes-poisson")}


def priority(task: dict[str, Any]) -> tuple:
    ds, row, seed = task["ds"], task["row"], task["seed"]
    if row == "fit-noise-models":
        return (-1, 0, 0, ds["name"], row)
    first_ds = ds["name"] in ("bpae-actin/moderate", "photon-peak5")
    if first_ds and (ds["section"], row) in TARGET_ROWS:
        tier = 0
    elif first_ds:
        tier = 1
    else:
        tier = 2 if seed == 0 else 3
    order = {"sim": 0, "photon": 1, "w2s": 2, "deconv": 3}
    return (tier, seed, order[ds["section"]], ds["name"], row)


def fit_calibrated_models(ds: dict[str, Any], kinds: tuple[str, ...] = ("histogram", "gmm")) -> None:
    d = Path(ds["dir"])
    if ds["section"] == "sim":
        s, x = pairs_from_calibration(np.load(d / "calibration.npy"))
    else:  # W2S: held-out noisy frame with its clean image mapped onto the noisy units
        s, x = np.load(d / "paired_signal.npy").ravel(), np.load(d / "noisy_heldout.npy").ravel()
    # Written under a temporary name and renamed: waiting tasks never read half a file.
    fits = {"histogram": lambda: fit_histogram(s, x, bins=256), "gmm": lambda: fit_gmm(s, x, n_gaussian=3, n_coeff=2, seed=0)}
    for kind in kinds:
        name, model = f"nm_{kind}.json", fits[kind]()
        model.save(d / f"tmp_{name}")
        (d / f"tmp_{name}").replace(d / name)


def summarise(results: list[dict[str, Any]], datasets: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        for r in [r for r in results if r["dataset"] == ds["name"] and "error" not in r and "skipped" not in r]:
            cell = table.setdefault(ds["name"], {}).setdefault(r["row"], {"psnr": [], "ssim": [], "ri_psnr": [], "extra": {}})
            for m in ("psnr", "ssim", "ri_psnr"):
                cell[m].append(r[m])
            if "param" in r:
                cell["extra"]["param"] = r["param"]
            if "deconvolved_psnr" in r:
                cell["extra"].setdefault("deconvolved_psnr", []).append(r["deconvolved_psnr"])
    out: dict[str, Any] = {}
    for name, rows in table.items():
        out[name] = {}
        for row, cell in rows.items():
            entry = {"n": len(cell["psnr"])}
            for m in ("psnr", "ssim", "ri_psnr"):
                mean, sem = mean_and_sem(cell[m])
                entry[m] = {"mean": mean, "sem": sem}
            for k, v in cell["extra"].items():
                entry[k] = {"mean": mean_and_sem(v)[0], "sem": mean_and_sem(v)[1]} if isinstance(v, list) else v
            out[name][row] = entry
    return out


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured margin and pass/fail."""
    checks = []

    def m(ds: str, row: str) -> float | None:
        return summary.get(ds, {}).get(row, {}).get("psnr", {}).get("mean")

    for ds in summary:
        n2v = m(ds, "n2v")
        boot = m(ds, "pn2v-gmm (bootstrapped)")
        if n2v is not None and boot is not None:
            checks.append({"target": "pn2v-gmm (bootstrapped) >= n2v + 0.5 dB", "dataset": ds,
                           "margin_db": boot - n2v, "pass": boot >= n2v + 0.5})
        filt = {k: m(ds, k) for k in ("box", "gaussian", "median") if m(ds, k) is not None}
        if n2v is not None and filt:
            best = max(filt, key=filt.get)
            checks.append({"target": "n2v above every classic filter", "dataset": ds,
                           "margin_db": n2v - filt[best], "best_filter": best, "pass": n2v > filt[best]})
    photon = sorted((k for k in summary if k.startswith("photon-peak")), key=lambda k: int(k.split("peak")[1]))
    if photon:
        ds = photon[0]
        n2v, bp = m(ds, "n2v"), m(ds, "bayes-poisson")
        if n2v is not None and bp is not None:
            checks.append({"target": "bayes-poisson >= n2v + 1 dB at the lowest photon count", "dataset": ds,
                           "margin_db": bp - n2v, "pass": bp >= n2v + 1.0})
    return checks


def render(summary: dict[str, Any], datasets: list[dict[str, Any]], report: dict[str, Any]) -> str:
    lines = []
    for ds in datasets:
        rows = summary.get(ds["name"], {})
        if not rows:
            continue
        metric = "PSNR after affine fit (dB)" if ds["metric"] == "psnr_affine" else "PSNR (dB)"
        lines.append(f"\n### {ds['name']} — {ds['noise']}\n")
        order = {"sim": SIM_ROWS, "w2s": SIM_ROWS, "photon": PHOTON_ROWS, "deconv": DECONV_ROWS}[ds["section"]]
        body = []
        for row in order:
            if row in rows:
                e = rows[row]
                note = f"{e['param']}" if "param" in e else (f"n={e['n']}" if row != "noisy" else "")
                if "deconvolved_psnr" in e:
                    note += f"; deconvolved vs sharp {fmt_mean_sem(e['deconvolved_psnr']['mean'], e['deconvolved_psnr']['sem'])} dB"
                body.append([row, fmt_mean_sem(e["psnr"]["mean"], e["psnr"]["sem"]),
                             fmt_mean_sem(e["ri_psnr"]["mean"], e["ri_psnr"]["sem"]),
                             fmt_mean_sem(e["ssim"]["mean"], e["ssim"]["sem"], 3), note])
            else:
                why = report["skipped"].get(f"{ds['name']}|{row}") or report["skipped"].get(row) or "not run"
                body.append([row, "–", "–", "–", why])
        lines.append(markdown_table(["row", metric, "RI-PSNR (dB)", "SSIM", "note"], body))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny budget, fewer datasets (smoke test)")
    ap.add_argument("--only", default=None, help="comma-separated rows to run (e.g. n2v,gaussian,bayes-poisson)")
    ap.add_argument("--sections", default="sim,w2s,photon,deconv")
    ap.add_argument("--images", default="actin", help="BPAE stains of the sim section (actin,mito)")
    ap.add_argument("--datasets", default=None, help="comma-separated dataset names to keep (e.g. photon-peak5)")
    ap.add_argument("--jobs", type=int, default=2, help="trained rows run in parallel (1 torch thread each)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=45.0, help="cancel tasks not started by then")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/quietscope-bench-quality")
    ap.add_argument("--output", default=str(RESULTS / "quality.json"))
    ap.add_argument("--markdown", default=None, help="also write the tables (markdown) to this file")
    ap.add_argument("--from-json", default=None, help="only print the tables of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        rep = json.loads(Path(args.from_json).read_text())
        rep["summary"] = summarise(rep["results"], rep["datasets"])
        text = render(rep["summary"], rep["datasets"], rep)
        print(text)
        for c in check_targets(rep["summary"]):
            print(f"  [{'PASS' if c['pass'] else 'MISS'}] {c['target']} on {c['dataset']}: margin {c['margin_db']:+.2f} dB")
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "quietscope", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    single_thread()
    budget = dict(QUICK_BUDGET if args.quick else FULL_BUDGET)
    if args.seeds:
        budget["seeds"] = args.seeds
    if args.steps:
        budget["steps"] = args.steps
    only = set(args.only.split(",")) if args.only else None
    sections = args.sections.split(",")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    datasets = build_datasets(work, sections, args.quick, tuple(args.images.split(",")))
    if args.datasets:
        datasets = [ds for ds in datasets if ds["name"] in args.datasets.split(",")]
    registered = set(available_methods())
    report: dict[str, Any] = {"machine": machine(), "budget": budget, "crop": CROP, "filter_grid": FILTER_GRID,
                              "registered_methods": sorted(registered), "datasets": datasets, "skipped": {},
                              "results": []}
    log.info("datasets: %s; registered methods: %s", [d["name"] for d in datasets], sorted(registered))

    def wanted(row: str) -> bool:
        return only is None or row in only

    results: list[dict[str, Any]] = []
    # Untrained rows first (seconds).
    for ds in datasets:
        ct, nt = np.load(Path(ds["dir"]) / "clean.npy"), np.load(Path(ds["dir"]) / "noisy.npy")
        if wanted("noisy"):
            results.append({"dataset": ds["name"], "row": "noisy", "seed": 0, **score(nt, ct, ds["metric"])})
        kinds = {"sim": ["box", "gaussian", "median"], "w2s": ["box", "gaussian", "median"], "photon": ["gaussian"]}.get(ds["section"], [])
        results += run_filters(ds, [k for k in kinds if wanted(k)], work)
    # Trained rows.
    tasks = []
    for ds in datasets:
        rows = {"sim": SIM_ROWS, "w2s": SIM_ROWS, "photon": PHOTON_ROWS, "deconv": DECONV_ROWS}[ds["section"]]
        trained = [r for r in rows if r in ROW_METHOD and wanted(r)]
        for r in trained:
            if ROW_METHOD[r] not in registered:
                report["skipped"][r] = f"method {ROW_METHOD[r]!r} not registered"
        if any(r.startswith("pn2v") and "bootstrapped" not in r for r in trained) and "pn2v" in registered:
            # Fitted in a worker (a minute or more): the other rows need not wait for it.
            kinds = tuple(k for k in ("histogram", "gmm") if f"pn2v-{k} (calibrated)" in trained)
            tasks.append({"ds": ds, "row": "fit-noise-models", "seed": -1, "budget": budget, "kinds": kinds})
        boot = "pn2v-gmm (bootstrapped)" in trained and "pn2v" in registered
        for seed in range(budget["seeds"]):
            for r in trained:
                if ROW_METHOD[r] not in registered or r == "pn2v-gmm (bootstrapped)":
                    continue
                tasks.append({"ds": ds, "row": r, "seed": seed, "budget": budget, "bootstrap": boot and r == "n2v"})
            if boot and "n2v" not in trained:
                tasks.append({"ds": ds, "row": "n2v", "seed": seed, "budget": budget, "bootstrap": True})
    log.info("%d training tasks on %d process(es)", len(tasks), args.jobs)

    def save() -> None:
        report["results"] = results
        report["summary"] = summarise(results, datasets)
        report["targets"] = check_targets(report["summary"])
        report["wall_seconds"] = time.perf_counter() - t_start
        write_json(args.output, report)

    save()
    # Heavier tasks first so the last minutes are not one long task alone.
    tasks.sort(key=priority)
    # Spawned processes (the parent already ran dask clients, whose threads a fork can deadlock).
    def cut_short(n_cancelled: int) -> None:
        # Out of time: keep what is done (rows then show n < seeds) rather than nothing.
        report["cut_short"] = f"stopped after {args.max_minutes} min; {n_cancelled} queued task(s) cancelled"
        log.warning(report["cut_short"])

    def finished(k: int, rows: list[dict[str, Any]]) -> None:
        results.extend(rows)
        for r in rows:
            if "error" in r:
                log.warning("%s %s seed %d failed: %s", r["dataset"], r["row"], r["seed"], r["error"])
            else:
                log.info("[%d/%d] %s %s seed %d: PSNR %.2f dB (train %.0f s)", k, len(tasks), r["dataset"],
                         r["row"], r["seed"], r["psnr"], r.get("train_s", 0))
        save()

    run_in_processes(run_task, tasks, args.jobs, initializer=_worker_init, echo=False, on_rows=finished,
                     stop_at=t_start + args.max_minutes * 60, on_stop=cut_short)
    save()
    text = render(report["summary"], datasets, report)
    print(text)
    print("\nTargets:")
    for c in report["targets"]:
        print(f"  [{'PASS' if c['pass'] else 'MISS'}] {c['target']} on {c['dataset']}: margin {c['margin_db']:+.2f} dB")
    print(f"\nwall time {report['wall_seconds']:.0f} s; results in {args.output}")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
