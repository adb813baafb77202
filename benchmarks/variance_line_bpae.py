"""Where the data's variance line on BPAE comes from: the simulated noise, or the reference's own grain.

pn2v-boot's check (SURE, ``workflows/pn2v_boot.py``) takes the noise variance from the data's
Poisson–Gaussian line (``noise_analysis.estimate_poisson_gaussian``). On the BPAE benchmark data that
line has a gain about 7 % above the simulated one (docs/benchmarks.md §12h). This script splits the
excess: it fits the same estimator to the noisy data (several noise seeds), to a copy whose signal is
smoothed first (no grain, no fine texture), and to the clean reference itself. If the reference's
own line accounts for the excess, the estimator is right about the pixel-independent variation of
the data, and the part above the simulated noise is the reference's grain: pixel-independent and
rising with intensity like shot noise, which no single-image estimator can tell from added noise.

    python -m benchmarks.variance_line_bpae
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from benchmarks.common import RESULTS, machine, markdown_table, write_json
from benchmarks.harness import BPAE_NOISE, read_bpae


def main() -> None:
    from quietscope.noise_analysis.poisson_gaussian import estimate_poisson_gaussian
    from quietscope.simulate import poisson_gaussian

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output", default=str(RESULTS / "variance_line_bpae.json"))
    args = ap.parse_args()

    clean = read_bpae("actin").astype(np.float64)
    photons, g = BPAE_NOISE
    scale, read_sd = photons / float(clean.mean()), g * float(clean.std())
    rows = [{"what": "simulated noise (true)", "gain": 1.0 / scale, "intercept": read_sd**2}]
    for seed in args.seeds:
        noisy = poisson_gaussian(clean.astype(np.float32), scale, g, float(clean.std()), seed=seed).astype(np.float64)
        e = estimate_poisson_gaussian(noisy)
        rows.append({"what": f"noisy data, noise seed {seed}", "gain": e.gain, "intercept": e.intercept})
    smooth = ndimage.gaussian_filter(clean, 6)
    e = estimate_poisson_gaussian(poisson_gaussian(smooth.astype(np.float32), scale, g, float(clean.std()), seed=0).astype(np.float64))
    rows.append({"what": "noise added to the reference smoothed (sigma 6 px)", "gain": e.gain, "intercept": e.intercept})
    # offset 0: the reference's dark level is not a camera offset; only the line is compared.
    ref = estimate_poisson_gaussian(clean, offset=0.0)
    rows.append({"what": "the clean reference itself", "gain": ref.gain, "intercept": ref.intercept})
    rows.append({"what": "simulated + reference's own", "gain": rows[0]["gain"] + ref.gain,
                 "intercept": rows[0]["intercept"] + ref.intercept})
    print(markdown_table(["line fitted to", "gain", "intercept"],
                         [[r["what"], f"{r['gain']:.2f}", f"{r['intercept']:.4g}"] for r in rows]))
    write_json(args.output, {"machine": machine(), "bpae_noise": BPAE_NOISE, "rows": rows})
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
