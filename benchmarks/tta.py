"""What test-time augmentation (``predict --tta``) is worth on the quality benchmark's models.

Run after ``benchmarks.quality`` (no training; each model is predicted twice)::

    .venv/bin/python -m benchmarks.tta --workdir /tmp/quietscope-bench-quality

For every trained model that ``quality.py`` left in its ``--workdir`` (``<dataset>/<row>_s<seed>.qs``),
the noisy test image is predicted through ``quietscope.chunked.predict`` without and with
``tta=True`` and scored like ``quality.py`` scores it (PSNR against the clean crop; for W2S after
an affine fit). Results go to ``benchmarks/results/tta.json``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, fmt_mean_sem, machine, markdown_table, predict, psnr_db, single_thread, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/quietscope-bench-quality")
    ap.add_argument("--output", default=str(RESULTS / "tta.json"))
    args = ap.parse_args(argv)

    single_thread()
    rows: list[dict[str, Any]] = []
    for d in sorted(Path(args.workdir).iterdir()):
        if not (d / "noisy.ome.zarr").exists():
            continue
        metric = "psnr_affine" if d.name.startswith("w2s") else "psnr"
        clean = np.load(d / "clean.npy")
        for model in sorted(d.glob("*_s[0-9]*.qs")):
            tag, seed = re.fullmatch(r"(.+)_s(\d+)\.qs", model.name).groups()
            rec: dict[str, Any] = {"dataset": d.name, "model": tag, "seed": int(seed)}
            for tta in (False, True):
                out = d / f"tta-check_{tag}_s{seed}_{int(tta)}.ome.zarr"
                rec["tta" if tta else "plain"] = psnr_db(predict(model, d / "noisy.ome.zarr", out, tta=tta), clean, metric)
            rec["gain"] = rec["tta"] - rec["plain"]
            rows.append(rec)
            print(f"{d.name} {tag} s{seed}: {rec['plain']:.2f} -> {rec['tta']:.2f} dB", flush=True)

    table = []
    for key in sorted({(r["dataset"], r["model"]) for r in rows}):
        rs = [r for r in rows if (r["dataset"], r["model"]) == key]

        def ms(field: str, rs: list[dict[str, Any]] = rs) -> str:
            v = np.array([r[field] for r in rs])
            return fmt_mean_sem(float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None)

        table.append([key[0], key[1], ms("plain"), ms("tta"), ms("gain"), str(len(rs))])
    md = markdown_table(["dataset", "model", "PSNR (dB)", "PSNR with --tta (dB)", "gain (dB)", "n"], table)
    print(md)
    write_json(args.output, {"machine": machine(), "workdir": args.workdir, "rows": rows, "table": md})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
