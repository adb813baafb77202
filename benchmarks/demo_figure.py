"""Before/after figure for the docs: runs the demo pipeline and writes crops as PNG.

Usage::

    .venv/bin/python -m benchmarks.demo_figure [--steps 300] [--out docs/images/demo_before_after.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, read_output
from quietscope.workflows.demo import run_demo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "demo_before_after.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as d:
        summary = run_demo(Path(d) / "demo", steps=args.steps, progress=False)
        noisy = read_output(summary["input"])
        denoised = read_output(summary["output"])
        clean = np.load(Path(d) / "demo" / "clean.npy")
    crop = (slice(64, 192), slice(64, 192))
    lo, hi = np.percentile(clean, [0.5, 99.5])
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=120)
    for ax, img, title in zip(
        axes,
        (noisy, denoised, clean),
        (f"noisy ({summary['psnr_noisy_db']:.1f} dB)", f"N2V, chunked ({summary['psnr_denoised_db']:.1f} dB)", "clean reference"),
    ):
        ax.imshow(img[crop], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{summary['sample']} — {args.steps} training steps on CPU", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(json.dumps(summary, indent=2))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
