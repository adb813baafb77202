"""Throughput, halo overhead and memory of chunked prediction (issue: backbone).

For one N2V model (default size: depth 2, 16 filters) and one 2D and one 3D volume, in one run
(the 3D volume twice: with a U-Net that pools z and with one that keeps full z resolution, as
``train --z-pool no`` builds for anisotropic stacks):

(a) raw in-memory forward pass over the same blocks including their halos (tiles read into
    RAM beforehand), as voxels written per second;
(b) the full pipeline (read -> predict -> write level 0 -> build the pyramid), voxels/s, timed
    inside the job; the job's fixed start-up (imports, cluster, halo measurement) is reported
    separately as ``job_over_raw``;
(c) the halo factor (voxels computed / voxels written) at the default block size;
(d) peak RSS of a ``quietscope predict`` process for the volume and for one 8x larger
    (generated chunk by chunk into zarr, never held in RAM).

Usage::

    .venv/bin/python -m benchmarks.throughput [--quick] [--json benchmarks/results/throughput.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS, random_model
from quietscope.inference import method_halo, predict_tile
from quietscope.io import open_image
from quietscope.io.writing import OutputSpec, create_ome_zarr, open_level
from quietscope.methods.modelfile import load_model
from quietscope.runner.executor import read_padded
from quietscope.tiling import choose_block_shape, halo_factor, plan_blocks, read_window


def make_volume(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], seed: int = 0) -> str:
    """Write a noisy synthetic volume chunk by chunk (never the whole array in memory)."""
    axes = "yx" if len(shape) == 2 else "zyx"
    spec = OutputSpec(path=str(path), axes=axes, shape=shape, chunks=chunks, dtype="uint16", n_levels=1,
                      channel_windows=[(0, 400)])
    create_ome_zarr(spec)
    arr = open_level(path, 0)
    for b in plan_blocks(shape, chunks):
        rng = np.random.default_rng([seed, *b.index])
        grids = np.meshgrid(*[np.arange(a, z) for a, z in zip(b.start, b.stop)], indexing="ij")
        signal = 100 + 80 * np.sin(sum(g * 0.05 * (i + 1) for i, g in enumerate(grids))) ** 2
        arr[b.slices()] = rng.poisson(signal).astype(np.uint16)
    return str(path)


def raw_forward(model_path: str, src: str, block, chunks, threads: int) -> dict:
    """(a): forward passes over the plan's tiles (with halos), tiles already in memory."""
    torch.set_num_threads(threads)
    method, _ = load_model(model_path)
    halo = method_halo(method)
    image = open_image(src)
    blocks = plan_blocks(image.spatial_shape, block)
    tiles = []
    for b in blocks:
        rs, re = read_window(b.start, b.stop, halo, method.downsampling_factor)
        tiles.append((b, read_padded(image, 0, rs, re).astype(np.float32)))
    predict_tile(method, tiles[0][1])  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    computed = 0
    for b, tile in tiles:
        predict_tile(method, tile)
        computed += tile.size
    dt = time.perf_counter() - t0
    written = math.prod(image.spatial_shape)
    return {"seconds": dt, "voxels_per_s": written / dt, "voxels_computed": computed, "halo": list(halo)}


def pipeline_run(model_path: str, src: str, out: str, chunks) -> dict:
    """(b) and (d): ``quietscope.chunked.predict`` in a fresh child process.

    Returns the pipeline's own timings (level 0 = read -> predict -> write; then the pyramid),
    the whole job's wall time including start-up (imports, cluster, halo measurement), and the
    child's peak RSS.
    """
    code = f"""
import json, resource, time
t0 = time.perf_counter()
from quietscope.chunked import PredictOptions
from quietscope.workflows.predict import predict
r = predict({model_path!r}, {src!r}, {out!r}, PredictOptions(chunks={tuple(chunks)!r}, overwrite=True, progress=False))
print(json.dumps({{"level0_s": r.seconds_level0, "pyramid_s": r.seconds_pyramid, "job_s": time.perf_counter() - t0,
                  "n_blocks": r.n_blocks, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(kind: str, shape, chunks, model_path: str, tmp: Path, threads: int) -> dict:
    src = make_volume(tmp / f"{kind}.ome.zarr", shape, chunks)
    method, _ = load_model(model_path)
    halo = method_halo(method)
    block = choose_block_shape(shape, chunks, halo, 1_500_000)  # the pipeline's default choice
    raw = raw_forward(model_path, src, block, chunks, threads)
    run = pipeline_run(model_path, src, str(tmp / f"{kind}_out.ome.zarr"), chunks)
    voxels = math.prod(shape)
    big_shape = tuple(int(round(s * (2 if len(shape) == 3 else 2 * math.sqrt(2)) / c)) * c for s, c in zip(shape, chunks))
    big_src = make_volume(tmp / f"{kind}_big.ome.zarr", big_shape, chunks, seed=1)
    big = pipeline_run(model_path, big_src, str(tmp / f"{kind}_big_out.ome.zarr"), chunks)
    assert open_image(tmp / f"{kind}_out.ome.zarr").shape == tuple(shape)
    return {
        "kind": kind,
        "shape": list(shape),
        "chunks": list(chunks),
        "block": list(block),
        "halo": list(halo),
        "halo_factor": halo_factor(block, halo),
        "raw_forward_voxels_per_s": raw["voxels_per_s"],
        "pipeline_voxels_per_s": voxels / (run["level0_s"] + run["pyramid_s"]),
        "level0_seconds": run["level0_s"],
        "pyramid_seconds": run["pyramid_s"],
        "job_seconds_incl_startup": run["job_s"],
        "pipeline_over_raw": voxels / (run["level0_s"] + run["pyramid_s"]) / raw["voxels_per_s"],
        "job_over_raw": voxels / run["job_s"] / raw["voxels_per_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "big_shape": list(big_shape),
        "big_voxel_ratio": math.prod(big_shape) / voxels,
        "big_peak_rss_mb": big["peak_rss_mb"],
        "rss_ratio": big["peak_rss_mb"] / run["peak_rss_mb"],
        "big_pipeline_voxels_per_s": math.prod(big_shape) / (big["level0_s"] + big["pyramid_s"]),
        "big_pipeline_over_raw": math.prod(big_shape) / (big["level0_s"] + big["pyramid_s"]) / raw["voxels_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small volumes (smoke test)")
    ap.add_argument("--json", default=str(RESULTS / "throughput.json"))
    ap.add_argument("--filters", type=int, default=16, help="U-Net width (16 keeps the 3D run within minutes on 2 cores)")
    ap.add_argument("--cases", default="2D,3D,3D-zfull",
                    help="comma-separated subset of: 2D, 3D, 3D-zfull (3D U-Net without z pooling, as --z-pool no)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        tmp = Path(d)
        model2 = random_model(tmp / "m2.qs", 2, depth=2, filters=args.filters)
        model3 = random_model(tmp / "m3.qs", 3, depth=2, filters=args.filters)
        model3z = random_model(tmp / "m3z.qs", 3, depth=2, filters=args.filters, z_pool=False)
        if args.quick:
            cases = [("2D", (512, 512), (128, 128), model2), ("3D", (16, 128, 128), (16, 64, 64), model3),
                     ("3D-zfull", (16, 128, 128), (16, 64, 64), model3z)]
        else:
            cases = [("2D", (2048, 2048), (256, 256), model2), ("3D", (32, 192, 192), (32, 96, 96), model3),
                     ("3D-zfull", (32, 192, 192), (32, 96, 96), model3z)]
        wanted = args.cases.split(",")
        rows = [measure(k, s, c, m, tmp, threads) for k, s, c, m in cases if k in wanted]
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}",
        "command": "python -m benchmarks.throughput" + (" --quick" if args.quick else "") + f" --cases {args.cases}",
        "model": f"n2v U-Net depth 2, {args.filters} filters (random weights: speed does not depend on training)",
        "loadavg_at_end": os.getloadavg(),
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    hdr = (f"{'':8} {'shape':>16} {'block':>14} {'halo f.':>7} {'raw vox/s':>10} {'pipe vox/s':>10} {'(b)/(a)':>7} "
           f"{'8x (b)/(a)':>10} {'job/(a)':>7} {'RSS MB':>7} {'8x RSS':>7} {'ratio':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['kind']:8} {'x'.join(map(str, r['shape'])):>16} {'x'.join(map(str, r['block'])):>14} "
              f"{r['halo_factor']:7.3f} {r['raw_forward_voxels_per_s']:10.3g} {r['pipeline_voxels_per_s']:10.3g} "
              f"{r['pipeline_over_raw']:7.2f} {r['big_pipeline_over_raw']:10.2f} {r['job_over_raw']:7.2f} "
              f"{r['peak_rss_mb']:7.0f} {r['big_peak_rss_mb']:7.0f} {r['rss_ratio']:6.2f}")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
