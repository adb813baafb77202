"""How much any centre-pixel fold-in can add to N2V, measured with the ground truth (issue 20).

PN2V's posterior mean improves on a blind-spot prediction by folding each pixel's own noisy value
back in. Whatever its noise model, it is a function of what the network saw (its prior) and of
that value. This script bounds the gain from above with an oracle that no self-supervised method
can beat by much: with the clean image, it fits the best estimator of the signal from the pair
``(mu, x)`` (N2V's prediction and the pixel's noisy value), as a table of conditional means over
bins of both, on one half of the data, and scores it on the other half (2-fold). Three oracles:

* ``remap``: ``mu + E[s - mu | mu]``, no fold-in, only a recalibration of N2V's values;
* ``linear``: ``mu + a(mu) (x - mu) + b(mu)``, the best shrinkage per level of ``mu``
  (a Gaussian prior and Gaussian noise give this form);
* ``table``: ``mu + E[s - mu | mu, x - mu]``, the best function of the pair, whatever the noise
  (up to the bins' width).

The fold-in's ceiling is the better of ``linear`` and ``table`` less ``remap``. Beside it: what a
fold-in would add if N2V ignored the pixel (``independent_fold_in_db``, Gaussian errors), and the
pixel's weight in N2V's own prediction (``n2v_centre_weight``, :func:`centre_weight`): N2V sees the
pixel at prediction, so part of the fold-in may be done already. PN2V's posterior also sees its prior's width per
pixel, which ``mu`` alone does not carry, so the ceiling is approximate, not strict; but a
method whose ceiling is below the target cannot reach it by tuning its noise model.

Data and N2V as in ``benchmarks/pn2v_boot.py`` (same network, budget and options; the N2V
models are reused from its ``--workdir`` layout when present). PSNR after an affine fit per field.

Usage::

    QS_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.fold_in_ceiling --steps 1000 --seeds 0 \
        --datasets w2s-ch0 w2s-ch1 w2s-ch2 bpae --workdir /tmp/qs-fold-in

Prints a table and writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
from benchmarks.common import RESULTS, machine, markdown_table, write_json
from benchmarks.harness import field_psnr, make_data, predict_array, train_options


def signal_in_data_units(noisy: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per field, the clean image mapped affinely onto the noisy one (least squares)."""
    out = np.empty(clean.shape, np.float64)
    for i, (n, c) in enumerate(zip(noisy, clean)):
        a, b = np.polyfit(c.ravel().astype(np.float64), n.ravel().astype(np.float64), 1)
        out[i] = a * c + b
    return out


def _edges(v: np.ndarray, n: int) -> np.ndarray:
    return np.unique(np.quantile(v, np.linspace(0, 1, n + 1)[1:-1]))


def fit_oracles(mu: np.ndarray, x: np.ndarray, s: np.ndarray, n_mu: int = 64, n_x: int = 96) -> dict[str, Any]:
    """Conditional-mean tables of ``s - mu`` over bins of ``mu`` (and of ``x``), and per-bin shrinkage."""
    mu, x, r = mu.ravel(), x.ravel(), (s - mu).ravel()
    # Bins of x - mu, not of x: the fold-in acts on the innovation, and binning it loses less.
    e_mu, e_x = _edges(mu, n_mu), _edges(x - mu, n_x)
    i_mu, i_x = np.searchsorted(e_mu, mu), np.searchsorted(e_x, x - mu)
    m, k = len(e_mu) + 1, len(e_x) + 1
    cnt1 = np.bincount(i_mu, minlength=m)
    remap = np.bincount(i_mu, r, minlength=m) / np.maximum(cnt1, 1)
    idx = i_mu * k + i_x
    cnt2 = np.bincount(idx, minlength=m * k)
    table = np.bincount(idx, r, minlength=m * k) / np.maximum(cnt2, 1)
    table = np.where(cnt2 >= 20, table, np.repeat(remap, k))  # thin cells: fall back to the remap
    d = x - mu
    lin = np.zeros((m, 2))
    for b in range(m):
        sel = i_mu == b
        if sel.sum() >= 20:
            lin[b] = np.linalg.lstsq(np.c_[d[sel], np.ones(sel.sum())], r[sel], rcond=None)[0]
        else:
            lin[b] = (0.0, remap[b])
    return {"e_mu": e_mu, "e_x": e_x, "remap": remap, "table": table.reshape(m, k), "linear": lin}


def apply_oracles(o: dict[str, Any], mu: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    i_mu, i_x = np.searchsorted(o["e_mu"], mu), np.searchsorted(o["e_x"], x - mu)
    a, b = o["linear"][i_mu, 0], o["linear"][i_mu, 1]
    return {"remap": mu + o["remap"][i_mu], "linear": mu + a * (x - mu) + b, "table": mu + o["table"][i_mu, i_x]}


def halves(n_fields: int, shape: tuple[int, ...]) -> list[tuple[Any, Any]]:
    """Two (fit, score) splits: by fields when there are several, else by the left/right halves."""
    if n_fields > 1:
        a = np.arange(n_fields) < n_fields // 2
        return [(a, ~a), (~a, a)]
    cols = np.arange(shape[-1]) < shape[-1] // 2
    return [(np.s_[..., cols], np.s_[..., ~cols]), (np.s_[..., ~cols], np.s_[..., cols])]


def centre_weight(model: Path, field: np.ndarray, delta: float, spacing: int = 32) -> float:
    """How much N2V's prediction at a pixel moves with that pixel's own value: ``d mu_i / d x_i``.

    N2V is trained blind to the centre pixel, but at prediction it sees it, and nothing stops it
    from using it a little. Measured by adding ``±delta`` at a grid of pixels ``spacing`` apart
    (farther than the weights that matter, so the bumps barely see each other) and averaging
    the response at those pixels over both signs (which cancels the second-order term).
    """
    import torch

    from quietscope.methods.modelfile import load_model

    method, _ = load_model(str(model))
    method.eval()
    x = np.ascontiguousarray(field, np.float32)
    c = spacing // 2

    def run(a: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return method.predict(torch.from_numpy(a)[None, None])[0, 0].numpy().astype(np.float64)

    base, out = run(x), []
    for d in (delta, -delta):
        bumped = x.copy()
        bumped[c::spacing, c::spacing] += d
        out.append(float(np.mean((run(bumped) - base)[c::spacing, c::spacing]) / d))
    return float(np.mean(out))


def measure(name: str, work: Path, steps: int, seed: int) -> dict[str, Any]:
    from quietscope.io.reading import open_image
    from quietscope.workflows.train import train_model

    info = make_data(work, name)
    d = Path(info["dir"])
    clean, src = np.load(d / "clean.npy").astype(np.float64), d / "noisy.ome.zarr"
    noisy = np.asarray(open_image(str(src)).array).reshape(clean.shape).astype(np.float64)
    model = d / f"n2v_s{seed}_steps{steps}.qs"
    if not model.exists():
        method, tr = train_options(steps, seed)
        train_model(str(src), model, {**method, "method": "n2v"}, tr, overwrite=True, progress=False)
    mu = predict_array(model, src, d / f"p_n2v_s{seed}.ome.zarr").reshape(clean.shape).astype(np.float64)
    s = signal_in_data_units(noisy, clean)
    row: dict[str, Any] = {"dataset": name, "seed": seed, "steps": steps, "noisy": field_psnr(noisy, clean),
                           "n2v": field_psnr(mu, clean)}
    scores: dict[str, list[float]] = {"n2v": [], "remap": [], "linear": [], "table": []}
    for fit, held in halves(clean.shape[0], clean.shape):
        o = fit_oracles(mu[fit], noisy[fit], s[fit])
        est = apply_oracles(o, mu[held], noisy[held])
        c = clean[held]
        scores["n2v"].append(field_psnr(mu[held], c))
        for k, v in est.items():
            scores[k].append(field_psnr(v, c))
    for k in ("remap", "linear", "table"):  # the held-out halves' mean, against N2V on the same halves
        row[f"{k}_gain_db"] = float(np.mean(scores[k]) - np.mean(scores["n2v"]))
    row["fold_in_ceiling_db"] = max(row["table_gain_db"], row["linear_gain_db"]) - row["remap_gain_db"]
    # How much of the noise N2V leaves: its error variance against the noise variance, in data units.
    row["n2v_error_over_noise"] = float(np.mean((mu - s) ** 2) / np.mean((noisy - s) ** 2))
    # What a fold-in would add if N2V ignored the pixel and errors were Gaussian: e n / (e + n).
    row["independent_fold_in_db"] = float(10 * np.log10(1 + row["n2v_error_over_noise"]))
    # The pixel's weight in N2V's own prediction, and the weight a Gaussian fold-in would give it.
    row["n2v_centre_weight"] = centre_weight(model, noisy[0], float(np.std(noisy[0] - mu[0])))
    row["optimal_centre_weight"] = row["n2v_error_over_noise"] / (1 + row["n2v_error_over_noise"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--datasets", nargs="+", default=["w2s-ch0", "w2s-ch1", "w2s-ch2", "bpae"])
    ap.add_argument("--workdir", default="/tmp/qs-fold-in")
    ap.add_argument("--output", default=str(RESULTS / "fold_in_ceiling.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("QS_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            rows.append(measure(name, Path(args.workdir), args.steps, seed))
            write_json(Path(args.output), {"machine": machine(), "rows": rows})
            print(rows[-1], flush=True)
    cols = ["dataset", "seed", "noisy", "n2v", "n2v_error_over_noise", "n2v_centre_weight", "optimal_centre_weight",
            "independent_fold_in_db", "remap_gain_db", "linear_gain_db", "table_gain_db", "fold_in_ceiling_db"]
    print(markdown_table(cols, [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]))
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
