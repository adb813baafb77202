"""GPU benchmark (issue #18): throughput, precision, multi-GPU scaling, device memory, AMP training.

On a CUDA machine, in about 8 minutes at most, measures and writes JSON (incrementally, one key
per part, so a run cut short keeps what it measured):

1. ``train``: N2V training steps/s, fp32 and ``--amp`` (bf16, or fp16 + grad scaler), on a W2S
   field (``shared/data/w2s``) or, without it, a synthetic image; the fp32 model is kept.
2. ``precision``: that trained model on the W2S test fields at fp32, bf16 and fp16: PSNR against
   the 400-frame mean (after an affine fit), and PSNR of each output against the fp32 output;
   the default ``--precision auto`` (bf16) is justified only if bf16 stays within
   ``BF16_BOUND_DB`` of fp32 here.
3. ``raw``: forward passes over tiles of the size the planner picks on this GPU (tiles in pinned
   host memory, copied in and out as the workers do), voxels written per second, fp32 and bf16,
   with the peak device memory and the measured bytes per voxel.
4. ``pipeline``: ``quietscope predict`` on a 2D 16384² and a 3D 256×2048² uint16 volume, generated
   lazily chunk by chunk into zarr (dask, never whole in RAM): voxels/s at fp32 and bf16 on one GPU
   (``--gpus 1``) and on all (``--gpus all``), and pipeline/raw.

Usage (from a fresh clone; install the CUDA build of torch first, see docs/cluster.md)::

    pip install torch --index-url https://download.pytorch.org/whl/cu124   # or your CUDA
    pip install -e ".[gpu]"
    python benchmarks/gpu.py [--json benchmarks/results/gpu.json] [--quick]

Without CUDA it prints why and exits 0 (``--smoke`` runs tiny sizes on the CPU to check the
script itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: bf16 may be the GPU default only if its PSNR against the clean images stays within this of fp32.
BF16_BOUND_DB = 0.1
BUDGET_S = 8 * 60


class Report:
    """The JSON result, rewritten after every part."""

    def __init__(self, path: str, meta: dict) -> None:
        self.path, self.data, self.t0 = Path(path), dict(meta), time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.write()
        print(f"[{self.data['elapsed_s']:6.1f} s] {key}: {json.dumps(value, default=str)[:400]}", flush=True)

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def left(self) -> float:
        if self.data.get("smoke"):
            return math.inf  # a check of the script on a slow CPU: no budget
        return BUDGET_S - (time.perf_counter() - self.t0)


def lazy_volume(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], seed: int = 0) -> str:
    """A noisy uint16 zarr array generated chunk by chunk by dask (never whole in memory)."""
    import dask.array as da

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        grids = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in loc], indexing="ij")
        signal = 100 + 80 * np.sin(sum(g * np.float32(0.05 * (i + 1)) for i, g in enumerate(grids))) ** 2
        rng = np.random.default_rng([seed, *[a for a, _ in loc]])
        return rng.poisson(signal).astype(np.uint16)

    arr = da.map_blocks(block, dtype=np.uint16, chunks=tuple((c,) * (s // c) for s, c in zip(shape, chunks)))
    arr.to_zarr(str(path), overwrite=True)
    return str(path)


def w2s_fields(n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    from quietscope.io.sample_data import read_tiff

    base = ROOT / "shared" / "data" / "w2s"
    if not base.is_dir():
        base = ROOT.parent / "shared" / "data" / "w2s"
    if not base.is_dir():
        return []
    fovs = sorted(p.name for p in (base / "noisy").glob("fov*_ch0.tif"))[:n]
    return [(np.asarray(read_tiff(base / "noisy" / f), np.float32), np.asarray(read_tiff(base / "clean" / f), np.float32)) for f in fovs]


def part_train(rep: Report, tmp: Path, device: str, steps: int, filters: int, amp_too: bool = True) -> str:
    from benchmarks.harness import write_zarr_array
    from quietscope.workflows.train import train_model

    fields = w2s_fields(1)
    data = fields[0][0] if fields else np.random.default_rng(0).poisson(50 + 50 * np.random.default_rng(1).random((512, 512))).astype(np.float32)
    src = write_zarr_array(tmp / "train.zarr", data, (256, 256))
    out = {"data": "w2s fov081 ch0" if fields else "synthetic 512²", "steps": steps, "batch": 16, "patch": 64}
    model = ""
    for amp in (False, True) if amp_too else (False,):
        path = tmp / f"n2v_amp{int(amp)}.qs"
        opts = {"patch": (64, 64), "batch": 16, "steps": steps, "device": device, "val_every": max(1, steps // 2),
                "checkpoint_every": steps, **({"amp": True} if amp else {})}
        res = train_model(src, path, {"method": "n2v", "net": {"depth": 2, "filters": filters}}, opts, axes="yx", progress=False)
        out["amp_steps_per_s" if amp else "fp32_steps_per_s"] = steps / res.seconds
        model = model or str(path)
    if amp_too:
        out["amp_speedup"] = out["amp_steps_per_s"] / out["fp32_steps_per_s"]
    rep.put("train", out)
    return model


def part_precision(rep: Report, model: str, device: torch.device, precisions: list[str]) -> None:
    from quietscope.device import set_module_precision
    from quietscope.inference import load_for_inference, predict_tile_batched, predict_whole
    from quietscope.metrics.image_quality import affine_fit, psnr

    fields = w2s_fields(3) or [(np.random.default_rng(2).poisson(100, (512, 512)).astype(np.float32), None)]
    rows: dict[str, list] = {p: [] for p in precisions}
    ref_out = []
    for p in precisions:
        loaded = load_for_inference(model, str(device))
        set_module_precision(loaded.method.net, p, device.type)
        fn = lambda t: predict_tile_batched(loaded.method, t, device, loaded.halo, loaded.factor, None)
        for i, (noisy, clean) in enumerate(fields):
            out = predict_whole(fn, noisy[None], loaded.halo, loaded.factor)[0]
            if p == "fp32":
                ref_out.append(out)
            row = {} if p == "fp32" else {"vs_fp32_db": psnr(out, ref_out[i], data_range=float(ref_out[i].max() - ref_out[i].min()))}
            if clean is not None:
                row["vs_clean_db"] = psnr(affine_fit(out, clean), clean)
            rows[p].append(row)
    summary: dict = {p: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for p, rs in rows.items()}
    if "bf16" in summary and "vs_clean_db" in summary["bf16"]:
        summary["bf16_minus_fp32_vs_clean_db"] = summary["bf16"]["vs_clean_db"] - summary["fp32"]["vs_clean_db"]
        summary["bf16_within_bound"] = abs(summary["bf16_minus_fp32_vs_clean_db"]) <= BF16_BOUND_DB
    rep.put("precision", {"fields": len(fields), "per_field": rows, "mean": summary, "bound_db": BF16_BOUND_DB})


def part_raw(rep: Report, model: str, device: torch.device, ndim_shapes: dict, n_tiles: int) -> dict:
    from quietscope.device import set_module_precision
    from quietscope.inference import gpu_work_voxels, load_for_inference, predict_tile_batched, probe_bytes_per_voxel
    from quietscope.tiling import choose_block_shape, read_window

    out = {}
    for kind, (shape, chunks, mdl) in ndim_shapes.items():
        for p in ("fp32", "bf16"):
            loaded = load_for_inference(mdl if kind != "2D" else model, str(device))
            set_module_precision(loaded.method.net, p, device.type)
            if device.type == "cuda":
                bpv = probe_bytes_per_voxel(loaded.method, device)
                limit = gpu_work_voxels(torch.cuda.mem_get_info(device)[1], bpv)
            else:
                bpv, limit = None, 1_500_000
            block = choose_block_shape(shape, chunks, loaded.halo, limit)
            rs, re = read_window((0,) * len(shape), block, loaded.halo, loaded.factor)
            tile = np.random.default_rng(0).poisson(100, (1,) + tuple(b - a for a, b in zip(rs, re))).astype(np.float32)
            predict_tile_batched(loaded.method, tile, device, loaded.halo, loaded.factor, None)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(n_tiles):
                predict_tile_batched(loaded.method, tile, device, loaded.halo, loaded.factor, None)
            dt = time.perf_counter() - t0
            out[f"{kind}_{p}"] = {"block": list(block), "tile": list(tile.shape[1:]), "bytes_per_voxel": bpv,
                                  "voxels_per_s": n_tiles * math.prod(block) / dt,
                                  "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
            del loaded
    rep.put("raw", out)
    return out


def part_pipeline(rep: Report, model3: str, model2: str, tmp: Path, volumes: dict, gpus: list[str | None], raw: dict) -> None:
    from quietscope.chunked import PredictOptions
    from quietscope.workflows.predict import predict

    out = {}
    for kind, (shape, chunks) in volumes.items():
        if rep.left() < 60:
            out[kind] = "skipped: time budget"
            break
        t0 = time.perf_counter()
        src = lazy_volume(tmp / f"{kind}.zarr", shape, chunks)
        gen_s = time.perf_counter() - t0
        axes = "yx" if len(shape) == 2 else "zyx"
        for g in gpus:
            for p in ("fp32", "bf16"):
                if rep.left() < 45:
                    break
                opts = PredictOptions(chunks=chunks, precision=p, gpus=g, device="auto" if g else "cpu", overwrite=True,
                                      progress=False, n_levels=1 if kind == "3D" else None)
                r = predict(model2 if kind == "2D" else model3, src, tmp / f"{kind}_out.zarr", opts, axes=axes)
                vps = math.prod(shape) / (r.seconds_level0 + r.seconds_pyramid)
                raw_vps = (raw.get(f"{kind}_{p}") or {}).get("voxels_per_s")
                out[f"{kind}_{p}_gpus={g}"] = {"voxels_per_s": vps, "block": list(r.block), "halo_factor": r.halo_factor,
                                              "level0_s": r.seconds_level0, "pyramid_s": r.seconds_pyramid,
                                              "pipeline_over_raw": vps / raw_vps if raw_vps else None, "volume_gen_s": gen_s}
                rep.put("pipeline", out)
    rep.put("pipeline", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results" / "gpu.json"))
    ap.add_argument("--quick", action="store_true", help="4096² and 64×1024² volumes, fewer steps")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (checks the script)")
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--parts", default="train,precision,raw,pipeline", help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 500; --quick 200)")
    ap.add_argument("--cpu", action="store_true", help="run the chosen parts on the CPU (bf16 autocast; no fp16)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not (args.smoke or args.cpu):
        print("benchmarks/gpu.py: no CUDA device visible (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}); nothing measured. Install the CUDA build of torch on a GPU machine "
              "(docs/cluster.md) and rerun; --smoke checks the script on the CPU.")
        return
    from benchmarks.harness import random_model
    from quietscope.runner.cluster import visible_gpus

    device = torch.device("cuda" if cuda else "cpu")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    rep = Report(args.json, {"date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                             "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, GPUs: {names or 'none'}",
                             "torch": torch.__version__, "model": f"n2v U-Net depth 2, {args.filters} filters",
                             "smoke": args.smoke})
    if args.smoke:
        steps, n_tiles = 4, 2
        volumes = {"2D": ((256, 256), (128, 128)), "3D": ((16, 64, 64), (16, 32, 32))}
    elif args.quick:
        steps, n_tiles = 200, 10
        volumes = {"2D": ((4096, 4096), (1024, 1024)), "3D": ((64, 1024, 1024), (32, 256, 256))}
    else:
        steps, n_tiles = 500, 20
        volumes = {"2D": ((16384, 16384), (1024, 1024)), "3D": ((256, 2048, 2048), (32, 256, 256))}
    steps = args.steps or steps
    parts = set(args.parts.split(","))
    gpus: list[str | None] = (["1", "all"] if len(visible_gpus()) > 1 else ["1"]) if cuda else [None]
    filters = 8 if args.smoke else args.filters
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        tmp = Path(d)
        if parts & {"train", "precision"}:
            model2 = part_train(rep, tmp, str(device), steps, filters, amp_too="train" in parts)
        else:
            model2 = random_model(tmp / "m2.qs", 2, depth=2, filters=filters, batch_norm=False)
        if "precision" in parts:
            part_precision(rep, model2, device, ["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
        model3 = random_model(tmp / "m3.qs", 3, depth=2, filters=filters, batch_norm=False)
        raw = part_raw(rep, model2, device, {k: (s, c, model3) for k, (s, c) in volumes.items()}, n_tiles) if parts & {"raw", "pipeline"} else {}
        if "pipeline" in parts:
            part_pipeline(rep, model3, model2, tmp, volumes, gpus, raw)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
