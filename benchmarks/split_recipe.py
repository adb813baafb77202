"""The documented denoiSplit recipe, run as a user runs it: the ``quietscope`` command line.

``benchmarks/split.py --curve`` trains the ladder VAE step by step inside the benchmark, to
record learning curves. This script checks what a user gets from ``docs/methods/denoisplit.md``'s
workflow instead, each step a ``quietscope`` subprocess:

1. ``quietscope train CH.tif --method n2v`` per noisy channel, then
   ``quietscope noise-model bootstrap`` (a GMM per channel from the N2V prediction; no clean data);
2. ``quietscope train mito.tif --channels actin.tif --method denoisplit --param noise_models=[...]``
   with the method's recommended defaults (plus any ``--train-args``);
3. ``quietscope predict`` of the superimposed test field with ``--samples 8``;
4. the prediction scored against the clean stains: output-output correlation, own/other
   correlation, RI-PSNR and the "separated" verdict of ``benchmarks/split.py``.

Data: W2S mito + actin (``benchmarks/split.py``'s ``w2s_mito_actin`` pair): the clean 400-frame
means of fields 081-087 side by side (512 x 3584) as training channels, field 089 as the test,
Poisson-Gaussian noise of the chosen level (same seeds as ``split.py``). Each subprocess runs one
torch thread (``OMP_NUM_THREADS=1``); CPU seconds are the children's user + system time.

Run: ``python -m benchmarks.split_recipe --level moderate [--steps N] [--n2v-steps M]
[--train-args "--filters 32 --param latent_channels=16"] [--out split_recipe_moderate.json]
[--figure denoisplit_recipe_moderate.png]`` (``--figure``: a crop of the test field, written
under ``docs/images/``).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import SPLIT_LEVELS as LEVELS
from benchmarks.harness import machine, split_noisy
from benchmarks.harness import split_pair_regions as pair_regions
from benchmarks.harness import split_separation as split_metrics

ROOT = Path(__file__).resolve().parents[1]
PAIR = "w2s_mito_actin"
NAMES = ("mito", "actin")


def child_cpu_s() -> float:
    """User + system CPU seconds of all finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def quietscope(*args: str, log: list[dict]) -> None:
    """Run one ``quietscope`` command (one torch thread); record its wall and CPU seconds."""
    exe = Path(sys.executable).with_name("quietscope")
    cmd = [str(exe), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0, c0 = time.perf_counter(), child_cpu_s()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    entry = {"command": "quietscope " + shlex.join(args), "wall_s": round(time.perf_counter() - t0, 1),
             "cpu_s": round(child_cpu_s() - c0, 1), "rc": proc.returncode}
    log.append(entry)
    print(f"[{entry['wall_s']:>7.1f} s] {entry['command']}", flush=True)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {entry['command']}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    # What the user reads in the log: the recommendations applied, the running output-output
    # correlation on the validation patches, the weights kept.
    keys = ("recommended default", "corr_outputs", "keep")
    entry["log"] = [ln[24:] for ln in proc.stderr.splitlines() if any(k in ln for k in keys)][-60:]


def figure(inp: np.ndarray, pred: np.ndarray, gt: np.ndarray, path: Path, title: str) -> None:
    """Crop of the test field, a row per structure: the superimposed input, the output, its
    posterior std and the clean stain (each panel stretched to its own 0.5-99.5th percentiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sl = (slice(128, 384), slice(128, 384))
    rows = [[("noisy input (sum)", inp, "gray"), (f"denoiSplit {n}", pred[c], "magma"), (f"std {n}", pred[2 + c], "viridis"),
             (f"clean {n}", gt[c], "magma")] for c, n in enumerate(NAMES)]
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.4), dpi=100)
    for ax_row, row in zip(axes, rows):
        for ax, (name, img, cmap) in zip(ax_row, row):
            ax.axis("off")
            lo, hi = np.percentile(img[sl], [0.5, 99.5])
            ax.imshow(img[sl], cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    import tifffile

    def arg(name: str, default):
        return type(default)(argv[argv.index(name) + 1]) if name in argv else default

    level = arg("--level", "moderate")
    (pscale, grel), = [(p, g) for n, p, g in LEVELS if n == level]
    n2v_steps = arg("--n2v-steps", 600)
    steps = arg("--steps", 0)  # 0: the recommended default
    extra = shlex.split(arg("--train-args", ""))
    out_path = ROOT / "benchmarks" / "results" / arg("--out", f"split_recipe_{level}.json")
    clean, regions = pair_regions(PAIR)
    noisy = split_noisy(clean, pscale, grel).astype(np.float32)
    tr, te = noisy[(slice(None),) + regions["train"]], noisy[(slice(None),) + regions["test"]]
    gt_te = clean[(slice(None),) + regions["test"]]
    log: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qs-split-recipe-") as tmp:
        w = Path(tmp)
        files = []
        for name, ch in zip(NAMES, tr):
            f = w / f"{name}.tif"
            tifffile.imwrite(f, ch)
            files.append(f)
        tifffile.imwrite(w / "test_sum.tif", te.sum(0))
        nms = []
        for name, f in zip(NAMES, files):
            quietscope("train", str(f), "--method", "n2v", "--steps", str(n2v_steps), "--device", "cpu",
                       "-o", str(w / f"n2v_{name}.qs"), log=log)
            quietscope("noise-model", "bootstrap", str(w / f"n2v_{name}.qs"), str(f), "-o", str(w / f"nm_{name}.json"),
                       "--device", "cpu", "--threads", "1", "--no-progress", log=log)
            nms.append(str(w / f"nm_{name}.json"))
        train_args = ["train", str(files[0]), "--channels", str(files[1]), "--method", "denoisplit",
                      "--param", f"noise_models={json.dumps(nms)}", "--device", "cpu", "-o", str(w / "split.qs"), *extra]
        if steps:
            train_args += ["--steps", str(steps)]
        quietscope(*train_args, log=log)
        quietscope("predict", str(w / "split.qs"), str(w / "test_sum.tif"), "-o", str(w / "split.ome.zarr"),
                   "--samples", "8", "--device", "cpu", "--threads", "1", "--no-progress", log=log)
        from quietscope.io import open_image

        pred = np.asarray(open_image(str(w / "split.ome.zarr")).data, dtype=np.float32)
        pred = pred.reshape(-1, *pred.shape[-2:])
        manifest = subprocess.run([str(Path(sys.executable).with_name("quietscope")), "info", str(w / "split.qs")],
                                  capture_output=True, text=True).stdout
    metrics = split_metrics(pred[:2], gt_te)
    if "--figure" in argv:
        figure(te.sum(0), pred, gt_te, ROOT / "docs" / "images" / arg("--figure", ""),
               f"W2S field 089, {level} noise: out-out {metrics['corr_outputs']} (stains {metrics['corr_stains']}), "
               f"RI-PSNR {metrics['ri_psnr'][0]} / {metrics['ri_psnr'][1]} dB")
    result = {"machine": machine(), "pair": PAIR, "level": level, "noise": {"poisson_scale": pscale, "gauss_rel": grel},
              "n2v_steps": n2v_steps, "train_args": extra, "steps": steps or "recommended", "commands": log,
              "cpu_minutes_total": round(sum(e["cpu_s"] for e in log) / 60, 1), "kept": metrics, "model_info": manifest[-3000:]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"{PAIR} {level}: out-out {metrics['corr_outputs']} (stains {metrics['corr_stains']}), own {metrics['corr_own']}, "
          f"other {metrics['corr_other']}, RI-PSNR {metrics['ri_psnr']}, separated {metrics['separated']}; "
          f"{result['cpu_minutes_total']} CPU min -> {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
