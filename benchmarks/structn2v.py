"""N2V against structN2V on a real image with noise correlated along x.

Run with the project's venv (about 10-15 minutes on a shared 2-core CPU)::

    .venv/bin/python -m benchmarks.structn2v [--steps 1200] [--seeds 0 1] [--quick]

Data: a centre crop of BPAE actin (shared/data/bpae, CC-BY-4.0; high SNR, used as the clean
image), scaled to ``--peak`` photons, then camera noise in ADU::

    noisy = gain * Poisson(s) + offset + N(0, read_sigma**2) + structured

where ``structured`` is white noise averaged over a 5-pixel box along x (correlated up to
4 pixels away), rescaled to ``--struct-sigma`` ADU.

The structN2V mask is the one ``inspect-noise`` recommends on the noisy image (the analysis
runs first, on the image alone). Both methods get the same budget: same network, patch,
batch, steps, learning rate and seed; only the mask differs. Each row goes through the real
pipeline (``train_model`` on a TIFF, prediction of the whole crop in one reflect-padded tile).

Metrics: PSNR against the clean image (data range of the clean image, in ADU, no fitting),
and the lag-1 autocorrelation along y and x of ``prediction - clean`` (what the denoiser
got wrong: structured noise copied into the prediction shows as excess correlation along x)
and of ``noisy - prediction`` (the residual: for a good denoiser it keeps the noise's own
correlation; a residual whiter than the noise along x means the correlated noise stayed in
the prediction). Results go to ``benchmarks/results/structn2v.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from scipy import ndimage

from benchmarks.harness import RESULTS, fmt_mean_sem, machine, markdown_table, mean_and_sem, psnr_db, train, write_json
from quietscope.inference import method_halo, predict_tile, predict_whole
from quietscope.io import open_image
from quietscope.io.sample_data import real_clean_2d
from quietscope.methods.modelfile import load_model
from quietscope.methods.struct_mask import parse_struct_mask, struct_mask
from quietscope.noise_analysis import analyse_noise, noise_autocorrelation, residual_quality

log = logging.getLogger("structn2v")


def make_noisy(
    clean: np.ndarray,
    rng: np.random.Generator,
    peak: float,
    gain: float,
    offset: float,
    read_sigma: float,
    struct_sigma: float,
    box: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale ``clean`` to photons and add Poisson, Gaussian and x-correlated noise.

    Returns
    -------
    tuple of numpy.ndarray
        ``(clean_adu, noisy_adu, structured)``, float32: the noise-free image in ADU, the
        noisy image, and the structured noise component alone.
    """
    lo, hi = np.percentile(clean, [0.1, 99.9])
    photons = np.clip((clean - lo) / (hi - lo), 0, None) * peak
    structured = ndimage.uniform_filter1d(rng.normal(size=clean.shape), box, axis=-1, mode="reflect")
    structured *= struct_sigma / structured.std()
    noisy = gain * rng.poisson(photons) + offset + rng.normal(0, read_sigma, clean.shape) + structured
    clean_adu = gain * photons + offset
    return clean_adu.astype(np.float32), noisy.astype(np.float32), structured.astype(np.float32)


def lag1(a: np.ndarray) -> dict[str, float]:
    """Lag-1 autocorrelation of ``a`` along y and x (mean of both signs)."""
    acf = noise_autocorrelation([np.asarray(a, np.float64)], max_lag=1)
    return {"y": float(acf[2, 1]), "x": float(acf[1, 2])}


def structured_kept(error: np.ndarray, structured: np.ndarray) -> float | None:
    """Regression coefficient of the prediction error on the structured noise component."""
    st = structured.astype(np.float64) - structured.mean()
    denom = float(np.sum(st * st))
    return float(np.sum((error - error.mean()) * st) / denom) if denom > 0 else None


def train_and_predict(
    tif: Path, work: Path, name: str, struct: list[list[int]] | None, args: argparse.Namespace, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Train one model through ``train_model`` and predict the whole crop in one tile."""
    options: dict[str, Any] = {"method": "n2v", "net": {"depth": args.depth, "filters": args.filters}}
    if struct is not None:
        options["struct_mask"] = struct
    train_options = {
        "patch": (args.patch,), "batch": args.batch, "steps": args.steps, "lr": args.lr, "seed": seed,
        "val_fraction": 0.1, "device": "cpu",
    }
    model = work / f"{name}_s{seed}.qs"
    trained = train(tif, model, options, train_options)
    res, seconds = trained.result, trained.seconds
    method, _ = load_model(model)
    image = open_image(tif).read_tc(0, (slice(None), slice(None))).astype(np.float32)
    pred = predict_whole(lambda t: predict_tile(method, t), image, method_halo(method), method.downsampling_factor)[0]
    return pred, {"train_seconds": seconds, "best_val_loss": res.best_val, "steps_run": len(res.history)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=192, help="crop edge (pixels)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--filters", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--peak", type=float, default=40.0, help="photons at the bright end (99.9th percentile)")
    p.add_argument("--gain", type=float, default=2.0, help="ADU per photon")
    p.add_argument("--offset", type=float, default=100.0)
    p.add_argument("--read-sigma", type=float, default=3.0)
    p.add_argument("--struct-sigma", type=float, default=8.0, help="std of the x-correlated noise (ADU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke test: 30 steps, one seed")
    p.add_argument("--out", default=str(RESULTS / "structn2v.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 30, [0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy_logger in ("quietscope", "matplotlib", "PIL"):
        logging.getLogger(noisy_logger).setLevel(logging.WARNING)

    torch.set_num_threads(args.threads)
    real = real_clean_2d(args.size)
    if real is None:
        print("shared/data/bpae is absent: this benchmark needs the real BPAE image; nothing to do")
        return 1
    clean_raw, source = real
    rng = np.random.default_rng(1234)
    clean, noisy, structured = make_noisy(
        clean_raw, rng, args.peak, args.gain, args.offset, args.read_sigma, args.struct_sigma
    )
    data_range = float(clean.max() - clean.min())  # the range score() takes from clean
    report = analyse_noise([noisy])
    spec = report.options[report.options.index("--struct-mask") + 1] if "--struct-mask" in report.options else "x:9"
    axis, length = parse_struct_mask(spec, "yx")
    kernel = struct_mask(2, axis, length).astype(int).tolist()
    log.info("inspect-noise recommends: %s", " ".join(report.options))

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tif = work / "noisy.tif"
        tifffile.imwrite(tif, noisy)
        for seed in args.seeds:
            for name, struct in (("n2v", None), (f"structn2v {spec}", kernel)):
                pred, info = train_and_predict(tif, work, name.split()[0], struct, args, seed)
                rq = residual_quality(noisy, pred)
                row = {
                    "method": name,
                    "seed": seed,
                    "psnr_db": psnr_db(pred, clean),
                    "error_lag1": lag1(pred - clean),
                    # Direct measure of structured noise left behind (simulation only): the
                    # least-squares share of the structured component in the prediction error
                    # (1 = copied whole, 0 = none of it).
                    "structured_kept": structured_kept(pred - clean, structured),
                    "residual_lag1": rq.lag1,
                    "residual_signal_correlation": rq.signal_correlation,
                    **info,
                }
                rows.append(row)
                log.info(
                    "%s seed %d: PSNR %.2f dB, error lag-1 x %+.3f y %+.3f, residual lag-1 x %+.3f (%.0f s)",
                    name, seed, row["psnr_db"], row["error_lag1"]["x"], row["error_lag1"]["y"],
                    rq.lag1["x"], info["train_seconds"],
                )
                write_json(args.out, _summary(args, source, spec, report, noisy, clean, structured, data_range, rows))
    summary = _summary(args, source, spec, report, noisy, clean, structured, data_range, rows)
    write_json(args.out, summary)
    print(summary["table"])
    print(summary["verdict"])
    return 0


def _summary(args, source, spec, report, noisy, clean, structured, data_range, rows) -> dict[str, Any]:
    names = list(dict.fromkeys(r["method"] for r in rows))
    agg: dict[str, Any] = {}
    table_rows = [[
        "noisy input", fmt_mean_sem(psnr_db(noisy, clean), None), "–", "–",
        f"{lag1(noisy - clean)['x']:+.3f} / {lag1(noisy - clean)['y']:+.3f}", "1.000" if structured.std() > 0 else "–", "–",
    ]]
    for n in names:
        rs = [r for r in rows if r["method"] == n]
        m, s = mean_and_sem([r["psnr_db"] for r in rs])
        ex = np.mean([r["error_lag1"]["x"] for r in rs])
        ey = np.mean([r["error_lag1"]["y"] for r in rs])
        rx = np.mean([r["residual_lag1"]["x"] for r in rs])
        ry = np.mean([r["residual_lag1"]["y"] for r in rs])
        kept = [r["structured_kept"] for r in rs if r.get("structured_kept") is not None]
        km = float(np.mean(kept)) if kept else None
        agg[n] = {"psnr_mean": m, "psnr_sem": s, "n_seeds": len(rs), "error_lag1_x": ex, "error_lag1_y": ey,
                  "residual_lag1_x": rx, "residual_lag1_y": ry, "structured_kept": km}
        table_rows.append([n, fmt_mean_sem(m, s), f"{ex:+.3f}", f"{ey:+.3f}", f"{rx:+.3f} / {ry:+.3f}",
                           "–" if km is None else f"{km:.3f}", f"{np.mean([r['train_seconds'] for r in rs]):.0f}"])
    header = ["method", "PSNR (dB)", "error lag-1 x", "error lag-1 y", "residual lag-1 x / y",
              "structured noise kept", "train s"]
    table = markdown_table(header, table_rows)
    verdict = ""
    if len(names) == 2:
        gain_db = agg[names[1]]["psnr_mean"] - agg[names[0]]["psnr_mean"]
        ex_s = agg[names[1]]["error_lag1_x"] - agg[names[1]]["error_lag1_y"]
        verdict = (
            f"structN2V - N2V: {gain_db:+.2f} dB (target >= +1 dB: {'met' if gain_db >= 1 else 'MISSED'}); "
            f"structN2V error lag-1 x minus y (structured noise left): {ex_s:+.3f} "
            f"(target < 0.05: {'met' if ex_s < 0.05 else 'MISSED'})"
        )
    return {
        "benchmark": "structn2v",
        "machine": machine(),
        "data": {
            "source": source, "size": args.size, "peak_photons": args.peak, "gain": args.gain,
            "offset": args.offset, "read_sigma": args.read_sigma, "struct_sigma": args.struct_sigma,
            "struct_box": 5, "noise_seed": 1234,
            "noise_lag1": lag1(noisy - clean), "structured_lag1": lag1(structured) if structured.std() > 0 else None,
        },
        "inspect_noise": {"options": report.options, "mask": spec, "structure": report.structure.to_dict()},
        "budget": {"steps": args.steps, "batch": args.batch, "patch": args.patch, "depth": args.depth,
                   "filters": args.filters, "lr": args.lr, "seeds": args.seeds, "threads": args.threads},
        "rows": rows,
        "aggregate": agg,
        "table": table,
        "verdict": verdict,
    }


if __name__ == "__main__":
    sys.exit(main())
