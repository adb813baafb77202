"""How much can the centre pixel add at low photon counts? An oracle bound for bayes-poisson.

    .venv/bin/python benchmarks/centre_pixel.py [--workdir /tmp/quietscope-bench-quality]

Reads the bayes-poisson and N2V models/outputs that ``benchmarks/quality.py --sections photon``
left in its work directory (run that first) and, for each photon level and seed, reports PSNR of:

* ``prior``: the Gamma prior mean alpha/beta, a pure blind-spot estimate (never sees the pixel);
* ``posterior``: bayes-poisson's output (alpha + x) / (beta + 1), the pixel folded back in;
* ``oracle fold-in``: the best any estimate of the form ``prior + w * (x - prior)`` can do with
  the same prior, choosing ``w`` per pixel *knowing the clean value*: expected MSE
  ``e^2 lambda / (e^2 + lambda)`` with ``e`` the prior's error and ``lambda`` the Poisson variance.
  The Poisson/Gamma posterior mean is of this form, so no Gamma prior with this mean beats it;
* ``n2v``: the N2V row of the same run, for the issue's target (bayes-poisson >= N2V + 1 dB).

The oracle gain over the prior is the most the centre pixel is worth at that photon count.
Writes ``benchmarks/results/centre_pixel.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fmt_mean_sem, machine, write_json  # noqa: E402


def ms(values: list[float], signed: bool = False) -> str:
    """``mean ± standard error`` of a list (``+`` sign shown when ``signed``)."""
    if not values:
        return "–"
    v = np.asarray(values, dtype=float)
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
    text = fmt_mean_sem(float(v.mean()), sem)
    return ("+" + text) if signed and v.mean() >= 0 else text


def psnr_from_mse(mse: float, data_range: float) -> float:
    return float(10 * np.log10(data_range**2 / mse))


def analyse(d: Path, seed: int) -> dict[str, float] | None:
    import torch
    import zarr

    from quietscope.modelfile import load_model

    model_path, n2v_out = d / f"bayes-poisson_s{seed}.qs", d / f"n2v_s{seed}.ome.zarr"
    if not model_path.exists():
        return None
    clean = np.load(d / "clean.npy").astype(np.float64)
    noisy = np.load(d / "noisy.npy").astype(np.float32)
    rng = float(clean.max() - clean.min())
    method, _ = load_model(model_path)
    method.eval()
    with torch.no_grad():
        x = torch.from_numpy(noisy)[None, None]
        alpha, beta = (t[0, 0].double() for t in method.prior_parameters(x))
        post = method.predict(x)[0, 0].double().numpy()
    prior = method.from_photons(alpha / beta).numpy()
    # The benchmark's photon data are in photons (gain 1): lambda is the clean image itself.
    lam = np.maximum(method.to_photons(torch.from_numpy(clean)).numpy(), 0.0)
    e2 = (method.to_photons(torch.from_numpy(prior)).numpy() - lam) ** 2
    oracle_mse = float(np.mean(e2 * lam / np.maximum(e2 + lam, 1e-12))) * float(method.gain) ** 2
    row = {
        "seed": seed,
        "prior": psnr_from_mse(float(np.mean((prior - clean) ** 2)), rng),
        "posterior": psnr_from_mse(float(np.mean((post - clean) ** 2)), rng),
        "oracle_fold_in": psnr_from_mse(oracle_mse, rng),
    }
    if n2v_out.exists():
        n2v = np.asarray(zarr.open_array(store=str(n2v_out / "0"), mode="r")[...], dtype=np.float64).reshape(clean.shape)
        row["n2v"] = psnr_from_mse(float(np.mean((n2v - clean) ** 2)), rng)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/quietscope-bench-quality", help="quality.py's --workdir")
    ap.add_argument("--output", default=str(RESULTS / "centre_pixel.json"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    levels = sorted((p for p in work.glob("photon-peak*") if p.is_dir()), key=lambda p: int(p.name.split("peak")[1]))
    if not levels:
        print(f"no photon-peak* folders in {work}: run benchmarks/quality.py --sections photon first", file=sys.stderr)
        return 2
    report: dict = {"machine": machine(), "workdir": str(work), "levels": {}}
    header = ("| photons (peak) | N2V | bayes prior (blind) | bayes posterior | oracle fold-in (bound) "
              "| centre pixel: learned / oracle gain | bayes − N2V |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for d in levels:
        rows = [r for s in range(10) if (r := analyse(d, s)) is not None]
        report["levels"][d.name] = rows
        col = {k: [r[k] for r in rows if k in r] for k in ("n2v", "prior", "posterior", "oracle_fold_in")}
        learned = [r["posterior"] - r["prior"] for r in rows]
        oracle = [r["oracle_fold_in"] - r["prior"] for r in rows]
        vs_n2v = [r["posterior"] - r["n2v"] for r in rows if "n2v" in r]
        lines.append(f"| {d.name.split('peak')[1]} | {ms(col['n2v'])} | {ms(col['prior'])} "
                     f"| {ms(col['posterior'])} | {ms(col['oracle_fold_in'])} "
                     f"| {ms(learned, True)} / {ms(oracle, True)} | {ms(vs_n2v, True)} |")
    text = "\n".join(lines)
    print(text)
    report["table"] = text
    write_json(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
