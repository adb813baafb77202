"""Splitting benchmark: denoiSplit vs μSplit vs sequential (N2V, then μSplit) on BPAE actin + mito.

Task (synthetic superposition of real high-SNR images, as in the denoiSplit paper): the two clean
BPAE stains are rescaled to a common range (1st–99.5th percentile -> 0–1000), noised separately
with Poisson + Gaussian noise at two levels (:func:`quietscope.simulate.poisson_gaussian`), and
the methods train on the two noisy single-structure images of the training field (columns
0–512). They are tested on the noisy *sum* of a held-out field (rows 0–256, columns 832–1088);
the std maps are calibrated on another held-out field (rows 256–512, same columns).

* denoiSplit: GMM noise models bootstrapped from N2V predictions of each noisy training channel
  (no clean data anywhere in training).
* μSplit: the same ladder VAE with a Gaussian likelihood and pixel-averaged KL, on noisy targets.
* sequential: N2V per training channel, μSplit trained on the denoised channels; at test time
  the superimposed input is first denoised by an N2V trained on the noisy training sums.

The calibration is fitted on the calibration field and its error (ENCE) is reported on the test
field, before and after. Chunked-vs-whole differences are measured on the high-noise level.

Metrics: range-invariant PSNR (denoiSplit/CAREamics definition) and SSIM per channel against the
clean test field. Sized for ≤ 25 min on a shared 2-core CPU: 64² patches, batch 8, a few hundred
steps, small networks, so absolute numbers are far below the paper's (days of GPU training).

Run: ``python -m benchmarks.split`` (writes benchmarks/results/split.json and docs/images/), or
the two levels in parallel, one thread each (how the stored results were made, ~17 min):
``QS_THREADS=1 python -m benchmarks.split --level moderate & QS_THREADS=1 python -m
benchmarks.split --level high; wait; python -m benchmarks.split --merge``.
``--val-reference`` compares the validation ``corr_outputs`` of the recorded W2S curves with the
stains' correlation on the same fields (:func:`val_reference`).
``--musplit-fixed-var`` adds a μSplit row with a fixed-variance Gaussian likelihood.
``--steps N [--n2v-steps M]`` trains longer and writes ``split_stepsN[_LEVEL].json`` (pictures in
``benchmarks/results/split_stepsN_images/``), leaving the default run's files alone.

Learning curves (issue #16): ``python benchmarks/split.py --curve [--steps N] [--musplit-steps M]
[--unet-steps U] [--every K] [--pairs nuclei_actin,actin_mito,w2s_mito_actin] [--levels high,moderate]
[--methods denoisplit,musplit,unet_noisy,unet_clean,sequential] [--keep best|last] [--criteria] [--ema D[,D2]]
[--noise-models bootstrap|calibrated] [--filters F] [--latent C] [--unet-depth D] [--unet-filters F] [--seed S] [--lr R] [--batch B] [--patch P]
[--out split_curve.json]``. ``--criteria`` scores candidate keep criteria on the whole
held-apart field at every evaluation (:func:`val_criteria`, VAEs only). ``--ema D`` keeps an
exponential moving average of each VAE's weights (decay ``D``, :mod:`quietscope.training.averaging`)
and scores it at every evaluation and at the end like the weights themselves (entries
``METHOD+emaD``, plotted beside; with ``--keep last`` its kept weights are the average at the end). Per pair and noise level it trains, step by step with each method's
own loss: the noisy-target U-Net, the sequential baseline (N2V per channel, then the same U-Net
on the denoised channels; at test time N2V of the sum first), μSplit and denoiSplit (same ladder
VAE with lateral context, ``CURVE_VAE``). Every K steps it records, on the test field, the
output-output correlation, each output's correlation with each clean channel and the RI-PSNR,
plus the keep-best criterion on held-apart noisy fields (columns 512-832); JSON and the curve
PNGs (``docs/images/denoisplit_curve_PAIR_LEVEL.png``) are rewritten after every evaluation, so
an interrupted run leaves its curves so far. Run with ``QS_THREADS=1`` under ``nice``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The task (fields, data, net, levels, pairs, training options) and its train/predict/score
# helpers are shared with split_probe.py and split_recipe.py: they live in the harness, under
# split.py's old names.
from benchmarks.harness import SPLIT_CALIB as CALIB
from benchmarks.harness import SPLIT_DATA as DATA
from benchmarks.harness import SPLIT_LEVELS as LEVELS
from benchmarks.harness import SPLIT_NET, split_noisy, write_tif
from benchmarks.harness import SPLIT_PAIRS as PAIRS
from benchmarks.harness import SPLIT_TEST as TEST
from benchmarks.harness import SPLIT_TRAIN as TRAIN
from benchmarks.harness import pearson as corr
from benchmarks.harness import split_clean as load_clean
from benchmarks.harness import split_pair_regions as pair_regions
from benchmarks.harness import split_predict as run_predict
from benchmarks.harness import split_scores as scores
from benchmarks.harness import split_separation as split_metrics
from benchmarks.harness import split_train as train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "split.json"
IMAGES = ROOT / "docs" / "images"

SPLIT_STEPS = 250
N2V_STEPS = 150
#: Where the curve's denoiSplit noise models come from: "bootstrap" (N2V predictions, no clean
#: data; the documented recipe) or "calibrated" (the clean training channels as the signal: what
#: a user with calibration data has, and the reference for judging the bootstrap).
NOISE_MODELS = "bootstrap"
log = logging.getLogger("split-bench")


def bootstrap_noise_model(pred: np.ndarray, noisy: np.ndarray, path: Path) -> str:
    from quietscope.noise_models import fit_gmm, pairs_from_prediction

    s, x = pairs_from_prediction(pred, noisy)
    fit_gmm(s, x, n_gaussian=3, n_coeff=2, n_iterations=1000, seed=0).save(path)
    return str(path)


def calibrated_noise_model(clean: np.ndarray, noisy: np.ndarray, path: Path) -> str:
    """The GMM fitted to (clean, noisy) pairs of the training channel: the noise model a
    calibration would give, against which the bootstrapped one is judged."""
    from quietscope.noise_models import fit_gmm

    fit_gmm(clean.ravel(), noisy.ravel(), n_gaussian=3, n_coeff=2, n_iterations=1000, seed=0).save(path)
    return str(path)


def noise_model_std(files: dict[str, str], clean: np.ndarray, pscale: float, gauss_sd: float) -> dict:
    """Each noise model's std at the clean signal's 10/50/90/99th percentiles, with the true std
    of the simulated noise there (Poisson at ``pscale`` photons per unit + Gaussian ``gauss_sd``)."""
    from quietscope.noise_models import load_noise_model

    s = np.percentile(clean, [10, 50, 90, 99])
    out = {"signal": [round(float(v), 1) for v in s], "true": [round(float(v), 2) for v in np.sqrt(s / pscale + gauss_sd**2)]}
    for name, f in files.items():
        out[name] = [round(float(v), 2) for v in load_noise_model(f).mean_std(s)[1]]
    return out


def run_level(name: str, pscale: float, grel: float, clean: np.ndarray, work: Path) -> dict:
    t0 = time.perf_counter()
    w = work / name
    w.mkdir()
    noisy = split_noisy(clean, pscale, grel)
    tr, te, ca = (noisy[(slice(None),) + r] for r in (TRAIN, TEST, CALIB))
    gt_te, gt_ca = clean[(slice(None),) + TEST], clean[(slice(None),) + CALIB]
    ch_files = [write_tif(w / f"train_ch{i}.tif", tr[i]) for i in range(2)]
    sum_train = write_tif(w / "train_sum.tif", tr.sum(0))
    test_in = write_tif(w / "test_sum.tif", te.sum(0))
    calib_in = write_tif(w / "calib_sum.tif", ca.sum(0))
    timing: dict[str, float] = {}

    # N2V per channel (sequential baseline; its predictions also bootstrap the noise models).
    n2v = {"method": "n2v", "net": {"depth": 2, "filters": 16}}
    den_files, nm_files = [], []
    for i, f in enumerate(ch_files):
        m = w / f"n2v_ch{i}.qs"
        timing[f"n2v_ch{i}"] = train(f, m, n2v, N2V_STEPS)
        den = run_predict(str(m), f, w / f"n2v_ch{i}.ome.zarr")[0]
        den_files.append(write_tif(w / f"den_ch{i}.tif", den))
        nm_files.append(bootstrap_noise_model(den, tr[i], w / f"nm_ch{i}.json"))
    m_sum = w / "n2v_sum.qs"
    timing["n2v_sum"] = train(sum_train, m_sum, n2v, N2V_STEPS)
    test_den = write_tif(w / "test_sum_n2v.tif", run_predict(str(m_sum), test_in, w / "test_n2v.ome.zarr")[0])

    models = {
        "denoisplit": (ch_files, {"method": "denoisplit", "noise_models": nm_files, **SPLIT_NET}, test_in),
        "musplit": (ch_files, {"method": "musplit", **SPLIT_NET}, test_in),
        "sequential": (den_files, {"method": "musplit", **SPLIT_NET}, test_den),
    }
    if "--musplit-fixed-var" in sys.argv:  # μSplit with a fixed-variance Gaussian (see split_probe.py)
        models["musplit_fixedvar"] = (ch_files, {"method": "musplit", "gaussian_logvar": 0.0, **SPLIT_NET}, test_in)
    res: dict = {"noise": {"poisson_scale": pscale, "gauss_rel": grel}, "methods": {}}
    preds = {}
    for key, (inputs, opts, tin) in models.items():
        m = w / f"{key}.qs"
        timing[key] = train(inputs, m, opts, SPLIT_STEPS)
        out = run_predict(str(m), tin, w / f"{key}_test.ome.zarr", inference={"n_samples": 8})
        preds[key] = out
        res["methods"][key] = scores(out[:2], gt_te)
        log.info("%s %s: %s", name, key, res["methods"][key])

    # Calibration of denoiSplit's std: fit on the calibration field, check on the test field.
    from quietscope.workflows.calibrate import calibrate_arrays, ence, plot_calibration

    out_ca = run_predict(str(w / "denoisplit.qs"), calib_in, w / "calib.ome.zarr", inference={"n_samples": 8})
    cal = calibrate_arrays(out_ca[:2], out_ca[2:4], gt_ca, n_bins=20, names=["actin", "mito"])
    check = calibrate_arrays(preds["denoisplit"][:2], preds["denoisplit"][2:4], gt_te, n_bins=20)
    test_ence_after = []
    for c, ch in enumerate(cal.channels):
        rmv = np.asarray(check.channels[c].rmv)
        test_ence_after.append(round(ence(np.maximum(ch.scale * rmv + ch.offset, 1e-12), check.channels[c].rmse), 3))
    res["calibration"] = {
        "slope": [round(c.scale, 3) for c in cal.channels],
        "offset": [round(c.offset, 3) for c in cal.channels],
        "ence_uncalibrated_test": [round(c.ence_before, 3) for c in check.channels],
        "ence_calibrated_test": test_ence_after,
    }
    plot_calibration(cal, IMAGES / f"denoisplit_calibration_{name}.png", f"denoiSplit std calibration ({name} noise)")

    # Seams: chunked (128² blocks) vs one block, posterior-mean path and seeded sampling.
    seam = {}
    for label, n in (("mean_path", 0), ("sampled_8", 8)) if name == "high" else ():
        whole = run_predict(str(w / "denoisplit.qs"), test_in, w / "whole.ome.zarr", chunks=(64, 64), block=(256, 256), inference={"n_samples": n})
        tiled = run_predict(str(w / "denoisplit.qs"), test_in, w / "tiled.ome.zarr", chunks=(64, 64), block=(128, 128), inference={"n_samples": n})
        d = np.abs(whole[:2] - tiled[:2])
        seam[label] = {"max_abs_diff": float(d.max()), "rms_diff": float(np.sqrt((d**2).mean())),
                       "mean_pred_std": float(whole[2:4].mean()) if n else 0.0}
    res["chunked_vs_whole"] = seam
    res["train_seconds"] = {k: round(v, 1) for k, v in timing.items()}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if name == "high":
        figures(te.sum(0), preds["denoisplit"], preds["musplit"], gt_te)
    return res


def figures(inp: np.ndarray, ds: np.ndarray, mu: np.ndarray, gt: np.ndarray) -> None:
    """Input, the two predictions, std maps and ground truth of the test field (a 256² crop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sl = (slice(None), slice(None))
    panels = [("noisy input (sum)", inp[sl], "gray")]
    for c, nm in enumerate(("actin", "mito")):
        panels += [(f"denoiSplit {nm}", ds[c][sl], "magma"), (f"μSplit {nm}", mu[c][sl], "magma"),
                   (f"denoiSplit {nm} std", ds[2 + c][sl], "viridis"), (f"clean {nm}", gt[c][sl], "magma")]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), dpi=100)
    order = [0, 1, 5, 4, 8, 2, 6, 3, 7]
    for ax, k in zip(axes.ravel(), order):
        title, img, cmap = panels[k]
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(IMAGES / "denoisplit_example.png")
    plt.close(fig)



# ---- learning curves (--curve) --------------------------------------------------------------
#: The ladder VAE of the curve runs (denoisplit and musplit alike): the recipe's net until
#: 2026-12-07, kept so that the recorded commands reproduce; the recommended net now is
#: ``--filters 32 --latent 16`` (``DenoiSplit.recommended_options``).
CURVE_VAE = {"net": {"depth": 3, "filters": 16}, "latent_channels": 8, "context_levels": 2}
#: VAE patch (its field is 4x wider: 128²), U-Net patch, batch, learning rate; share of
#: foreground fields (patch brighter than the image's mean sum) in every batch.
CURVE_PATCH, UNET_PATCH, CURVE_BATCH, CURVE_LR, CURVE_FOREGROUND = 32, 64, 8, 1e-3, 0.8
#: The curve U-Nets (noisy targets, clean targets, sequential): ``--unet-depth``, ``--unet-filters``.
UNET_NET = {"depth": 2, "filters": 16}
#: Single posterior samples of the kept VAE weights scored one by one at the end of a curve run.
SINGLE_SAMPLES = 4
#: Seed of the curve learners' initial weights, batches and sampling (``--seed``); the noise
#: realisation and the validation fields do not depend on it.
TRAIN_SEED = 0


def draw_fields(arr: np.ndarray, rng: np.random.Generator, n: int, size: int, inner: int | None = None,
                foreground: float = 0.0) -> np.ndarray:
    """``n`` random ``size``² fields of ``arr`` ``(C, H, W)`` with random flips/transposes.

    The first ``round(foreground · n)`` must have a central ``inner``² patch whose summed
    channels are brighter than the whole array's mean sum (up to 20 redraws each): background
    carries no splitting signal.
    """
    inner = inner or size
    thr = float(arr.sum(0).mean())
    out = []
    while len(out) < n:
        for _ in range(20 if len(out) < round(foreground * n) else 1):
            y, x = int(rng.integers(0, arr.shape[1] - size + 1)), int(rng.integers(0, arr.shape[2] - size + 1))
            p = arr[:, y : y + size, x : x + size]
            c = (size - inner) // 2
            if p[:, c : c + inner, c : c + inner].sum(0).mean() > thr:
                break
        k = int(rng.integers(0, 8))
        p = np.rot90(p, k % 4, axes=(1, 2))
        out.append(p[:, :, ::-1] if k >= 4 else p)
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


class VAELearner:
    """denoisplit / musplit trained step by step with the method's own loss (as the CLI does:
    Adam, linear warm-up + cosine schedule of ``training.loop.lr_at``)."""

    def __init__(self, options: dict, train: np.ndarray, steps: int, ema: tuple[float, ...] = ()) -> None:
        import torch

        from quietscope.methods import build_method
        from quietscope.training.averaging import WeightAverage

        torch.manual_seed(TRAIN_SEED)
        self.method = build_method({"spatial_ndim": 2, "in_channels": train.shape[0], **options})
        self.method.set_normalization(train.mean(axis=(1, 2)), train.std(axis=(1, 2)))
        self.field = self.method.prepare_training((CURVE_PATCH, CURVE_PATCH))[0]
        self.patch = CURVE_PATCH
        self.opt = torch.optim.Adam(self.method.parameters(), lr=CURVE_LR)
        self.gen = torch.Generator().manual_seed(TRAIN_SEED)
        self.steps = steps
        # EMAs of the weights (training.averaging, as `TrainConfig.ema`): updated after every
        # step, read only when scored, so the raw curve is the run without them.
        self.averages = {d: WeightAverage(self.method, d) for d in ema}

    def step(self, batch: np.ndarray, i: int) -> float:
        import torch

        from quietscope.training.loop import lr_at

        for g in self.opt.param_groups:
            g["lr"] = lr_at(i, self.steps, CURVE_LR)
        self.method.train()
        loss = self.method.training_loss(torch.from_numpy(batch), self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        for avg in self.averages.values():
            avg.update(self.method)
        return float(loss.detach())

    def averaged(self, decay: float):
        """Context in which the learner predicts and scores with the EMA of ``decay``."""
        return self.averages[decay].applied(self.method)

    def predict(self, x: np.ndarray, n_samples: int = 0) -> np.ndarray:
        """``(H, W)`` superimposed input -> ``(2C, H, W)`` (MMSE channels, then stds)."""
        import torch

        self.method.eval()
        self.method.set_inference(n_samples=n_samples)
        with torch.no_grad():
            return self.method.predict(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None])[0].numpy()

    def samples(self, x: np.ndarray, n: int, seed: int) -> np.ndarray:
        """``(H, W)`` superimposed input -> ``n`` single posterior samples ``(n, C, H, W)``."""
        import torch

        self.method.eval()
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
            return self.method.predict_samples(t, n, seed)[:, 0].numpy()

    def select(self, val: np.ndarray) -> dict:
        import torch

        self.method.eval()
        return self.method.validation_metrics(torch.from_numpy(val))

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.method.state_dict().items()}

    def load(self, state: dict) -> None:
        self.method.load_state_dict(state)


class UNetLearner:
    """Plain U-Net (``UNET_NET``, by default depth 2, 16 filters): normalised sum in, normalised targets out, MSE."""

    def __init__(self, targets: np.ndarray, steps: int) -> None:
        import torch

        from quietscope.nets.unet import UNet

        torch.manual_seed(TRAIN_SEED)
        self.m = targets.mean(axis=(1, 2))[:, None, None]
        self.s = targets.std(axis=(1, 2))[:, None, None]
        tot = targets.sum(0)
        self.sm, self.ss = float(tot.mean()), float(tot.std())
        self.net = UNet(2, 1, targets.shape[0], **UNET_NET)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=CURVE_LR)
        self.field = self.patch = UNET_PATCH
        self.steps = steps

    def step(self, batch: np.ndarray, i: int) -> float:
        return self._fit(batch.sum(1, keepdims=True), batch, i)

    def _fit(self, inp_raw: np.ndarray, tgt_raw: np.ndarray, i: int) -> float:
        """One MSE step from the (raw) input sum onto the (raw) targets, both normalised here."""
        import torch

        from quietscope.training.loop import lr_at

        for g in self.opt.param_groups:
            g["lr"] = lr_at(i, self.steps, CURVE_LR)
        self.net.train()
        inp = torch.from_numpy(((inp_raw - self.sm) / self.ss).astype(np.float32))
        tgt = torch.from_numpy(((tgt_raw - self.m[None]) / self.s[None]).astype(np.float32))
        loss = ((self.net(inp) - tgt) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def predict(self, x: np.ndarray, n_samples: int = 0) -> np.ndarray:
        import torch

        self.net.eval()
        with torch.no_grad():
            out = self.net(torch.from_numpy(((x - self.sm) / self.ss).astype(np.float32))[None, None])[0].numpy()
        return out * self.s + self.m

    def select(self, val: np.ndarray) -> dict:
        """Same criterion as the VAE's: foreground per-channel MSE vs the (noisy) targets."""
        pred = np.stack([self.predict(v.sum(0)) for v in val])
        tot = val.sum(1)
        fg = tot > tot.mean()
        errs = [float(((val[:, i][fg] - pred[:, i][fg]) ** 2).mean() / val[:, i][fg].var()) for i in range(val.shape[1])]
        return {"select": float(np.mean(errs)), "corr_outputs": corr(pred[:, 0], pred[:, 1])}

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state)


def val_criteria(learner, val: np.ndarray, passes: int = 8, frac: float = 0.02, seed: int = 5) -> dict:
    """Candidate keep criteria on the whole held-apart field ``val`` ``(2, H, W)`` (noisy channels).

    Against noisy targets, two things can reward an unsplit or under-denoised output: a target's
    noise is in the input (an output that passes some of it through matches it), and a
    foreground mask taken from the noisy sum selects pixels whose target noise is positive (an
    output that over-predicts bright places matches that). The variants separate the two: blind
    predictions (the pixel's input replaced by a random neighbour's, N2V-style, ``passes`` masks
    of ``frac`` of the pixels), and foreground from the mean of the 5×5 neighbours without the
    pixel itself. Each ``mse_*`` is the per-channel MSE over the scored pixels divided by the
    target's variance there, averaged over the channels; ``r2_*`` is ``1 − corr²`` alike.
    """
    from scipy import ndimage

    tot = val.sum(0).astype(np.float32)
    k = np.ones((5, 5), np.float32)
    k[2, 2] = 0
    local = ndimage.convolve(tot, k / k.sum(), mode="reflect")
    fg_local, fg_noisy = local > local.mean(), tot > tot.mean()
    rng = np.random.default_rng(seed)
    h, w = tot.shape
    masks, inputs = [], []
    for _ in range(passes):
        m = rng.random((h, w)) < frac
        yy, xx = np.nonzero(m)
        off = rng.integers(-2, 3, size=(2, yy.size))
        off[:, (off == 0).all(0)] = 1  # never the pixel itself
        x = tot.copy()
        x[yy, xx] = tot[np.clip(yy + off[0], 0, h - 1), np.clip(xx + off[1], 0, w - 1)]
        masks.append(m)
        inputs.append(x)
    blind = np.zeros_like(val)
    seen = np.zeros((h, w), bool)
    for m, x in zip(masks, inputs):
        pred = learner.predict(x)[:2]
        blind[:, m & ~seen] = pred[:, m & ~seen]
        seen |= m
    full = learner.predict(tot)[:2]

    def mse(p, sel):
        return float(np.mean([((val[i][sel] - p[i][sel]) ** 2).mean() / val[i][sel].var() for i in range(2)]))

    def r2(p, sel):
        return float(np.mean([1 - corr(p[i][sel], val[i][sel]) ** 2 for i in range(2)]))

    return {"mse_fgnoisy": round(mse(full, fg_noisy), 4), "mse_fglocal": round(mse(full, fg_local), 4),
            "blind_mse_fglocal": round(mse(blind, seen & fg_local), 4), "blind_mse_all": round(mse(blind, seen), 4),
            "blind_r2_fglocal": round(r2(blind, seen & fg_local), 4), "r2_fglocal": round(r2(full, fg_local), 4)}


class CleanTargetUNet(UNetLearner):
    """The same U-Net given the *clean* structures as targets, the noisy sum as input: a
    supervised upper reference for what any learner of this size can split at a noise level
    (``--methods unet_clean``). ``pairs`` stacks the noisy channels, then the clean ones."""

    def __init__(self, pairs: np.ndarray, steps: int) -> None:
        n = pairs.shape[0] // 2
        super().__init__(pairs[n:], steps)
        tot = pairs[:n].sum(0)
        self.sm, self.ss = float(tot.mean()), float(tot.std())
        self.n = n

    def step(self, batch: np.ndarray, i: int) -> float:
        return self._fit(batch[:, :self.n].sum(1, keepdims=True), batch[:, self.n:], i)


class CurveJob:
    """One learner trained for ``steps``; every ``every`` steps it scores the test field
    (posterior means) and the keep-best criterion on held-apart validation fields, and calls
    ``record(curve)`` (incremental JSON/PNG). :meth:`finish` loads the kept (best-criterion)
    weights and scores them with ``final_samples`` posterior samples (MMSE) where the learner
    samples. Jobs are stepped round-robin, so a run cut short has every curve to the same step."""

    def __init__(self, learner, train: np.ndarray, val: np.ndarray, test_in: np.ndarray, gt: np.ndarray, steps: int,
                 every: int, record, final_samples: int = 0, keep: str = "best", criteria: bool = False) -> None:
        self.learner, self.train, self.test_in, self.gt, self.keep = learner, train, test_in, gt, keep
        self.val, self.criteria = val, criteria
        self.steps, self.every, self.record, self.final_samples = steps, every, record, final_samples
        self.rng = np.random.default_rng(TRAIN_SEED)
        self.val_fields = draw_fields(val, np.random.default_rng(1), 16, learner.field)
        self.curve: list[dict] = []
        #: The same metrics for each EMA of the weights the learner keeps (``--ema``), by decay.
        self.avg_curves: dict[float, list[dict]] = {d: [] for d in getattr(learner, "averages", {})}
        self.best: tuple = (np.inf, 0, None)
        self.train_s = 0.0

    def _row(self, i: int) -> dict:
        sel = self.learner.select(self.val_fields)
        return {"step": i + 1, "cpu_s": round(self.train_s, 1), "val_select": round(sel["select"], 4),
                "val_corr_outputs": round(sel["corr_outputs"], 3),
                **split_metrics(self.learner.predict(self.test_in)[:2], self.gt)}

    def step(self, i: int) -> None:
        t = time.process_time()
        self.learner.step(draw_fields(self.train, self.rng, CURVE_BATCH, self.learner.field, self.learner.patch, CURVE_FOREGROUND), i)
        self.train_s += time.process_time() - t
        if (i + 1) % self.every == 0 or i + 1 == self.steps:
            row = self._row(i)
            if self.criteria:
                row["criteria"] = val_criteria(self.learner, self.val)
            self.curve.append(row)
            if row["val_select"] < self.best[0]:
                self.best = (row["val_select"], i + 1, self.learner.state())
            for decay, curve in self.avg_curves.items():
                with self.learner.averaged(decay):
                    curve.append(self._row(i))
                log.info("step %d, EMA %g: %s", i + 1, decay, curve[-1])
            self.record(self.curve, self.avg_curves)
            log.info("step %d (%.0f s cpu): %s", i + 1, self.train_s, row)

    def finish(self) -> dict:
        """The run's result; its EMAs' results (``keep`` last: the averaged weights at the end,
        scored like the kept ones) under ``"averaged"``, keyed ``emaDECAY``."""
        averaged = {}
        for decay, curve in self.avg_curves.items():
            with self.learner.averaged(decay):
                out = self.learner.predict(self.test_in, self.final_samples)
            averaged[f"ema{decay:g}"] = {"curve": curve, "last": curve[-1], "ema": decay,
                                         "kept": {"step": self.steps, **split_metrics(out[:2], self.gt)},
                                         "train_cpu_s": round(self.train_s, 1), "cpu_minutes": round(self.train_s / 60, 1)}
        if self.keep == "best":
            self.learner.load(self.best[2])
        out = self.learner.predict(self.test_in, self.final_samples)
        kept = {"step": self.best[1] if self.keep == "best" else self.steps, **split_metrics(out[:2], self.gt)}
        if hasattr(self.learner, "samples"):
            # Single posterior samples, scored one by one: the mean of samples (MMSE) hedges
            # where the split is uncertain, which raises its outputs' correlation above the
            # stains'; a sample of a calibrated posterior should not.
            kept["single_samples"] = [split_metrics(s, self.gt) for s in self.learner.samples(self.test_in, SINGLE_SAMPLES, 0)]
        return {"curve": self.curve, "last": self.curve[-1], "kept": kept, "train_cpu_s": round(self.train_s, 1),
                "cpu_minutes": round(self.train_s / 60, 1), "averaged": averaged}


def plot_curves(results: dict, path: Path, title: str) -> None:
    """Output-output correlation, own-minus-other correlation and mean RI-PSNR vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    stains = None
    for name, r in results.items():
        c = r.get("curve") or []
        if not c:
            continue
        st = [row["step"] for row in c]
        stains = c[0]["corr_stains"]
        axes[0].plot(st, [row["corr_outputs"] for row in c], label=name)
        axes[1].plot(st, [min(o - t for o, t in zip(row["corr_own"], row["corr_other"])) for row in c], label=name)
        axes[2].plot(st, [float(np.mean(row["ri_psnr"])) for row in c], label=name)
    if stains is not None:
        axes[0].axhspan(stains - 0.1, stains + 0.1, color="green", alpha=0.15, label="stains ± 0.1")
    axes[1].axhline(0.15, color="green", ls="--", lw=1, label="0.15")
    for ax, t in zip(axes, ("output-output correlation", "min over outputs: corr(own) - corr(other)", "mean RI-PSNR (dB)")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("training step")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def prepare_level(pair: str, level: str, pscale: float, grel: float, work: Path, out: dict, save,
                  sequential: bool = True) -> dict:
    """Noisy data of one pair at one noise level, N2V of each channel and (for the sequential
    baseline) of the sum, and the GMM noise models bootstrapped from the N2V predictions (no
    clean data)."""
    clean, regions = pair_regions(pair)
    noisy = split_noisy(clean, pscale, grel).astype(np.float32)
    tr, va, te, ca = (noisy[(slice(None),) + regions[r]] for r in ("train", "val", "test", "calib"))
    key = f"{pair}/{level}"
    res = out["runs"].setdefault(key, {"noise": {"poisson_scale": pscale, "gauss_rel": grel}, "methods": {}})
    w = work / pair / level
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    n2v = {"method": "n2v", "net": {"depth": 2, "filters": 16}}
    den, nm_files = [], []
    for i in range(2):
        f = write_tif(w / f"train_ch{i}.tif", tr[i])
        train(f, w / f"n2v_ch{i}.qs", n2v, N2V_STEPS)
        d = run_predict(str(w / f"n2v_ch{i}.qs"), f, w / f"n2v_ch{i}.ome.zarr")[0]
        den.append(d)
        c_tr = clean[(i,) + regions["train"]]
        boot = bootstrap_noise_model(d, tr[i], w / f"nm_boot_ch{i}.json")
        calib = calibrated_noise_model(c_tr, tr[i], w / f"nm_calib_ch{i}.json")
        nm_files.append(calib if NOISE_MODELS == "calibrated" else boot)
        res.setdefault("noise_model_std", {})[f"ch{i}"] = noise_model_std(
            {"bootstrap": boot, "calibrated": calib}, c_tr, pscale, grel * float(clean[i].std()))
    res["noise_models"] = NOISE_MODELS
    test_den = None
    if sequential:
        f = write_tif(w / "train_sum.tif", tr.sum(0))
        train(f, w / "n2v_sum.qs", n2v, N2V_STEPS)
        test_den = run_predict(str(w / "n2v_sum.qs"), write_tif(w / "test_sum.tif", te.sum(0)), w / "test_n2v.ome.zarr")[0]
    res["preprocessing_cpu_s"] = round(time.process_time() - t0, 1)
    save()
    return {"pair": pair, "level": level, "key": key, "res": res, "tr": tr, "va": va, "te": te, "ca": ca,
            "gt_tr": clean[(slice(None),) + regions["train"]], "gt_te": clean[(slice(None),) + regions["test"]], "gt_ca": clean[(slice(None),) + regions["calib"]], "den": np.stack(den),
            "nm_files": nm_files, "test_den": test_den}


def make_jobs(lv: dict, names: list[str], steps: dict, every: int, save, keep: dict[str, str] | None = None,
              criteria: bool = False, ema: tuple[float, ...] = ()) -> list[tuple[dict, str, CurveJob]]:
    """A :class:`CurveJob` per method name on a prepared level; ``keep`` maps a method name to
    ``"best"`` (the held-apart criterion, the default) or ``"last"``; ``ema``: decays of the
    weight averages the VAEs keep beside their weights, scored at every evaluation."""
    res, tr, te = lv["res"], lv["tr"], lv["te"]
    pairs = np.concatenate([tr, lv["gt_tr"]]) if "unet_clean" in names else None

    def recorder(name):
        def rec(curve, avg_curves=None):
            res["methods"].setdefault(name, {})["curve"] = curve
            for decay, c in (avg_curves or {}).items():  # each EMA as a curve of its own (plotted beside)
                res["methods"].setdefault(f"{name}+ema{decay:g}", {"ema": decay})["curve"] = c
            save()
        return rec

    makers = {
        "unet_noisy": (lambda: UNetLearner(tr, steps["unet"]), tr, te.sum(0), steps["unet"], 0),
        "unet_clean": (lambda: CleanTargetUNet(pairs, steps["unet"]), pairs, te.sum(0), steps["unet"], 0),
        "sequential": (lambda: UNetLearner(lv["den"], steps["unet"]), lv["den"], lv["test_den"], steps["unet"], 0),
        "musplit": (lambda: VAELearner({"method": "musplit", **CURVE_VAE}, tr, steps["musplit"], ema), tr, te.sum(0),
                    steps["musplit"], 8),
        "denoisplit": (lambda: VAELearner({"method": "denoisplit", "noise_models": lv["nm_files"], **CURVE_VAE, **DENOISPLIT_RECIPE},
                                          tr, steps["denoisplit"], ema), tr, te.sum(0), steps["denoisplit"], 8),
    }
    jobs = []
    for name in names:
        make, targets, test_in, n, samples = makers[name]
        jobs.append((lv, name, CurveJob(make(), targets, lv["va"], test_in, lv["gt_te"], n, every, recorder(name), samples,
                                        (keep or {}).get(name, "best"), criteria and name in ("denoisplit", "musplit"))))
    return jobs


def run_round_robin(jobs: list[tuple[dict, str, CurveJob]], save) -> None:
    """Step all jobs in turn; finish each (kept weights, calibration for denoiSplit, plot) when done."""
    for i in range(max(job.steps for _, _, job in jobs)):
        for lv, name, job in jobs:
            if i >= job.steps:
                continue
            job.step(i)
            if i % (5 * job.every) == 5 * job.every - 1:
                plot_level(lv)
            if i + 1 == job.steps:
                lv["res"]["methods"][name] = job.finish()
                for label, r in lv["res"]["methods"][name].pop("averaged").items():
                    lv["res"]["methods"][f"{name}+{label}"] = r
                log.info("%s %s: kept %s", lv["key"], name, lv["res"]["methods"][name]["kept"])
                if name == "denoisplit":
                    lv["res"]["calibration"] = calibrate_curve(job.learner, lv["ca"], lv["gt_ca"], lv["te"], lv["gt_te"],
                                                               lv["level"], lv["pair"])
                plot_level(lv)
                save()


def plot_level(lv: dict) -> None:
    plot_curves(lv["res"]["methods"], IMAGES / f"denoisplit_curve_{lv['pair']}_{lv['level']}.png",
                f"{pair_title(lv['pair'])}, {lv['level']} noise")


def pair_title(pair: str) -> str:
    """``'BPAE actin + mito'``, ``'W2S mito + actin'``: the plots' titles."""
    return f"{'W2S' if pair.startswith('w2s_') else 'BPAE'} {' + '.join(PAIRS[pair])}"


def calibrate_curve(learner, ca: np.ndarray, gt_ca: np.ndarray, te: np.ndarray, gt_te: np.ndarray, level: str,
                    pair: str) -> dict:
    """Fit RMSE = a·RMV + b on the calibration field, report ENCE on the test field, plot."""
    from quietscope.workflows.calibrate import calibrate_arrays, ence, plot_calibration

    out_ca = learner.predict(ca.sum(0), 8)
    out_te = learner.predict(te.sum(0), 8)
    names = PAIRS[pair]
    cal = calibrate_arrays(out_ca[:2], out_ca[2:4], gt_ca, n_bins=20, names=list(names))
    check = calibrate_arrays(out_te[:2], out_te[2:4], gt_te, n_bins=20)
    after = [round(ence(np.maximum(c.scale * np.asarray(check.channels[i].rmv) + c.offset, 1e-12), check.channels[i].rmse), 3)
             for i, c in enumerate(cal.channels)]
    plot_calibration(cal, IMAGES / f"denoisplit_calibration_{pair}_{level}.png",
                     f"denoiSplit std calibration, {' + '.join(names)} ({level} noise)")
    return {"slope": [round(c.scale, 3) for c in cal.channels], "offset": [round(c.offset, 3) for c in cal.channels],
            "ence_uncalibrated_test": [round(c.ence_before, 3) for c in check.channels], "ence_calibrated_test": after}


#: denoiSplit's recipe of the curve runs (chosen with the short comparisons of docs/methods/denoisplit.md).
DENOISPLIT_RECIPE = {"gaussian_weight": 0.1, "kl_warmup": 300}


def curve_table(path: Path) -> str:
    """Markdown table of a ``--curve`` result file: the kept weights, and the last evaluation."""
    data = json.loads(path.read_text())
    rows = ["| pair / noise | method | steps (kept / run) | CPU min | out–out corr (stains) | own corr | other corr "
            "| RI-PSNR ch0 / ch1 | separated |", "|---|---|---|---|---|---|---|---|---|"]
    for key, run in data["runs"].items():
        for name, r in run["methods"].items():
            if "kept" in r:
                k, n, cpu = r["kept"], r["last"]["step"], r["cpu_minutes"]
            elif r.get("curve"):  # interrupted: its last evaluation
                k, n, cpu = r["curve"][-1], f"{r['curve'][-1]['step']} (running)", round(r["curve"][-1]["cpu_s"] / 60, 1)
            else:
                continue
            rows.append(f"| {key} | {name} | {k['step']} / {n} | {cpu} | {k['corr_outputs']} ({k['corr_stains']}) | "
                        f"{k['corr_own'][0]} / {k['corr_own'][1]} | {k['corr_other'][0]} / {k['corr_other'][1]} | "
                        f"{k['ri_psnr'][0]} / {k['ri_psnr'][1]} | {'yes' if k['separated'] else 'no'} |")
    return "\n".join(rows)


def replot(path: Path) -> None:
    """Redraw the curve PNGs of a ``--curve`` result file."""
    data = json.loads(path.read_text())
    for key, run in data["runs"].items():
        pair, level = key.split("/")
        plot_curves(run["methods"], IMAGES / f"denoisplit_curve_{pair}_{level}.png", f"{pair_title(pair)}, {level} noise")


def curve_main(argv: list[str]) -> int:
    """``--curve [--steps N] [--musplit-steps M] [--unet-steps U] [--every K] [--pairs a,b] [--levels x,y]``."""
    import os

    import torch

    from benchmarks.common import machine

    def arg(name, default):
        return type(default)(argv[argv.index(name) + 1]) if name in argv else default

    global N2V_STEPS, NOISE_MODELS, CURVE_VAE, UNET_NET, TRAIN_SEED, CURVE_LR, CURVE_BATCH, CURVE_PATCH
    NOISE_MODELS = arg("--noise-models", NOISE_MODELS)
    if NOISE_MODELS not in ("bootstrap", "calibrated"):
        raise SystemExit(f"--noise-models {NOISE_MODELS}: use bootstrap or calibrated")
    # --filters F / --latent C: a wider ladder VAE than the recipe's (16 filters, 8 latent channels).
    CURVE_VAE = {**CURVE_VAE, "net": {**CURVE_VAE["net"], "filters": arg("--filters", CURVE_VAE["net"]["filters"])},
                 "latent_channels": arg("--latent", CURVE_VAE["latent_channels"])}
    # --unet-depth D / --unet-filters F: the U-Nets' size (a supervised ceiling of the VAE's size).
    UNET_NET = {"depth": arg("--unet-depth", UNET_NET["depth"]), "filters": arg("--unet-filters", UNET_NET["filters"])}
    TRAIN_SEED = arg("--seed", TRAIN_SEED)
    # --lr R: the base learning rate of every curve learner (the cosine schedule ends at 5 % of it).
    CURVE_LR = arg("--lr", CURVE_LR)
    # --batch B / --patch P: fields per step of every curve learner, the VAEs' patch (the reference trains batch 32 on
    # 64²-128² patches; the recipe's 8 x 32² is 16-64x less data per step).
    CURVE_BATCH = arg("--batch", CURVE_BATCH)
    CURVE_PATCH = arg("--patch", CURVE_PATCH)
    torch.set_num_threads(int(os.environ.get("QS_THREADS", "1")))
    N2V_STEPS = arg("--n2v-steps", N2V_STEPS)
    n = arg("--steps", 3000)
    steps = {"denoisplit": n, "musplit": arg("--musplit-steps", n), "unet": arg("--unet-steps", 1500)}
    every = arg("--every", 100)
    pairs = arg("--pairs", "nuclei_actin").split(",")
    levels = [lv for lv in LEVELS if lv[0] in arg("--levels", "high,moderate").split(",")]
    levels.sort(key=lambda lv: arg("--levels", "high,moderate").split(",").index(lv[0]))
    path = ROOT / "benchmarks" / "results" / arg("--out", "split_curve.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "command": "python benchmarks/split.py " + " ".join(argv), "torch_threads": torch.get_num_threads(),
           "steps": steps, "eval_every": every, "patch": CURVE_PATCH, "unet_patch": UNET_PATCH, "batch": CURVE_BATCH,
           "foreground": CURVE_FOREGROUND, "vae": CURVE_VAE, "unet": UNET_NET, "seed": TRAIN_SEED, "lr": CURVE_LR,
           "denoisplit_recipe": DENOISPLIT_RECIPE, "n2v_steps": N2V_STEPS,
           "curve_metrics": "posterior-mean prediction of the test field (BPAE: rows 0-256, cols 832-1088; "
                            "W2S: field 089)",
           "kept": "weights of the best validation criterion (foreground per-channel MSE vs noisy targets on held-apart "
                   "fields: BPAE cols 512-832, W2S field 088), scored with 8 posterior samples (VAEs)", "runs": {}}
    # --keep last: the VAEs keep their last weights, as `quietscope train --method denoisplit|musplit`
    # does by default (the held-apart criterion preferred unsplit steps, docs/benchmarks.md §5).
    keep = {m: "last" for m in ("denoisplit", "musplit")} if arg("--keep", "best") == "last" else {}
    if keep:
        out["kept"] = "VAEs (denoisplit, musplit): their last weights; U-Nets: " + out["kept"]
    # --ema D[,D2]: the VAEs also keep exponential moving averages of their weights (decay D),
    # scored at every evaluation and at the end like the weights themselves ("METHOD+emaD").
    ema = tuple(float(d) for d in arg("--ema", "").split(",") if d)
    if ema:
        out["ema"] = list(ema)

    def save():
        path.write_text(json.dumps(out, indent=2))

    work = Path(tempfile.mkdtemp(prefix="qs-split-curve-"))
    try:
        # All methods of all levels stepped round-robin: a run cut short has every curve to the
        # same step.
        methods = arg("--methods", "denoisplit,musplit,unet_noisy,sequential").split(",")
        out["methods"] = methods
        prepared = [prepare_level(pair, name, ps, gr, work, out, save, "sequential" in methods)
                    for pair in pairs for name, ps, gr in levels]
        jobs = [j for lv in prepared for j in make_jobs(lv, methods, steps, every, save, keep, "--criteria" in argv, ema)]
        run_round_robin(jobs, save)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()
    return 0


#: W2S denoiSplit curve files the ``--val-reference`` check reads (file, level).
VAL_REFERENCE_RUNS = [("split_curve_w2s_long_moderate.json", "moderate"), ("split_curve_w2s_long_high.json", "high"),
                      ("split_curve_w2s_wide.json", "moderate"), ("split_curve_w2s_wide_seed1_moderate.json", "moderate"),
                      ("split_curve_w2s_wide.json", "high"), ("split_curve_w2s_wide_high15k.json", "high")]


def val_reference() -> dict:
    """What the logged ``corr_outputs`` should be compared with, on the curve runs' own
    validation fields (the 16 W2S field-088 crops of :class:`CurveJob`): the clean stains'
    correlation there, its estimate from the noisy channels (``signal_correlation``, what the
    CLI now logs as ``corr_stains``), and, along each recorded W2S denoiSplit curve, the
    validation ``corr_outputs`` at the separated test-field steps and the step a rule "closest
    to ``corr_stains`` in the second half of the run" would keep."""
    import torch

    from quietscope.methods.denoisplit import signal_correlation

    clean, regions = pair_regions("w2s_mito_actin")
    out: dict = {"levels": {}, "runs": []}
    for name, pscale, grel in LEVELS:
        noisy = split_noisy(clean, pscale, grel)
        fields = draw_fields(np.concatenate([noisy, clean]).astype(np.float32)[(slice(None),) + regions["val"]],
                             np.random.default_rng(1), 16, CURVE_PATCH * 4)
        out["levels"][name] = {"clean": round(corr(fields[:, 2], fields[:, 3]), 3),
                               "estimate": round(signal_correlation(torch.from_numpy(fields[:, 0]), torch.from_numpy(fields[:, 1])), 3),
                               "noisy_plain": round(corr(fields[:, 0], fields[:, 1]), 3)}
    for fname, level in VAL_REFERENCE_RUNS:
        path = ROOT / "benchmarks" / "results" / fname
        run = json.loads(path.read_text())["runs"].get(f"w2s_mito_actin/{level}", {}) if path.exists() else {}
        curve = run.get("methods", {}).get("denoisplit", {}).get("curve")
        if not curve:
            continue
        ref = out["levels"][level]["estimate"]
        pick = min((e for e in curve if e["step"] > curve[-1]["step"] // 2), key=lambda e: abs(e["val_corr_outputs"] - ref))
        out["runs"].append({"file": fname, "level": level, "corr_stains_estimate": ref,
                            "separated": [(e["step"], e["val_corr_outputs"]) for e in curve if e["separated"]],
                            "closest_rule": {k: pick[k] for k in ("step", "val_corr_outputs", "corr_outputs", "ri_psnr", "separated")}})
    return out


def main() -> int:
    import os

    if {"-h", "--help"} & set(sys.argv):  # options are read by hand: say them, run nothing
        print(__doc__)
        return 0
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("distributed", "quietscope.chunked", "quietscope.runner"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not DATA.exists():
        print(f"skipping: {DATA} not found (see ../shared/data/README.md)")
        return 0
    if "--plot" in sys.argv:  # redraw the curve PNGs of a --curve result file (e.g. of a run cut short)
        replot(ROOT / "benchmarks" / "results" / sys.argv[sys.argv.index("--plot") + 1])
        return 0
    if "--table" in sys.argv:  # markdown table of a --curve result file
        print(curve_table(ROOT / "benchmarks" / "results" / sys.argv[sys.argv.index("--table") + 1]))
        return 0
    if "--curve" in sys.argv:
        return curve_main(sys.argv[1:])
    if "--val-reference" in sys.argv:  # what the logged corr_outputs should be compared with
        ref = val_reference()
        (ROOT / "benchmarks" / "results" / "split_val_reference.json").write_text(json.dumps(ref, indent=2))
        print(json.dumps(ref, indent=1))
        return 0
    import torch

    global SPLIT_STEPS, N2V_STEPS, RESULTS, LEVELS, IMAGES
    if "--steps" in sys.argv:  # a longer budget: its own result file and pictures beside it
        SPLIT_STEPS = int(sys.argv[sys.argv.index("--steps") + 1])
        N2V_STEPS = int(sys.argv[sys.argv.index("--n2v-steps") + 1]) if "--n2v-steps" in sys.argv else N2V_STEPS
        RESULTS = RESULTS.with_name(f"split_steps{SPLIT_STEPS}.json")
        IMAGES = RESULTS.parent / f"split_steps{SPLIT_STEPS}_images"
    if "--smoke" in sys.argv:  # a seconds-long run of every code path; results not kept
        SPLIT_STEPS, N2V_STEPS, LEVELS = 3, 3, LEVELS[-1:]
        RESULTS = Path(tempfile.mkdtemp()) / "split.json"
    if "--merge" in sys.argv:  # combine the per-level files of parallel '--level NAME' runs
        parts = [json.loads(RESULTS.with_name(f"{RESULTS.stem}_{n}.json").read_text()) for n, _, _ in LEVELS]
        merged = {**parts[0], "levels": {k: v for p in parts for k, v in p["levels"].items()},
                  "total_seconds": max(p["total_seconds"] for p in parts)}
        RESULTS.write_text(json.dumps(merged, indent=2))
        return 0
    if "--level" in sys.argv:  # one level only (run the levels as parallel processes)
        want = sys.argv[sys.argv.index("--level") + 1]
        LEVELS = [lv for lv in LEVELS if lv[0] == want]
        RESULTS = RESULTS.with_name(f"{RESULTS.stem}_{want}.json")
    torch.set_num_threads(int(os.environ.get("QS_THREADS", "2")))
    IMAGES.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    clean = load_clean()
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None  # keep models/outputs there
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="qs-split-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = {
        "task": "BPAE actin + mito (rescaled 0-1000), superimposed; train rows 0-680 x cols 0-512, "
                "test rows 0-256 x cols 832-1088, calibration rows 256-512 x cols 832-1088",
        "metric": "range-invariant PSNR (dB) and SSIM per channel [actin, mito] vs clean test field",
        "budget": f"{SPLIT_STEPS} steps (splitting), {N2V_STEPS} (N2V), patch 64, batch 8, "
                  f"{torch.get_num_threads()} torch thread(s) per process on a shared 2-core CPU",
        "levels": {},
    }
    try:
        for name, ps, gr in LEVELS:
            out["levels"][name] = run_level(name, ps, gr, clean, work)
            out["total_seconds"] = round(time.perf_counter() - t0, 1)
            RESULTS.write_text(json.dumps(out, indent=2))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
