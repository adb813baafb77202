"""Can the splitting network split at all? A probe with *clean* targets.

    QS_THREADS=1 .venv/bin/python -m benchmarks.split_probe [--steps 1500]

``benchmarks.split`` found that after 1500 steps neither denoiSplit nor μSplit separates BPAE
actin from mito (their two outputs correlate > 0.96). This probe removes the noise from the
question: it trains on the *clean* training field of the same two stains (same crop, patch 64,
batch 8, same ladder VAE as split.py) and predicts the clean superimposed test field, for

* μSplit as configured by default (Gaussian likelihood with learned per-pixel variance),
* μSplit with the KL weighted 0.01,
* μSplit with a fixed variance (``gaussian_logvar=0``: a mean-squared error),
* a plain U-Net (depth 2, 16 filters) trained with a mean-squared error (no latents at all).

For each it reports the correlation between the two predicted channels (the clean stains
correlate 0.55 on this field; ~1 means "no split") and of each output with each clean stain.
Writes ``benchmarks/results/split_probe.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import (
    RESULTS,
    SPLIT_DATA,
    SPLIT_NET,
    SPLIT_TEST,
    SPLIT_TRAIN,
    machine,
    split_clean,
    split_predict,
    split_scores,
    split_train,
    write_tif,
)
from quietscope.nets.unet import UNet

VARIANTS = {
    "musplit (learned variance)": {},
    "musplit, KL weight 0.01": {"kl_weight": 0.01},
    "musplit, fixed variance": {"gaussian_logvar": 0.0},
}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def summarise(out: np.ndarray, gt: np.ndarray, seconds: float) -> dict:
    return {
        "corr_outputs": round(corr(out[0], out[1]), 3),
        "corr_out0_actin_mito": [round(corr(out[0], gt[0]), 3), round(corr(out[0], gt[1]), 3)],
        "corr_out1_actin_mito": [round(corr(out[1], gt[0]), 3), round(corr(out[1], gt[1]), 3)],
        **split_scores(out[:2], gt),
        "train_seconds": round(seconds, 1),
    }


def unet_split(train: np.ndarray, test_sum: np.ndarray, steps: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Supervised U-Net: normalised sum in, normalised channels out, MSE, Adam 1e-3, batch 8 of 64²."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m, s = train.mean(axis=(1, 2)), train.std(axis=(1, 2))
    sm, ss = train.sum(0).mean(), train.sum(0).std()
    net = UNet(2, 1, 2, depth=2, filters=16)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        ys = rng.integers(0, train.shape[1] - 64, 8)
        xs = rng.integers(0, train.shape[2] - 64, 8)
        p = np.stack([train[:, y : y + 64, x : x + 64] for y, x in zip(ys, xs)])
        inp = torch.from_numpy(((p.sum(1, keepdims=True) - sm) / ss).astype(np.float32))
        tgt = torch.from_numpy(((p - m[None, :, None, None]) / s[None, :, None, None]).astype(np.float32))
        loss = ((net(inp) - tgt) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net(torch.from_numpy(((test_sum - sm) / ss).astype(np.float32))[None, None])[0].numpy()
    return out * s[:, None, None] + m[:, None, None], time.perf_counter() - t0


def main() -> int:
    if not SPLIT_DATA.exists():
        print(f"skipping: {SPLIT_DATA} not found (see ../shared/data/README.md)")
        return 0
    torch.set_num_threads(int(os.environ.get("QS_THREADS", "2")))
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 1500
    clean = split_clean()
    train = clean[(slice(None),) + SPLIT_TRAIN]
    test = clean[(slice(None),) + SPLIT_TEST]
    report = {"machine": machine(), "steps": steps, "clean_corr_actin_mito": round(corr(test[0], test[1]), 3), "rows": {}}
    out_path = RESULTS / "split_probe.json"
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        files = [write_tif(w / f"c{i}.tif", train[i]) for i in range(2)]
        test_in = write_tif(w / "test.tif", test.sum(0))
        for name, extra in VARIANTS.items():
            model = w / "m.qs"
            sec = split_train(files, model, {"method": "musplit", **SPLIT_NET, **extra}, steps)
            out = split_predict(str(model), test_in, w / "out.ome.zarr", inference={"n_samples": 0})
            report["rows"][name] = summarise(out, test, sec)
            print(name, report["rows"][name], flush=True)
            out_path.write_text(json.dumps(report, indent=2))
        out, sec = unet_split(train, test.sum(0), steps)
        report["rows"]["plain U-Net, MSE"] = summarise(out, test, sec)
        print("plain U-Net, MSE", report["rows"]["plain U-Net, MSE"], flush=True)
    out_path.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
