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
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS, ROOT, make_volume, random_model
from quietscope.inference import method_halo, predict_tile
from quietscope.io import open_image
from quietscope.methods.modelfile import load_model
from quietscope.runner.executor import read_padded
from quietscope.tiling import halo_factor, plan_blocks, read_window


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


def pipeline_run(model_path: str, src: str, out: str, chunks, block=None) -> dict:
    """(b) and (d): ``quietscope.chunked.predict`` in a fresh child process.

    Returns the pipeline's own timings (level 0 = read -> predict -> write; then the pyramid),
    the whole job's wall time including start-up (imports, cluster, halo measurement), and the
    child's own peak RSS (``VmHWM``: ``ru_maxrss`` would include the parent's, see runner/heap.py).
    """
    code = f"""
import json, time
t0 = time.perf_counter()
from quietscope.chunked import PredictOptions
from quietscope.runner.heap import peak_rss_bytes
from quietscope.workflows.predict import predict
r = predict({model_path!r}, {src!r}, {out!r}, PredictOptions(chunks={tuple(chunks) if chunks else None!r}, block={tuple(block) if block else None!r}, overwrite=True, progress=False))
print(json.dumps({{"level0_s": r.seconds_level0, "pyramid_s": r.seconds_pyramid, "job_s": time.perf_counter() - t0,
                  "n_blocks": r.n_blocks, "peak_rss_mb": peak_rss_bytes() / 2**20}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(kind: str, shape, chunks, model_path: str, tmp: Path, threads: int) -> dict:
    src = make_volume(tmp / f"{kind}.ome.zarr", shape, chunks)
    plan = lightsheet_plan(model_path, src, chunks)  # the pipeline's default choice (blocks sized by memory)
    halo, block = tuple(plan["halo"]), tuple(plan["block"])
    raw = raw_subtiled(model_path, src, plan, threads)
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
        "subtile": plan["subtile"],
        "compute_factor": plan["compute_factor"],
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


# ---- 3D-lightsheet (issue 19) -----------------------------------------------------------------
PEER_TILE, PEER_OVERLAP = (64, 128, 128), (48, 48, 48)  # CAREamics 0.3.5's default 3D tiling


def peer_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis as CAREamics places them: stride ``tile - overlap``, the last
    tile flush with the end, one tile (the whole axis) when the axis is shorter than a tile."""
    t = min(tile, size)
    starts = list(range(0, size - t + 1, max(1, t - overlap)))
    if starts[-1] != size - t:
        starts.append(size - t)
    return starts


def peer_plan(shape) -> list[tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """(tile, keep-in-output, keep-in-tile) slices: crop-and-paste, each tile keeps the voxels
    up to the middle of its overlaps (as CAREamics' stitching does)."""
    per_axis = []
    for s, t, o in zip(shape, PEER_TILE, PEER_OVERLAP):
        t = min(t, s)
        st = peer_starts(s, t, o)
        axis = []
        for i, a in enumerate(st):
            lo = 0 if i == 0 else (a + st[i - 1] + t) // 2
            hi = s if i == len(st) - 1 else (a + t + st[i + 1]) // 2
            axis.append((slice(a, a + t), slice(lo, hi), slice(lo - a, hi - a)))
        per_axis.append(axis)
    from itertools import product

    return [tuple(zip(*combo)) for combo in product(*per_axis)]


def peer_loop(model_path: str, src: str, threads: int, max_tiles: int | None) -> dict:
    """A crop-and-paste tiled loop in plain torch over the same net (no CAREamics dependency):
    the whole volume in RAM, tiles of 64x128x128 with overlap 48, each through the net, the
    centre pasted. All tiles have the same shape, so with ``max_tiles`` the loop runs that many
    and the time is extrapolated to the whole plan (said in the output)."""
    from quietscope.io import open_image
    from quietscope.methods.modelfile import load_model

    torch.set_num_threads(threads)
    method, _ = load_model(model_path)
    image = open_image(src)
    vol = image.read_tc(0, tuple(slice(0, s) for s in image.spatial_shape)).astype(np.float32)
    out = np.zeros_like(vol)
    plan = peer_plan(image.spatial_shape)
    run = plan[: max_tiles] if max_tiles else plan
    with torch.inference_mode():
        method.predict(torch.from_numpy(vol[(slice(None),) + run[0][0]])[None])  # warm-up
        t0 = time.perf_counter()
        for tile_sl, out_sl, keep_sl in run:
            pred = method.predict(torch.from_numpy(np.ascontiguousarray(vol[(slice(None),) + tile_sl]))[None])[0].numpy()
            out[(slice(None),) + out_sl] = pred[(slice(None),) + keep_sl]
        dt = (time.perf_counter() - t0) * len(plan) / len(run)
    computed = len(plan) * math.prod(min(t, s) for t, s in zip(PEER_TILE, image.spatial_shape))
    return {"seconds": dt, "voxels_per_s": math.prod(image.spatial_shape) / dt, "tiles": len(plan), "tiles_timed": len(run),
            "compute_factor": computed / math.prod(image.spatial_shape)}


def lightsheet_plan(model_path: str, src: str, chunks=None, block=None) -> dict:
    """The default plan of ``predict`` for ``src`` (block, sub-tile, memory), as the engine decides it."""
    from quietscope.chunked import PredictOptions, plan_layout
    from quietscope.inference import method_halo
    from quietscope.inference_memory import memory_profile
    from quietscope.io import open_image
    from quietscope.methods.modelfile import load_model
    from quietscope.tiling import compute_factor, halo_factor

    method, _ = load_model(model_path)
    halo, f = method_halo(method), method.downsampling_factor
    image = open_image(src)
    prof = memory_profile(method, 1)
    lay = plan_layout(image, 1, halo, PredictOptions(chunks=tuple(chunks) if chunks else None,
                                                     block=tuple(block) if block else None), False, prof, f)
    block = tuple(min(b, s) for b, s in zip(lay.block, image.spatial_shape))
    return {"block": list(lay.block), "subtile": list(lay.subtile), "halo": list(halo), "factor": f,
            "halo_factor_block": halo_factor(block, halo),
            "compute_factor": compute_factor(image.spatial_shape, lay.block, halo, f, lay.subtile),
            "predicted_task_mb": lay.predicted_bytes / 1e6, "budget_mb": lay.memory_budget / 1e6,
            "net_bytes_per_voxel": prof.net_bytes_per_voxel}


def raw_subtiled(model_path: str, src: str, plan: dict, threads: int) -> dict:
    """(a) for a memory-sized plan: the forward passes over the same blocks and sub-tiles, tiles in RAM."""
    from quietscope.inference import predict_tile
    from quietscope.io import open_image
    from quietscope.methods.modelfile import load_model
    from quietscope.runner.executor import read_padded
    from quietscope.runner.subtiles import predict_in_subtiles
    from quietscope.tiling import iter_blocks, read_window

    torch.set_num_threads(threads)
    method, _ = load_model(model_path)
    image = open_image(src)
    halo, sub = tuple(plan["halo"]), tuple(plan["subtile"])
    tiles = [read_padded(image, 0, *read_window(b.start, b.stop, halo, method.downsampling_factor)).astype(np.float32)
             for b in iter_blocks(image.spatial_shape, tuple(plan["block"]))]
    predict_tile(method, np.ascontiguousarray(tiles[0][(slice(None),) + tuple(slice(0, min(n, t + 2 * h))
                 for n, t, h in zip(tiles[0].shape[1:], sub, halo))]))  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        for tile in tiles:
            predict_in_subtiles(lambda t: predict_tile(method, t), tile, halo, sub)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "voxels_per_s": math.prod(image.spatial_shape) / dt}


def raw_in_child(model_path: str, src: str, plan: dict, threads: int, heap: str) -> dict:
    """:func:`raw_subtiled` in a fresh process whose allocator is set as ``predict`` sets its own.

    ``predict`` fixes glibc's mmap threshold (``runner/heap.py``), which costs time on every large
    allocation; timing the raw pass in this process, with glibc's dynamic threshold, compared the
    pipeline with a faster allocator than its own (docs/benchmarks.md §9d). ``heap="bounded"``
    starts the child with the same threshold ``predict`` applies; ``"default"`` leaves glibc's own.
    The environment variable is read by glibc at start, which ``mallopt`` after imports is not
    equivalent to in a process that has already fragmented its heap.
    """
    from quietscope.runner.heap import heap_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(heap_env() if heap == "bounded" else {"QUIETSCOPE_MMAP_THRESHOLD": "0"})
    # A fresh interpreter given its own environment, so glibc reads the threshold before its
    # first malloc and this process's environment is left as it is.
    code = (f"import json; from benchmarks.throughput import raw_subtiled; "
            f"print(json.dumps(raw_subtiled({model_path!r}, {src!r}, {plan!r}, {threads!r})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_lightsheet(kind: str, shape, chunks, model_path: str, tmp: Path, threads: int, peer_tiles: int | None,
                       sample: tuple[int, ...] | None = None, raw_heap: str = "bounded") -> dict:
    """One row. With ``sample`` (extents of the last axes), our pipeline and raw forward run on a
    crop of that extent with the full volume's planned block forced: every block window of a
    memory plan has the same shape (reflection pads the edges), so the crop's voxels/s is the
    full plan's, without running an hour per row. The peer is timed on the full volume."""
    src = make_volume(tmp / f"{kind}.ome.zarr", shape, chunks)
    plan = lightsheet_plan(model_path, src)
    timed_src, timed_shape, block = src, tuple(shape), None
    if sample:
        timed_shape = tuple(shape[: len(shape) - len(sample)]) + tuple(sample)
        timed_src = make_volume(tmp / f"{kind}_crop.ome.zarr", timed_shape, chunks)
        block = plan["block"]
        crop_plan = lightsheet_plan(model_path, timed_src, block=block)
        assert crop_plan["block"] == plan["block"] and crop_plan["subtile"] == plan["subtile"], (crop_plan, plan)
    raw = raw_in_child(model_path, timed_src, plan, threads, raw_heap)
    run = pipeline_run(model_path, timed_src, str(tmp / f"{kind}_out.ome.zarr"), None, block)
    peer = peer_loop(model_path, src, threads, peer_tiles)
    voxels = math.prod(timed_shape)
    pipe = voxels / (run["level0_s"] + run["pyramid_s"])
    row = {"kind": kind, "shape": list(shape), "chunks": list(chunks), **plan,
           "timed_shape": list(timed_shape), "timed_blocks": run["n_blocks"],
           "raw_forward_voxels_per_s": raw["voxels_per_s"], "pipeline_voxels_per_s": pipe,
           "pipeline_over_raw": pipe / raw["voxels_per_s"], "raw_heap": raw_heap, "job_seconds_incl_startup": run["job_s"],
           "peak_rss_mb": run["peak_rss_mb"], "peer_voxels_per_s": peer["voxels_per_s"],
           "peer_compute_factor": peer["compute_factor"], "peer_tiles": peer["tiles"], "peer_tiles_timed": peer["tiles_timed"],
           "pipeline_over_peer": pipe / peer["voxels_per_s"]}
    shutil.rmtree(tmp / f"{kind}_out.ome.zarr", ignore_errors=True)
    shutil.rmtree(tmp / f"{kind}.ome.zarr", ignore_errors=True)
    shutil.rmtree(tmp / f"{kind}_crop.ome.zarr", ignore_errors=True)
    return row


def lightsheet_cases(scale: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """64x512^2 and 128x1024^2 (y and x divided by ``scale``), chunks 32x256^2 (likewise)."""
    c = 256 // scale
    return [("LS-64", (64, 512 // scale, 512 // scale), (32, c, c)), ("LS-128", (128, 1024 // scale, 1024 // scale), (32, c, c))]


def run_lightsheet(args, tmp: Path, threads: int, json_path: Path, header: dict) -> list[dict]:
    """Both sizes, z pooled and not, rows written to JSON as each finishes."""
    models = {"": random_model(tmp / "ls.qs", 3, depth=2, filters=args.filters, batch_norm=False),
              "-zfull": random_model(tmp / "lsz.qs", 3, depth=2, filters=args.filters, batch_norm=False, z_pool=False)}
    wanted = set(args.ls_cases.split(",")) if args.ls_cases else None
    rows = []
    for suffix, model in models.items():
        done = []
        for kind, shape, chunks in lightsheet_cases(args.ls_scale):
            if wanted is not None and kind + suffix not in wanted:
                continue
            sample = tuple(int(v) for v in args.ls_sample.split(",")) if args.ls_sample and kind == "LS-128" else None
            done.append(measure_lightsheet(kind + suffix, shape, chunks, model, tmp, threads, args.peer_tiles, sample,
                                           args.raw_heap))
            rows.append(done[-1])
            json_path.write_text(json.dumps({**header, "rows": rows}, indent=2))
        if len(done) == 2:
            done[1]["rss_ratio_to_small"] = done[1]["peak_rss_mb"] / done[0]["peak_rss_mb"]
    return rows


def print_lightsheet(rows: list[dict]) -> None:
    print(f"{'':10} {'shape':>14} {'block':>12} {'sub-tile':>12} {'blk hf':>6} {'comp f':>6} {'peer f':>6} "
          f"{'pipe/raw':>8} {'pipe/peer':>9} {'RSS MB':>7} {'pred MB':>7}")
    for r in rows:
        print(f"{r['kind']:10} {'x'.join(map(str, r['shape'])):>14} {'x'.join(map(str, r['block'])):>12} "
              f"{'x'.join(map(str, r['subtile'])):>12} {r['halo_factor_block']:6.2f} {r['compute_factor']:6.2f} "
              f"{r['peer_compute_factor']:6.2f} {r['pipeline_over_raw']:8.2f} {r['pipeline_over_peer']:9.2f} "
              f"{r['peak_rss_mb']:7.0f} {r['predicted_task_mb']:7.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small volumes (smoke test)")
    ap.add_argument("--json", default=str(RESULTS / "throughput.json"))
    ap.add_argument("--filters", type=int, default=None,
                    help="U-Net width (default 16, which keeps the 3D run within minutes on 2 cores; 32 for 3D-lightsheet)")
    ap.add_argument("--cases", default="2D,3D,3D-zfull",
                    help="comma-separated subset of: 2D, 3D, 3D-zfull (3D U-Net without z pooling, as --z-pool no), "
                         "or 3D-lightsheet alone (64x512^2 and 128x1024^2, z pooled and not, against a tiled loop)")
    ap.add_argument("--ls-scale", type=int, default=1, help="3D-lightsheet: divide y and x by this (z kept)")
    ap.add_argument("--peer-tiles", type=int, default=None,
                    help="3D-lightsheet: time this many of the peer loop's (equal) tiles and extrapolate")
    ap.add_argument("--ls-sample", default=None,
                    help="3D-lightsheet: time our pipeline on 128x1024^2 over a crop of these last-axis extents "
                         "(e.g. 256,512) with the full volume's planned block (equal block windows: same voxels/s)")
    ap.add_argument("--ls-cases", default=None,
                    help="3D-lightsheet: only these rows, e.g. LS-64,LS-64-zfull (default: all four)")
    ap.add_argument("--raw-heap", choices=("bounded", "default"), default="bounded",
                    help="3D-lightsheet: time the raw pass with predict's mmap threshold (bounded, like for like) "
                         "or glibc's dynamic one (default)")
    args = ap.parse_args()
    if args.cases == "3D-lightsheet":
        args.filters = args.filters or 32  # the issue's net
        main_lightsheet(args)
        return
    args.filters = args.filters or 16
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


def main_lightsheet(args) -> None:
    threads = torch.get_num_threads()
    header = {"date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}",
              "command": f"python benchmarks/throughput.py --cases 3D-lightsheet --filters {args.filters} "
                         f"--ls-scale {args.ls_scale}" + (f" --peer-tiles {args.peer_tiles}" if args.peer_tiles else "")
                         + (f" --ls-cases {args.ls_cases}" if args.ls_cases else "")
                         + (f" --ls-sample {args.ls_sample}" if args.ls_sample else "")
                         + f" --raw-heap {args.raw_heap}",
              "model": f"n2v 3D U-Net depth 2, {args.filters} filters, no batch norm (random weights)",
              "peer": "crop-and-paste tiled loop in plain torch written here (CAREamics' default tiling 64x128x128, "
                      "overlap 48; no CAREamics dependency), same net, volume in RAM",
              "loadavg_at_start": os.getloadavg()}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        rows = run_lightsheet(args, Path(d), threads, json_path, header)
    json_path.write_text(json.dumps({**header, "loadavg_at_end": os.getloadavg(), "rows": rows}, indent=2))
    print_lightsheet(rows)
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
