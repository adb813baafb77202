"""Read throughput from a loopback S3 server (moto, a separate process) vs the local disk.

Block reads (512x512 windows, as the engine reads blocks) and patch sampling (random 64x64
windows, as training samples), each with zarr's async concurrency at 1, 10 (default) and 32, and
block reads from 4 threads at once (in-flight blocks). Writes JSON after every measurement.

    nice -n 10 OMP_NUM_THREADS=1 PYTHONPATH=src:cli:tests python benchmarks/storage_throughput.py out.json
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

SHAPE, CHUNKS = (4096, 4096), (256, 256)  # 64 MiB float32, 256 chunks of 256 KiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(image, windows, threads: int = 1) -> float:
    t0 = time.perf_counter()
    if threads == 1:
        n = sum(image.read(w).nbytes for w in windows)
    else:
        with ThreadPoolExecutor(threads) as ex:
            n = sum(a.nbytes for a in ex.map(image.read, windows))
    return n / (time.perf_counter() - t0) / 1e6  # MB/s


def main(out_path: str) -> None:
    port = _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    results: dict = {"shape": SHAPE, "chunks": CHUNKS, "rows": []}
    try:
        import s3fs

        from quietscope.io.reading import open_image
        from quietscope.workflows.demo import write_ome_zarr_image as write_ome

        time.sleep(5)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        tmp = Path(tempfile.mkdtemp(prefix="qs-s3bench-"))
        data = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)  # incompressible
        local = str(tmp / "img.ome.zarr")
        write_ome(local, data, "yx", CHUNKS)
        fs.put(local, "bench/img.ome.zarr", recursive=True)
        rng = np.random.default_rng(1)
        blocks = [(slice(y, y + 512), slice(x, x + 512)) for y in range(0, 2048, 512) for x in range(0, 4096, 512)]
        patches = []
        for _ in range(200):
            y, x = (int(v) for v in rng.integers(0, 4096 - 64, 2))
            patches.append((slice(y, y + 64), slice(x, x + 64)))
        for conc in (1, 10, 32):
            zarr.config.set({"async.concurrency": conc})
            for where, uri in (("local", local), ("s3", "s3://bench/img.ome.zarr")):
                img = open_image(uri)
                img.read(blocks[0])  # warm: metadata, connections
                for kind, windows, threads in (("block 512x512", blocks, 1), ("patch 64x64", patches, 1),
                                               ("block 512x512, 4 threads", blocks, 4)):
                    mbs = _measure(img, windows, threads)
                    results["rows"].append({"store": where, "read": kind, "async_concurrency": conc, "MB_per_s": round(mbs, 1)})
                    Path(out_path).write_text(json.dumps(results, indent=2))
                    print(where, kind, conc, f"{mbs:.1f} MB/s", flush=True)
    finally:
        moto.send_signal(signal.SIGTERM)
        moto.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "storage_throughput.json")
