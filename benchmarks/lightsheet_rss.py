"""Peak RSS of ``predict`` at default options on a lightsheet-sized volume, without running it to the end.

Every block of a memory-sized plan has the same shape (edge blocks are smaller), so the process
reaches its peak within the first blocks: this script starts ``quietscope.workflows.predict``
in a child process on a generated volume (issue 19's 128x1024² by default, 32-filter 3D U-Net,
random weights), polls the child's ``VmHWM`` and stops it once ``--blocks`` blocks are done (or
after ``--seconds``). It prints the plan the pipeline chose (from its log), the predicted peak
per task and the measured peak RSS, and writes JSON. Complements ``throughput.py --cases
3D-lightsheet``, whose full runs of 128x1024² take about an hour on 2 cores.

    python -m benchmarks.lightsheet_rss --shape 128,1024,1024 --blocks 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks.harness import RESULTS, make_volume, random_model
from quietscope.runner.heap import peak_rss_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="128,1024,1024")
    ap.add_argument("--chunks", default="32,256,256")
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--z-pool", choices=["yes", "no"], default="yes")
    ap.add_argument("--blocks", type=int, default=2, help="stop after this many blocks are done")
    ap.add_argument("--seconds", type=float, default=900, help="stop after this long at the latest")
    ap.add_argument("--json", default=str(RESULTS / "lightsheet_rss.json"))
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        tmp = Path(d)
        model = random_model(tmp / "m.qs", 3, depth=2, filters=args.filters, batch_norm=False,
                             z_pool=args.z_pool == "yes")
        src = make_volume(tmp / "in.ome.zarr", shape, chunks)
        out = tmp / "out.ome.zarr"
        code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
                "from quietscope.chunked import PredictOptions\nfrom quietscope.workflows.predict import predict\n"
                f"predict({str(model)!r}, {src!r}, {str(out)!r}, PredictOptions(progress=False))\n")
        log_path = tmp / "child.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            child = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
            peak, done = 0.0, 0
            while child.poll() is None and time.perf_counter() - t0 < args.seconds:
                peak = max(peak, peak_rss_bytes(child.pid) / 2**20)
                ledger = out / ".quietscope" / "done"
                done = len(list(ledger.glob("*"))) if ledger.is_dir() else 0
                if done >= args.blocks:
                    break
                time.sleep(0.5)
            peak = max(peak, peak_rss_bytes(child.pid) / 2**20)
            child.kill()
            child.wait()
        text = log_path.read_text()
    plan = re.search(r"memory plan: .*", text)
    halo = re.search(r"halo \{.*", text)
    row = {"date": date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
           "command": "python -m benchmarks.lightsheet_rss " + " ".join(sys.argv[1:]),
           "shape": list(shape), "chunks": list(chunks), "filters": args.filters, "z_pool": args.z_pool,
           "blocks_done_when_stopped": done, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak,
           "plan": plan.group(0) if plan else None, "layout": halo.group(0) if halo else None}
    print(json.dumps(row, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
