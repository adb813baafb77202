"""How far the noise models' variances are from the truth, and how calibrated PN2V's prior is.

No training: reads the models that ``benchmarks.pn2v_field`` and ``benchmarks.quality
--steps 3000`` left in their work folders (BPAE actin, simulated noise, so the true noise
variance ``s / k + sigma_g**2`` is known). Run after them::

    .venv/bin/python -m benchmarks.pn2v_variance [--field /tmp/qs-pn2v-field] [--crop /tmp/qs-q3000] [--seed 0]

Prints, per noise level:

* the variance of each noise model over the true noise variance at a few signal levels:
  bootstrapped from N2V (as fitted in ``pn2v_field.py``), the same with ``--variance-from-data``,
  and the calibrated GMM of ``quality.py`` (also refitted on signal-balanced pairs: at most
  20 000 pairs per 1/32 of the signal range);
* PN2V's prior calibration on the test crop per intensity quintile: the prior mean's squared
  error over the prior samples' variance (1 = calibrated, > 1 = too narrow).

Results go to ``benchmarks/results/pn2v_variance.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import CROP, RESULTS, SIM_LEVELS, bpae_field_noise, machine, write_json
from quietscope.io.reading import open_image
from quietscope.methods.modelfile import load_model
from quietscope.noise_models import (
    fit_gmm,
    load_noise_model,
    match_variance_line,
    pairs_from_calibration,
    pairs_from_prediction,
)
from quietscope.workflows.noise_model import data_variance_line

PROBE = np.array([300.0, 1500.0, 3000.0, 5000.0, 8000.0])


def truth(level: str) -> tuple[np.ndarray, float, float, tuple[int, int]]:
    """Clean field, true gain and intercept of the noise variance line, crop origin."""
    img, origin, scale, gauss_std = bpae_field_noise(level)
    return img, 1.0 / scale, gauss_std**2, origin


def var_ratio(nm: Any, a: float, b: float) -> list[float]:
    _, sd = nm.mean_std(PROBE)
    return [float(v) for v in sd**2 / (a * PROBE + b)]


def prior_calibration(model_path: Path, noisy: np.ndarray, clean: np.ndarray) -> list[dict[str, float]]:
    method, _ = load_model(model_path)
    pad = 32
    x = np.pad(noisy.astype(np.float32), pad, mode="reflect")
    with torch.no_grad():
        samples = method._samples(method.normalize(torch.from_numpy(x)[None, None]))[0, 0].numpy()
    samples = samples[:, pad:-pad, pad:-pad]
    mean, var = samples.mean(0), samples.var(0)
    err2 = (mean - clean) ** 2
    edges = np.quantile(clean, np.linspace(0, 1, 6))
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (clean >= lo) & (clean <= hi)
        out.append({"signal": float(clean[sel].mean()), "err2": float(err2[sel].mean()), "prior_var": float(var[sel].mean()),
                    "ratio": float(err2[sel].mean() / var[sel].mean())})
    return out


def balanced(s: np.ndarray, x: np.ndarray, per_bin: int = 20_000, bins: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    edges = np.linspace(s.min(), s.max(), bins + 1)
    idx = np.clip(np.digitize(s, edges) - 1, 0, bins - 1)
    keep = [rng.choice(w, min(w.size, per_bin), replace=False) for w in (np.flatnonzero(idx == i) for i in range(bins)) if w.size]
    keep = np.concatenate(keep)
    return s[keep], x[keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default="/tmp/qs-pn2v-field", help="work folder of benchmarks.pn2v_field")
    ap.add_argument("--crop", default="/tmp/qs-q3000", help="work folder of quality.py --steps 3000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(RESULTS / "pn2v_variance.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": machine(), "probe_signals": PROBE.tolist(), "levels": {}}
    seed = args.seed
    for level in SIM_LEVELS:
        img, a, b, (cy, cx) = truth(level)
        clean = img[cy:cy + CROP, cx:cx + CROP]
        rec: dict[str, Any] = {"true_gain": a, "true_intercept": b}
        field = Path(args.field) / level
        if (field / f"n2v_s{seed}.ome.zarr").exists():
            x = np.asarray(open_image(str(field / "field.ome.zarr")).array).astype(np.float32)
            pred = np.asarray(open_image(str(field / f"n2v_s{seed}.ome.zarr")).array).squeeze()
            s_b, x_b = pairs_from_prediction(pred, x)
            rec["bootstrapped"] = var_ratio(fit_gmm(s_b, x_b, seed=seed), a, b)
            gain, intercept = data_variance_line(str(field / "field.ome.zarr"), seed=seed)
            rec["data_line"] = {"gain": gain, "intercept": intercept}
            rec["variance_from_data"] = var_ratio(fit_gmm(s_b, match_variance_line(s_b, x_b, gain, intercept)[0], seed=seed), a, b)
            for name in (f"pn2v_boot_s{seed}", f"pn2v_vfd_s{seed}"):
                if (field / f"{name}.qs").exists():
                    rec[f"prior_{name}"] = prior_calibration(field / f"{name}.qs", x[cy:cy + CROP, cx:cx + CROP], clean)
        crop = Path(args.crop) / f"bpae-actin_{level}"
        if (crop / "calibration.npy").exists():
            s_c, x_c = pairs_from_calibration(np.load(crop / "calibration.npy"))
            rec["calibrated_pairs_below_1000"] = float(np.mean(s_c < 1000))
            rec["calibrated"] = var_ratio(load_noise_model(crop / "nm_gmm.json"), a, b)
            rec["calibrated_balanced_refit"] = var_ratio(fit_gmm(*balanced(s_c, x_c, seed=seed), seed=seed), a, b)
            if (crop / f"pn2v_gmm_s{seed}.qs").exists():
                rec[f"prior_pn2v_calibrated_s{seed}"] = prior_calibration(
                    crop / f"pn2v_gmm_s{seed}.qs", np.load(crop / "noisy.npy"), np.load(crop / "clean.npy"))
        result["levels"][level] = rec
        print(f"== {level}: noise-model variance / true at s = {PROBE.astype(int).tolist()}")
        for key in ("bootstrapped", "variance_from_data", "calibrated", "calibrated_balanced_refit"):
            if key in rec:
                print(f"  {key:28s} " + " ".join(f"{v:5.2f}" for v in rec[key]))
        for key, rows in rec.items():
            if key.startswith("prior_"):
                print(f"  {key}: prior error² / variance by quintile " + " ".join(f"{r['ratio']:.2f}" for r in rows))
    write_json(args.output, result)
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
