"""Splitting benchmark: denoiSplit vs μSplit vs sequential (N2V, then μSplit) on BPAE actin + mito.

Task (synthetic superposition of real high-SNR images, as in the denoiSplit paper): the two clean
BPAE stains are rescaled to a common range (1st–99.5th percentile -> 0–1000), noised separately
with Poisson + Gaussian noise at two levels (:func:`quietscope.simulate.poisson_gaussian`), and
the methods train on the two noisy single-structure images of the training field (columns
0–512). They are tested on the noisy *sum* of a held-out field (rows 0–256, columns 832–1088);
the std maps are calibrated on another held-out field (rows 256–512, same columns).

* denoiSplit: GMM noise models bootstrapped from N2V predictions of each noisy training channel
  (no clean data anywhere in training).
* μSplit: the same ladder VAE with a Gaussian likelihood and pixel-averaged KL, on noisy targets.
* sequential: N2V per training channel, μSplit trained on the denoised channels; at test time
  the superimposed input is first denoised by an N2V trained on the noisy training sums.

The calibration is fitted on the calibration field and its error (ENCE) is reported on the test
field, before and after. Chunked-vs-whole differences are measured on the high-noise level.

Metrics: range-invariant PSNR (denoiSplit/CAREamics definition) and SSIM per channel against the
clean test field. Sized for ≤ 25 min on a shared 2-core CPU: 64² patches, batch 8, a few hundred
steps, small networks, so absolute numbers are far below the paper's (days of GPU training).

Run: ``python -m benchmarks.split`` (writes benchmarks/results/split.json and docs/images/), or
the two levels in parallel, one thread each (how the stored results were made, ~17 min):
``QS_THREADS=1 python -m benchmarks.split --level moderate & QS_THREADS=1 python -m
benchmarks.split --level high; wait; python -m benchmarks.split --merge``.
``--musplit-fixed-var`` adds a μSplit row with a fixed-variance Gaussian likelihood.
``--steps N [--n2v-steps M]`` trains longer and writes ``split_stepsN[_LEVEL].json`` (pictures in
``benchmarks/results/split_stepsN_images/``), leaving the default run's files alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The task (fields, data, net, training options) and its train/predict/score helpers are shared
# with split_probe.py: they live in the harness, under split.py's old names.
from benchmarks.harness import SPLIT_CALIB as CALIB
from benchmarks.harness import SPLIT_DATA as DATA
from benchmarks.harness import SPLIT_NET, write_tif
from benchmarks.harness import SPLIT_TEST as TEST
from benchmarks.harness import SPLIT_TRAIN as TRAIN
from benchmarks.harness import split_clean as load_clean
from benchmarks.harness import split_predict as run_predict
from benchmarks.harness import split_scores as scores
from benchmarks.harness import split_train as train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "split.json"
IMAGES = ROOT / "docs" / "images"

#: (name, photons per intensity unit, Gaussian std relative to the clean channel's std)
LEVELS = [("moderate", 0.05, 0.1), ("high", 0.01, 0.25)]
SPLIT_STEPS = 250
N2V_STEPS = 150
log = logging.getLogger("split-bench")


def bootstrap_noise_model(pred: np.ndarray, noisy: np.ndarray, path: Path) -> str:
    from quietscope.noise_models import fit_gmm, pairs_from_prediction

    s, x = pairs_from_prediction(pred, noisy)
    fit_gmm(s, x, n_gaussian=3, n_coeff=2, n_iterations=1000, seed=0).save(path)
    return str(path)


def run_level(name: str, pscale: float, grel: float, clean: np.ndarray, work: Path) -> dict:
    from quietscope.simulate import poisson_gaussian

    t0 = time.perf_counter()
    w = work / name
    w.mkdir()
    noisy = np.stack([poisson_gaussian(c, pscale, grel, float(c.std()), seed=11 + i) for i, c in enumerate(clean)])
    tr, te, ca = (noisy[(slice(None),) + r] for r in (TRAIN, TEST, CALIB))
    gt_te, gt_ca = clean[(slice(None),) + TEST], clean[(slice(None),) + CALIB]
    ch_files = [write_tif(w / f"train_ch{i}.tif", tr[i]) for i in range(2)]
    sum_train = write_tif(w / "train_sum.tif", tr.sum(0))
    test_in = write_tif(w / "test_sum.tif", te.sum(0))
    calib_in = write_tif(w / "calib_sum.tif", ca.sum(0))
    timing: dict[str, float] = {}

    # N2V per channel (sequential baseline; its predictions also bootstrap the noise models).
    n2v = {"method": "n2v", "net": {"depth": 2, "filters": 16}}
    den_files, nm_files = [], []
    for i, f in enumerate(ch_files):
        m = w / f"n2v_ch{i}.qs"
        timing[f"n2v_ch{i}"] = train(f, m, n2v, N2V_STEPS)
        den = run_predict(str(m), f, w / f"n2v_ch{i}.ome.zarr")[0]
        den_files.append(write_tif(w / f"den_ch{i}.tif", den))
        nm_files.append(bootstrap_noise_model(den, tr[i], w / f"nm_ch{i}.json"))
    m_sum = w / "n2v_sum.qs"
    timing["n2v_sum"] = train(sum_train, m_sum, n2v, N2V_STEPS)
    test_den = write_tif(w / "test_sum_n2v.tif", run_predict(str(m_sum), test_in, w / "test_n2v.ome.zarr")[0])

    models = {
        "denoisplit": (ch_files, {"method": "denoisplit", "noise_models": nm_files, **SPLIT_NET}, test_in),
        "musplit": (ch_files, {"method": "musplit", **SPLIT_NET}, test_in),
        "sequential": (den_files, {"method": "musplit", **SPLIT_NET}, test_den),
    }
    if "--musplit-fixed-var" in sys.argv:  # μSplit with a fixed-variance Gaussian (see split_probe.py)
        models["musplit_fixedvar"] = (ch_files, {"method": "musplit", "gaussian_logvar": 0.0, **SPLIT_NET}, test_in)
    res: dict = {"noise": {"poisson_scale": pscale, "gauss_rel": grel}, "methods": {}}
    preds = {}
    for key, (inputs, opts, tin) in models.items():
        m = w / f"{key}.qs"
        timing[key] = train(inputs, m, opts, SPLIT_STEPS)
        out = run_predict(str(m), tin, w / f"{key}_test.ome.zarr", inference={"n_samples": 8})
        preds[key] = out
        res["methods"][key] = scores(out[:2], gt_te)
        log.info("%s %s: %s", name, key, res["methods"][key])

    # Calibration of denoiSplit's std: fit on the calibration field, check on the test field.
    from quietscope.workflows.calibrate import calibrate_arrays, ence, plot_calibration

    out_ca = run_predict(str(w / "denoisplit.qs"), calib_in, w / "calib.ome.zarr", inference={"n_samples": 8})
    cal = calibrate_arrays(out_ca[:2], out_ca[2:4], gt_ca, n_bins=20, names=["actin", "mito"])
    check = calibrate_arrays(preds["denoisplit"][:2], preds["denoisplit"][2:4], gt_te, n_bins=20)
    test_ence_after = []
    for c, ch in enumerate(cal.channels):
        rmv = np.asarray(check.channels[c].rmv)
        test_ence_after.append(round(ence(np.maximum(ch.scale * rmv + ch.offset, 1e-12), check.channels[c].rmse), 3))
    res["calibration"] = {
        "slope": [round(c.scale, 3) for c in cal.channels],
        "offset": [round(c.offset, 3) for c in cal.channels],
        "ence_uncalibrated_test": [round(c.ence_before, 3) for c in check.channels],
        "ence_calibrated_test": test_ence_after,
    }
    plot_calibration(cal, IMAGES / f"denoisplit_calibration_{name}.png", f"denoiSplit std calibration ({name} noise)")

    # Seams: chunked (128² blocks) vs one block, posterior-mean path and seeded sampling.
    seam = {}
    for label, n in (("mean_path", 0), ("sampled_8", 8)) if name == "high" else ():
        whole = run_predict(str(w / "denoisplit.qs"), test_in, w / "whole.ome.zarr", chunks=(64, 64), block=(256, 256), inference={"n_samples": n})
        tiled = run_predict(str(w / "denoisplit.qs"), test_in, w / "tiled.ome.zarr", chunks=(64, 64), block=(128, 128), inference={"n_samples": n})
        d = np.abs(whole[:2] - tiled[:2])
        seam[label] = {"max_abs_diff": float(d.max()), "rms_diff": float(np.sqrt((d**2).mean())),
                       "mean_pred_std": float(whole[2:4].mean()) if n else 0.0}
    res["chunked_vs_whole"] = seam
    res["train_seconds"] = {k: round(v, 1) for k, v in timing.items()}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if name == "high":
        figures(te.sum(0), preds["denoisplit"], preds["musplit"], gt_te)
    return res


def figures(inp: np.ndarray, ds: np.ndarray, mu: np.ndarray, gt: np.ndarray) -> None:
    """Input, the two predictions, std maps and ground truth of the test field (a 256² crop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sl = (slice(None), slice(None))
    panels = [("noisy input (sum)", inp[sl], "gray")]
    for c, nm in enumerate(("actin", "mito")):
        panels += [(f"denoiSplit {nm}", ds[c][sl], "magma"), (f"μSplit {nm}", mu[c][sl], "magma"),
                   (f"denoiSplit {nm} std", ds[2 + c][sl], "viridis"), (f"clean {nm}", gt[c][sl], "magma")]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), dpi=100)
    order = [0, 1, 5, 4, 8, 2, 6, 3, 7]
    for ax, k in zip(axes.ravel(), order):
        title, img, cmap = panels[k]
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(IMAGES / "denoisplit_example.png")
    plt.close(fig)


def main() -> int:
    import os

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("distributed", "quietscope.chunked", "quietscope.runner"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not DATA.exists():
        print(f"skipping: {DATA} not found (see ../shared/data/README.md)")
        return 0
    import torch

    global SPLIT_STEPS, N2V_STEPS, RESULTS, LEVELS, IMAGES
    if "--steps" in sys.argv:  # a longer budget: its own result file and pictures beside it
        SPLIT_STEPS = int(sys.argv[sys.argv.index("--steps") + 1])
        N2V_STEPS = int(sys.argv[sys.argv.index("--n2v-steps") + 1]) if "--n2v-steps" in sys.argv else N2V_STEPS
        RESULTS = RESULTS.with_name(f"split_steps{SPLIT_STEPS}.json")
        IMAGES = RESULTS.parent / f"split_steps{SPLIT_STEPS}_images"
    if "--smoke" in sys.argv:  # a seconds-long run of every code path; results not kept
        SPLIT_STEPS, N2V_STEPS, LEVELS = 3, 3, LEVELS[-1:]
        RESULTS = Path(tempfile.mkdtemp()) / "split.json"
    if "--merge" in sys.argv:  # combine the per-level files of parallel '--level NAME' runs
        parts = [json.loads(RESULTS.with_name(f"{RESULTS.stem}_{n}.json").read_text()) for n, _, _ in LEVELS]
        merged = {**parts[0], "levels": {k: v for p in parts for k, v in p["levels"].items()},
                  "total_seconds": max(p["total_seconds"] for p in parts)}
        RESULTS.write_text(json.dumps(merged, indent=2))
        return 0
    if "--level" in sys.argv:  # one level only (run the levels as parallel processes)
        want = sys.argv[sys.argv.index("--level") + 1]
        LEVELS = [lv for lv in LEVELS if lv[0] == want]
        RESULTS = RESULTS.with_name(f"{RESULTS.stem}_{want}.json")
    torch.set_num_threads(int(os.environ.get("QS_THREADS", "2")))
    IMAGES.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    clean = load_clean()
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None  # keep models/outputs there
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="qs-split-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = {
        "task": "BPAE actin + mito (rescaled 0-1000), superimposed; train rows 0-680 x cols 0-512, "
                "test rows 0-256 x cols 832-1088, calibration rows 256-512 x cols 832-1088",
        "metric": "range-invariant PSNR (dB) and SSIM per channel [actin, mito] vs clean test field",
        "budget": f"{SPLIT_STEPS} steps (splitting), {N2V_STEPS} (N2V), patch 64, batch 8, "
                  f"{torch.get_num_threads()} torch thread(s) per process on a shared 2-core CPU",
        "levels": {},
    }
    try:
        for name, ps, gr in LEVELS:
            out["levels"][name] = run_level(name, ps, gr, clean, work)
            out["total_seconds"] = round(time.perf_counter() - t0, 1)
            RESULTS.write_text(json.dumps(out, indent=2))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
