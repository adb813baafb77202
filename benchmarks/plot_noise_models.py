"""Noise-model figures of docs/methods/pn2v.md, made by quietscope itself on real data.

* ``pn2v_w2s_gmm.png`` / ``pn2v_w2s_histogram.png``: W2S widefield (Zhou et al. 2020), channel 0 of
  fields of view 081-090, noisy frame vs the 400-frame mean (``noise-model fit --pairs``). W2S
  images were contrast-stretched one by one (noisy ~ 0.6 clean + 12), so each clean image is
  first mapped onto its noisy image's scale by a least-squares affine fit.
* ``pn2v_convallaria_bootstrap.png``: Convallaria (PN2V's data), frame 0: N2V trained on the
  frame, then ``noise-model bootstrap`` (no calibration data, no clean image).

Usage: ``python -m benchmarks.plot_noise_models [--steps 300] [--out docs/images]``. Needs
``/work/shared/data`` (``quietscope.io.sample_data.find_data_dir``). Budget: about 3-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.harness import find_data_dir, predict_options, train
from quietscope.workflows.noise_model import bootstrap, fit_from_pairs


def w2s_stacks(data: Path, work: Path) -> tuple[Path, Path]:
    """Noisy and affinely rescaled clean stacks (t = field of view) as TIFFs."""
    noisy, clean = [], []
    for fov in range(81, 91):
        x = tifffile.imread(data / "w2s" / "noisy" / f"fov{fov:03d}_ch0.tif").astype(np.float32)
        s = tifffile.imread(data / "w2s" / "clean" / f"fov{fov:03d}_ch0.tif").astype(np.float32)
        ok = (x > 0) & (x < 255)  # clipped pixels would bias the fit
        a, b = np.polyfit(s[ok], x[ok], 1)
        noisy.append(x)
        clean.append((a * s + b).astype(np.float32))
    pn, pc = work / "w2s_noisy.tif", work / "w2s_clean.tif"
    tifffile.imwrite(pn, np.stack(noisy), imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(pc, np.stack(clean), imagej=True, metadata={"axes": "TYX"})
    return pn, pc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images", type=Path)
    ap.add_argument("--steps", default=300, type=int, help="N2V training steps on Convallaria")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = find_data_dir()
    if data is None:
        raise SystemExit("real data not found (see quietscope.io.sample_data.find_data_dir); nothing to plot")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        noisy, clean = w2s_stacks(data, work)
        for kind in ("gmm", "histogram"):
            model = fit_from_pairs(noisy, clean, kind, plot_path=args.out / f"pn2v_w2s_{kind}.png")
            _, std = model.mean_std(np.array([20.0, 60.0, 120.0]))
            print(f"W2S {kind}: noise std at s = 20, 60, 120: {np.round(std, 2).tolist()}")
        print(f"W2S fits: {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        conv = data / "convallaria" / "convallaria_frame0000.tif"
        model_path = work / "n2v.qs"
        train(conv, model_path, {"method": "n2v", "net": {"depth": 2, "filters": 16}},
              {"patch": (64,), "batch": 8, "steps": args.steps, "checkpoint_every": 10_000})
        nm = bootstrap(
            model_path, conv, "gmm", work_dir=work, predict_options=predict_options({"progress": False}),
            plot_path=args.out / "pn2v_convallaria_bootstrap.png",
        )
        lo, hi = nm.signal_range
        levels = np.linspace(lo, hi, 5)[1:4]
        _, std = nm.mean_std(levels)
        print(f"Convallaria bootstrap GMM: signal range [{lo:.0f}, {hi:.0f}]; std at {np.round(levels).tolist()}: "
              f"{np.round(std, 1).tolist()} ({time.perf_counter() - t0:.0f} s incl. {args.steps} N2V steps)")


if __name__ == "__main__":
    main()
