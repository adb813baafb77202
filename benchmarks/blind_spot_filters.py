"""The blind-spot penalty of a classic filter: what ignoring the centre pixel costs.

    .venv/bin/python -m benchmarks.blind_spot_filters [--workdir /tmp/quietscope-bench-quality]

N2V never sees the pixel it predicts during training, so on each dataset it competes with the
classic filters from a handicap: a box or Gaussian filter *does* average the centre pixel in.
This script measures that handicap without training anything. For each dataset that
``benchmarks.quality`` left in ``--workdir`` (clean/noisy test and held-out crops), it tunes
box (3-9) and Gaussian (sigma 0.5-3) filters on the held-out crop, once as they are and once with
the centre weight set to zero and the kernel renormalised (a linear blind-spot estimator), and
reports the test-crop PSNR of the best of each. The difference is the part of "N2V above every
classic filter" that a blind-spot method has to win back by being non-linear.

Writes ``benchmarks/results/blind_spot_filters.json`` and prints a markdown table. Seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import convolve

from benchmarks.harness import RESULTS, machine, markdown_table, psnr_db, write_json

GAUSS = [0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0]
BOX = [3, 5, 7, 9]


def gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    k = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / k.sum()


def blind(kernel: np.ndarray) -> np.ndarray:
    """The same kernel with the centre weight removed and the rest renormalised."""
    k = kernel.copy()
    c = k.shape[0] // 2
    k[c, c] = 0.0
    return k / k.sum()


def best_filter(noisy_h, clean_h, noisy_t, clean_t, blind_spot: bool, affine: bool) -> dict:
    metric = "psnr_affine" if affine else "psnr"

    def score(pred, clean):
        return psnr_db(pred, clean, metric)

    candidates = [("gaussian", s, gaussian_kernel(s)) for s in GAUSS] + [("box", n, np.ones((n, n)) / n**2) for n in BOX]
    tuned = []
    for kind, param, k in candidates:
        k = blind(k) if blind_spot else k
        tuned.append((score(convolve(noisy_h, k, mode="reflect"), clean_h), kind, param, k))
    _, kind, param, k = max(tuned, key=lambda t: t[0])
    return {"filter": kind, "param": param, "psnr": score(convolve(noisy_t, k, mode="reflect"), clean_t)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/quietscope-bench-quality", help="quality.py's --workdir")
    ap.add_argument("--output", default=str(RESULTS / "blind_spot_filters.json"))
    args = ap.parse_args(argv)
    dirs = sorted(p for p in Path(args.workdir).iterdir() if (p / "clean_heldout.npy").exists()) if Path(args.workdir).exists() else []
    if not dirs:
        print(f"no datasets in {args.workdir}: run python -m benchmarks.quality first", file=sys.stderr)
        return 2
    rows, report = [], {"machine": machine(), "workdir": args.workdir, "datasets": {}}
    for d in dirs:
        if not (d / "noisy_heldout.npy").exists() or d.name.startswith("deconv"):
            continue
        arrays = [np.load(d / f).astype(np.float64) for f in ("noisy_heldout.npy", "clean_heldout.npy", "noisy.npy", "clean.npy")]
        affine = d.name.startswith("w2s")  # the W2S clean image is in other units (quality.py scores it the same way)
        full = best_filter(*arrays, blind_spot=False, affine=affine)
        bs = best_filter(*arrays, blind_spot=True, affine=affine)
        report["datasets"][d.name] = {"filter": full, "blind_spot_filter": bs, "penalty_db": full["psnr"] - bs["psnr"]}
        rows.append([d.name, f"{full['psnr']:.2f} ({full['filter']} {full['param']})",
                     f"{bs['psnr']:.2f} ({bs['filter']} {bs['param']})", f"{full['psnr'] - bs['psnr']:+.2f}"])
    table = markdown_table(["dataset", "best filter (dB)", "best blind-spot filter (dB)", "blind-spot penalty"], rows)
    print(table)
    report["table"] = table
    write_json(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
