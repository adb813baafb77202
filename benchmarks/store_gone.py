"""Seconds from an output's removal to the one-line error: local folder, S3 server, S3 bucket.

A box processor (``--sleep`` s per block, 12 blocks of 32x32, 1 thread, in-process cluster or
``--workers``) predicts into the output; once 2 blocks are marked done the output is removed: the
local folder renamed away, the moto S3 server (a separate process on 127.0.0.1) killed, or the
bucket deleted. Writes JSON with the seconds per run and the error line.

    nice -n 10 OMP_NUM_THREADS=1 PYTHONPATH=src:cli python benchmarks/store_gone.py out.json --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import write_zarr_array
from quietscope.chunked import PredictOptions, run_prediction
from quietscope.errors import QuietscopeError
from quietscope.io.reading import open_image
from quietscope.runner.testing import BoxProcessor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _when_two_done(n_done, remove) -> list[float]:
    at: list[float] = []

    def watch() -> None:
        while n_done() < 2:
            time.sleep(0.02)
        remove()
        at.append(time.monotonic())

    threading.Thread(target=watch, daemon=True).start()
    return at


def _run(src: str, out: str, sleep: float, workers: int) -> str:
    image = open_image(src)
    opts = PredictOptions(chunks=(16, 16), block=(32, 32), progress=False, threads=1, workers=workers or None)
    try:
        run_prediction(image, out, BoxProcessor(sleep=sleep), ["box"], (1, 1), 1, opts, {"benchmark": "store_gone"})
    except QuietscopeError as exc:
        return str(exc)
    except Exception as exc:  # what this benchmark is about: it must not happen
        return f"NOT A QUIETSCOPE ERROR: {type(exc).__name__}: {exc}"
    return "NO ERROR"


def one_run(kind: str, src: str, tmp: Path, sleep: float, workers: int) -> dict:
    """Start a job, remove its output after 2 blocks, return the seconds and the message."""
    if kind == "local":
        out = tmp / "out.ome.zarr"
        done = out / ".quietscope" / "done"
        at = _when_two_done(lambda: len(os.listdir(done)) if done.exists() else 0,
                            lambda: out.rename(tmp / f"trash-{time.time_ns()}"))
        msg = _run(src, str(out), sleep, workers)
        return {"seconds": time.monotonic() - at[0] if at else None, "message": msg}
    import s3fs

    proc, endpoint = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("gone")

    def n_done() -> int:
        try:
            return len(fs.ls("gone/out.ome.zarr/.quietscope/done", refresh=True))
        except FileNotFoundError:
            return 0

    try:
        at = _when_two_done(n_done, proc.kill if kind == "s3-server" else lambda: fs.rm("gone", recursive=True))
        msg = _run(src, "s3://gone/out.ome.zarr", sleep, workers)
        return {"seconds": time.monotonic() - at[0] if at else None, "message": msg}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--kinds", default="local,s3-server,s3-bucket")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        data = (100 + 20 * np.random.default_rng(7).standard_normal((96, 128))).astype(np.float32)
        src = write_zarr_array(Path(d) / "in.zarr", data, (32, 32))
        for kind in args.kinds.split(","):
            for i in range(args.runs):
                tmp = Path(d) / f"{kind}-{i}"
                tmp.mkdir()
                results.setdefault(kind, []).append(one_run(kind, src, tmp, args.sleep, args.workers))
                print(kind, results[kind][-1], flush=True)
                args.out.write_text(json.dumps({"workers": args.workers, "sleep": args.sleep, "results": results}, indent=2))
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
