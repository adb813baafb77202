"""How much can the centre pixel add? Oracle bounds for bayes-poisson and for PN2V.

    .venv/bin/python -m benchmarks.centre_pixel [--workdir /tmp/quietscope-bench-quality] [--section photon|sim]

Reads the bayes-poisson and N2V models/outputs that ``benchmarks.quality --sections photon``
left in its work directory (run that first) and, for each photon level and seed, reports PSNR of:

* ``prior``: the Gamma prior mean alpha/beta, a pure blind-spot estimate (never sees the pixel);
* ``posterior``: bayes-poisson's output (alpha + x) / (beta + 1), the pixel folded back in;
* ``oracle fold-in``: the best any estimate of the form ``prior + w * (x - prior)`` can do with
  the same prior, choosing ``w`` per pixel *knowing the clean value*: expected MSE
  ``e^2 lambda / (e^2 + lambda)`` with ``e`` the prior's error and ``lambda`` the Poisson variance.
  The Poisson/Gamma posterior mean is of this form, so no Gamma prior with this mean beats it;
* ``binned fold-in``: the best ``prior + w * (x - prior)`` with one ``w`` per bin of the prior's
  value, fitted knowing the clean image (:func:`benchmarks.harness.binned_fold_in_mse`): a weight that depends on
  what a model sees, so a bound a learned fold-in can approach, unlike the per-pixel oracle,
  which needs each pixel's own error;
* ``n2v``: the N2V row of the same run, for the issue's target (bayes-poisson >= N2V + 1 dB).

The oracle gain over the prior is the most the centre pixel is worth at that photon count; the
binned gain is what a fold-in driven by intensity can reach.

``--section sim`` asks the same of PN2V on the simulated Poisson+Gaussian BPAE datasets: the prior
is N2V's prediction (a blind-spot estimate), the noise variance ``v(s) = a s + b`` is measured on
the dataset's 30 calibration realisations, and the oracle fold-in ``prior + w (x - prior)`` with
the best per-pixel ``w`` has expected MSE ``e^2 v / (e^2 + v)``. PN2V's MMSE estimate is such a
fold-in of its own prior, so the oracle gain over N2V bounds what the centre pixel can add to an
N2V-quality prior; PN2V's own prior (``--estimate prior``) is scored too, to split its gain into
"better prior" and "centre pixel".
Writes ``benchmarks/results/centre_pixel.json`` (``centre_pixel_sim.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import (
    RESULTS,
    binned_fold_in_mse,
    fmt_mean_sem,
    machine,
    predict,
    psnr_db,
    psnr_from_mse,
    read_output,
    write_json,
)
from quietscope.methods.modelfile import load_model


def ms(values: list[float], signed: bool = False) -> str:
    """``mean ± standard error`` of a list (``+`` sign shown when ``signed``)."""
    if not values:
        return "–"
    v = np.asarray(values, dtype=float)
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
    text = fmt_mean_sem(float(v.mean()), sem)
    return ("+" + text) if signed and v.mean() >= 0 else text


def analyse(d: Path, seed: int) -> dict[str, float] | None:
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
        "prior": psnr_db(prior, clean),
        "posterior": psnr_db(post, clean),
        "oracle_fold_in": psnr_from_mse(oracle_mse, rng),
        "binned_fold_in": psnr_from_mse(binned_fold_in_mse(prior, noisy.astype(np.float64), clean), rng),
    }
    if n2v_out.exists():
        row["n2v"] = psnr_db(read_output(n2v_out), clean)
    return row


def analyse_sim(d: Path, seed: int) -> dict[str, float] | None:
    """N2V prior, PN2V (bootstrapped GMM) prior and MMSE, and the oracle fold-in on N2V."""
    n2v_out, pn2v_model = d / f"n2v_s{seed}.ome.zarr", d / f"pn2v_boot_s{seed}.qs"
    if not n2v_out.exists():
        return None
    clean = np.load(d / "clean.npy").astype(np.float64)
    rng = float(clean.max() - clean.min())
    calib = np.load(d / "calibration.npy").astype(np.float64)  # realisations of the held-out crop
    # Noise variance as a line in the signal (Poisson + Gaussian), from the realisations.
    a, b = np.polyfit(calib.mean(axis=0).ravel(), calib.var(axis=0, ddof=1).ravel(), 1)
    v = np.maximum(a * clean + b, 1e-12)
    n2v = np.asarray(read_output(n2v_out), dtype=np.float64)
    e2 = (n2v - clean) ** 2
    row = {
        "seed": seed,
        "noise_var_line": [float(a), float(b)],
        "n2v": psnr_db(n2v, clean),
        "oracle_fold_in": psnr_from_mse(float(np.mean(e2 * v / (e2 + v))), rng),
        "binned_fold_in": psnr_from_mse(binned_fold_in_mse(n2v, np.load(d / "noisy.npy").astype(np.float64), clean), rng),
    }
    if pn2v_model.exists():
        for est in ("mmse", "prior"):
            out = d / f"centre-pixel_pn2v_{est}_s{seed}.ome.zarr"
            row[f"pn2v_{est}"] = psnr_db(predict(pn2v_model, d / "noisy.ome.zarr", out, inference={"estimate": est}), clean)
    return row


def main_sim(work: Path, output: str) -> int:
    levels = sorted(p for p in work.glob("bpae-*") if p.is_dir() and (p / "calibration.npy").exists())
    if not levels:
        print(f"no bpae-* folders in {work}: run python -m benchmarks.quality --sections sim first", file=sys.stderr)
        return 2
    header = ("| dataset | N2V (blind prior) | PN2V prior (blind) | PN2V MMSE | fold-in on N2V: per-pixel oracle / "
              "weight per intensity bin | gain over N2V: oracle / binned | PN2V − N2V |")

    def cells(d: Path, rows: list[dict]) -> list[str]:
        col = {k: [r[k] for r in rows if k in r] for k in ("n2v", "pn2v_prior", "pn2v_mmse", "oracle_fold_in", "binned_fold_in")}
        oracle = [r["oracle_fold_in"] - r["n2v"] for r in rows]
        binned = [r["binned_fold_in"] - r["n2v"] for r in rows]
        vs_n2v = [r["pn2v_mmse"] - r["n2v"] for r in rows if "pn2v_mmse" in r]
        return [d.name, ms(col["n2v"]), ms(col["pn2v_prior"]), ms(col["pn2v_mmse"]),
                f"{ms(col['oracle_fold_in'])} / {ms(col['binned_fold_in'])}", f"{ms(oracle, True)} / {ms(binned, True)}",
                ms(vs_n2v, True)]

    return write_report(work, levels, analyse_sim, header, cells, output)


def write_report(work: Path, levels: list[Path], analyse_fn, header: str, cells, output: str) -> int:
    """One table row per level folder (``cells(folder, rows)``) over the seeds ``analyse_fn`` finds;
    print the table and write it with every row to ``output``."""
    report: dict = {"machine": machine(), "workdir": str(work), "levels": {}}
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for d in levels:
        rows = [r for s in range(10) if (r := analyse_fn(d, s)) is not None]
        report["levels"][d.name] = rows
        lines.append("| " + " | ".join(cells(d, rows)) + " |")
    text = "\n".join(lines)
    print(text)
    report["table"] = text
    write_json(output, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", nargs="+", default=["/tmp/quietscope-bench-quality"],
                    help="quality.py's --workdir (several: each photon level from the first that has its models)")
    ap.add_argument("--section", choices=["photon", "sim"], default="photon")
    ap.add_argument("--output", default=None, help="default: results/centre_pixel.json (centre_pixel_sim.json)")
    args = ap.parse_args(argv)
    work = Path(args.workdir[0])
    if args.section == "sim":
        return main_sim(work, args.output or str(RESULTS / "centre_pixel_sim.json"))
    args.output = args.output or str(RESULTS / "centre_pixel.json")
    found: dict[str, Path] = {}
    for w in map(Path, args.workdir):
        for p in w.glob("photon-peak*"):
            if p.is_dir() and p.name not in found and any(p.glob("bayes-poisson_s*.qs")):
                found[p.name] = p
    levels = sorted(found.values(), key=lambda p: int(p.name.split("peak")[1]))
    if not levels:
        print(f"no photon-peak* folders with bayes-poisson models in {', '.join(args.workdir)}: "
              "run python -m benchmarks.quality --sections photon first", file=sys.stderr)
        return 2
    header = ("| photons (peak) | N2V | bayes prior (blind) | bayes posterior | fold-in bounds: weight per intensity bin / "
              "per-pixel oracle | centre pixel: learned / binned / oracle gain | bayes − N2V |")

    def cells(d: Path, rows: list[dict]) -> list[str]:
        col = {k: [r[k] for r in rows if k in r] for k in ("n2v", "prior", "posterior", "oracle_fold_in", "binned_fold_in")}
        learned = [r["posterior"] - r["prior"] for r in rows]
        oracle = [r["oracle_fold_in"] - r["prior"] for r in rows]
        binned = [r["binned_fold_in"] - r["prior"] for r in rows]
        vs_n2v = [r["posterior"] - r["n2v"] for r in rows if "n2v" in r]
        return [d.name.split("peak")[1], ms(col["n2v"]), ms(col["prior"]), ms(col["posterior"]),
                f"{ms(col['binned_fold_in'])} / {ms(col['oracle_fold_in'])}",
                f"{ms(learned, True)} / {ms(binned, True)} / {ms(oracle, True)}", ms(vs_n2v, True)]

    return write_report(work, levels, analyse, header, cells, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
