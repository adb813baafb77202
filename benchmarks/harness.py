"""The one harness of the benchmark scripts: data, train, predict, read an output, score, report.

Every script in ``benchmarks/`` imports what it shares from here (no script edits ``sys.path`` or
imports another script). Run a script as a module from the repository root::

    .venv/bin/python -m benchmarks.quality --quick

Pieces, in the order a benchmark uses them:

* **data**: :func:`data_dir` (``shared/data`` via :func:`quietscope.io.sample_data.find_data_dir`),
  :func:`read_bpae`, the 192² crop and the simulated noise levels shared by the quality, field and
  batch-norm benchmarks (:data:`CROP`, :data:`SIM_LEVELS`, :func:`bpae_field_noise`), the
  splitting task of ``split.py``/``split_probe.py`` (:func:`split_clean` and its fields);
* **train**: :func:`train` over :func:`quietscope.workflows.train.train_model`, and
  :func:`train_with_budget` for the scripts that state their budget as a :data:`FIELD_BUDGET`-like
  dict;
* **predict**: :func:`predict` over :func:`quietscope.workflows.predict.predict` and
  :func:`filter_output` over :func:`quietscope.workflows.filter.filter_image`, both returning the
  output array read by :func:`read_output`; :func:`run_processor` for a tile processor through
  the engine (scaling); :data:`PREDICT_DEFAULTS` are the quality-style options;
* **score**: :func:`score` (and :func:`psnr_db` for the PSNR alone), the one definition of every
  table's PSNR/SSIM/RI-PSNR (see its docstring and docs/benchmarks.md); :func:`psnr_from_mse` and
  :func:`binned_fold_in_mse` for the oracle bounds;
* **run and report**: :func:`run_in_processes` (spawned process pool), :func:`machine`,
  :func:`write_json`, :func:`markdown_table`, :func:`fmt_mean_sem` (from :mod:`benchmarks.common`,
  which keeps the dependency-free reporting helpers), :func:`random_model` (random weights, for
  speed benchmarks).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from benchmarks.common import RESULTS, command_line, fmt_mean_sem, machine, markdown_table, run_in_processes, timer, write_json
from quietscope.chunked import PredictOptions, PredictResult, run_prediction
from quietscope.io.reading import open_image
from quietscope.io.sample_data import find_data_dir, read_tiff
from quietscope.methods import build_method
from quietscope.methods.modelfile import save_model
from quietscope.metrics import affine_fit, mean_and_sem, psnr, range_invariant_psnr, ssim
from quietscope.training.loop import TrainResult
from quietscope.workflows.filter import filter_image
from quietscope.workflows.predict import predict as _predict_workflow
from quietscope.workflows.train import train_model

__all__ = [
    "CROP", "FIELD_BUDGET", "METRICS", "PREDICT_DEFAULTS", "RESULTS", "ROOT", "SIM_LEVELS",
    "SPLIT_CALIB", "SPLIT_DATA", "SPLIT_LEVELS", "SPLIT_NET", "SPLIT_PAIRS", "SPLIT_VAL", "SPLIT_W2S_CH", "SPLIT_W2S_REGIONS", "SPLIT_TEST", "SPLIT_TRAIN", "SPLIT_TRAIN_OPTS", "Trained",
    "BPAE_NOISE", "BUDGET", "FIELDS", "binned_fold_in_mse", "bpae_field_noise", "budget_train_options", "centre_origin", "command_line", "data_dir",
    "field_psnr", "filter_output", "find_data_dir", "fmt_mean_sem", "machine", "make_data", "markdown_table", "mean_and_sem",
    "output_channels", "predict", "predict_array", "predict_options", "predict_run", "psnr_db", "psnr_from_mse",
    "random_model", "read_bpae", "read_output", "read_tiff", "rescale_stain", "run_in_processes", "run_processor", "score", "single_thread",
    "pearson", "split_clean", "split_noisy", "split_pair_regions", "split_predict", "split_scores", "split_separation", "split_stains",
    "split_train", "timer", "train",
    "train_options", "train_with_budget", "write_json", "write_tif",
]

#: The repository root (docs/images and docs/guide are written below it by some scripts).
ROOT = Path(__file__).resolve().parents[1]


# ---- data ----------------------------------------------------------------------------------
#: Edge of the test (and held-out) crops of the quality, field and batch-norm benchmarks.
CROP = 192
#: The simulated noise levels (denoiSplit style): photons at the crop's mean intensity, Gaussian
#: std relative to the image's std.
SIM_LEVELS: dict[str, tuple[float, float]] = {"moderate": (25.0, 0.1), "strong": (5.0, 0.2)}


def data_dir() -> Path:
    """``shared/data`` (:func:`find_data_dir`); exits with a message when it is absent."""
    data = find_data_dir()
    if data is None:
        raise SystemExit("shared/data not found (set QUIETSCOPE_DATA); this benchmark needs the real images")
    return data


def read_bpae(stain: str = "actin") -> np.ndarray:
    """The whole 680 x 1100 BPAE field of one stain (``actin`` or ``mito``) as float32."""
    return read_tiff(data_dir() / "bpae" / f"bpae_{stain}.tif").astype(np.float32)


def centre_origin(shape: Sequence[int], n: int = CROP) -> tuple[int, int]:
    """Top-left corner of the centred ``n x n`` crop of a 2D image."""
    return (shape[0] - n) // 2, (shape[1] - n) // 2


def bpae_field_noise(level: str) -> tuple[np.ndarray, tuple[int, int], float, float]:
    """The clean BPAE actin field, the test crop's origin, the photon scale (photons per unit)
    and the Gaussian std of noise ``level``: the true noise variance is ``s / scale + std**2``."""
    img = read_bpae("actin")
    cy, cx = centre_origin(img.shape)
    photons, g = SIM_LEVELS[level]
    return img, (cy, cx), photons / float(img[cy:cy + CROP, cx:cx + CROP].mean()), g * float(img.std())


# ---- train ---------------------------------------------------------------------------------
#: The budget of the field and batch-norm benchmarks (U-Net depth 2, 16 filters, 2 % masked).
FIELD_BUDGET: dict[str, Any] = {"batch": 16, "patch": 32, "depth": 2, "filters": 16, "lr": 1e-3, "mask_percent": 2.0}
#: Methods that take a masked share (the Bayesian blind-spot nets use every pixel).
MASKING_METHODS = ("n2v", "pn2v")


@dataclass
class Trained:
    """A model trained by :func:`train`: its file, the library's result and the wall time."""

    path: Path
    result: TrainResult | None  # None: an earlier run's model was reused
    seconds: float | None


def train(inputs: Any, model: str | Path, method_options: dict[str, Any], train_options: dict[str, Any],
          *, reuse: bool = False) -> Trained:
    """``train_model`` (overwriting, no progress bar), timed by the wall clock.

    With ``reuse`` an existing ``model`` (from an earlier run with the same options) is kept.
    """
    model = Path(model)
    if reuse and model.exists():
        return Trained(model, None, None)
    t0 = time.perf_counter()
    res = train_model(inputs, model, method_options, train_options, overwrite=True, progress=False)
    return Trained(model, res, time.perf_counter() - t0)


def budget_train_options(budget: Mapping[str, Any], steps: int, seed: int, *, val_every: int | None = None,
                         checkpoint_every: int | None = None) -> dict[str, Any]:
    """Training options of a budget dict (square patches, pool of 256 patches, CPU).

    Validation and checkpoints every ``steps // 10`` steps unless given.
    """
    every = max(steps // 10, 1)
    return {"patch": (budget["patch"],), "batch": budget["batch"], "steps": steps, "lr": budget["lr"], "seed": seed,
            "val_every": every if val_every is None else val_every,
            "checkpoint_every": every if checkpoint_every is None else checkpoint_every,
            "pool_size": 256, "device": "cpu"}


def train_with_budget(src: Any, model: str | Path, options: dict[str, Any], steps: int, seed: int, *,
                      budget: Mapping[str, Any] = FIELD_BUDGET, reuse: bool = False, **every: int) -> Trained:
    """:func:`train` with the net size, masking and training options of ``budget``.

    ``options`` holds at least ``method``; a ``net`` in it replaces the budget's. The masked
    share (``budget["mask_percent"]``, when the budget has one) goes to the masking methods only.
    ``every``: ``val_every`` / ``checkpoint_every`` of :func:`budget_train_options`.
    """
    masking = ({"masked_pixel_percentage": budget["mask_percent"]}
               if "mask_percent" in budget and options["method"] in MASKING_METHODS else {})
    method = {"net": {"depth": budget["depth"], "filters": budget["filters"]}, **masking, **options}
    return train(str(src), model, method, budget_train_options(budget, steps, seed, **every), reuse=reuse)


# ---- predict and read ----------------------------------------------------------------------
#: Prediction options of the quality-style rows: one output level, one dask thread, CPU.
PREDICT_DEFAULTS: dict[str, Any] = {"progress": False, "overwrite": True, "n_levels": 1, "threads": 1, "device": "cpu"}


def predict_options(options: PredictOptions | Mapping[str, Any] | None = None, **overrides: Any) -> PredictOptions:
    """``options`` as they are (a mapping: exactly those fields), else :data:`PREDICT_DEFAULTS`
    with ``overrides``."""
    if isinstance(options, PredictOptions):
        return options
    if options is not None:
        return PredictOptions(**options)
    return PredictOptions(**{**PREDICT_DEFAULTS, **overrides})


def predict_run(model: str | Path, src: str | Path, out: str | Path, *, inference: dict[str, Any] | None = None,
                tta: bool = False, options: PredictOptions | Mapping[str, Any] | None = None) -> PredictResult:
    """``quietscope.workflows.predict.predict`` into ``out``; its :class:`PredictResult`."""
    return _predict_workflow(model, src, out, predict_options(options), inference=inference, tta=tta)


def predict(model: str | Path, src: str | Path, out: str | Path, *, inference: dict[str, Any] | None = None,
            tta: bool = False, options: PredictOptions | Mapping[str, Any] | None = None,
            channel: str | None = "denoised") -> np.ndarray:
    """:func:`predict_run`, then the output read back by :func:`read_output` (``channel``)."""
    predict_run(model, src, out, inference=inference, tta=tta, options=options)
    return read_output(out, channel)


def run_processor(src: str | Path, out: str | Path, processor: Any, channel_names: list[str], halo: Sequence[int],
                  factor: int, options: Mapping[str, Any], meta: dict[str, Any]) -> PredictResult:
    """A tile processor (e.g. :mod:`quietscope.runner.testing`'s) through the real engine
    (:func:`quietscope.chunked.run_prediction`), with exactly the :class:`PredictOptions` fields
    ``options``; as ``tests/box_job.run_box_job`` does for the tests."""
    return run_prediction(open_image(str(src)), str(out), processor, channel_names, tuple(halo), factor,
                          PredictOptions(**options), meta)


def filter_output(src: str | Path, out: str | Path, kind: str, options: PredictOptions | Mapping[str, Any] | None = None,
                  **params: Any) -> np.ndarray:
    """``quietscope.workflows.filter.filter_image`` into ``out``; the filtered array.

    Default options: :data:`PREDICT_DEFAULTS` with the device left to the library (no net runs).
    """
    opts = predict_options(options, device=PredictOptions().device)
    filter_image(src, out, kind, options=opts, **params)
    return read_output(out, "filtered")


def output_channels(path: str | Path) -> list[str]:
    """Channel names of an output (empty when it has none)."""
    return open_image(str(path)).channel_names or []


def read_output(path: str | Path, channel: str | None = "denoised") -> np.ndarray:
    """Time point 0 of an output (level 0), as stored.

    ``channel`` None: every channel, ``(C, *spatial)``; a name: that channel, or the first when no
    channel has that name (single-output methods), ``spatial`` shaped.
    """
    img = open_image(str(path))
    arr = img.read_tc(0, tuple(slice(None) for _ in img.spatial_shape))
    if channel is None:
        return arr
    names = img.channel_names or []
    return arr[names.index(channel)] if channel in names else arr[0]


# ---- score ---------------------------------------------------------------------------------
#: The metrics :func:`score` returns, in this order.
METRICS = ("psnr", "ssim", "ri_psnr")


def score(pred: np.ndarray, gt: np.ndarray, metric: str = "psnr", only: Sequence[str] = METRICS) -> dict[str, float]:
    """PSNR, SSIM and range-invariant PSNR of a prediction against its ground truth.

    The one definition of every benchmark table (docs/benchmarks.md, section 3 "Metric"):

    * ``metric="psnr"``: PSNR and SSIM with the data range of the ground truth
      (``gt.max() - gt.min()``, :mod:`quietscope.metrics`' default), computed in float64;
    * ``metric="psnr_affine"`` (W2S, whose clean image is at another gain/offset): PSNR and SSIM
      after the affine least-squares fit of the prediction onto ``gt``
      (:func:`quietscope.metrics.affine_fit`);
    * ``ri_psnr`` (CARE/HDN/denoiSplit's range-invariant PSNR) is affine-invariant: never fitted.

    ``only``: the metrics wanted (a subset of :data:`METRICS`).
    """
    if metric not in ("psnr", "psnr_affine"):
        raise ValueError(f"unknown metric {metric!r}: use 'psnr' or 'psnr_affine'")
    pred = np.asarray(pred, np.float64)
    fitted = affine_fit(pred, gt) if metric == "psnr_affine" else pred
    fns = {"psnr": lambda: psnr(fitted, gt), "ssim": lambda: ssim(fitted, gt), "ri_psnr": lambda: range_invariant_psnr(pred, gt)}
    return {m: fns[m]() for m in METRICS if m in only}


def psnr_db(pred: np.ndarray, gt: np.ndarray, metric: str = "psnr") -> float:
    """The PSNR of :func:`score` alone."""
    return score(pred, gt, metric, only=("psnr",))["psnr"]


def psnr_from_mse(mse: float, data_range: float) -> float:
    """PSNR of an expected MSE (the oracle bounds, which have no prediction image)."""
    return float(10 * np.log10(data_range**2 / mse))


def binned_fold_in_mse(prior: np.ndarray, noisy: np.ndarray, clean: np.ndarray, bins: int = 32) -> float:
    """MSE of ``prior + w (x - prior)`` with the best ``w`` per bin of the prior's value.

    ``w`` is chosen knowing the clean image (least squares per bin), but it can depend only on
    what a model sees (the prior's value), not on each pixel's own error: a reachable bound for a
    fold-in whose prior uncertainty depends on intensity only.
    """
    edges = np.quantile(prior, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, prior, side="right") - 1, 0, bins - 1)
    err = prior - clean
    r = noisy - prior
    total = 0.0
    for k in range(bins):
        m = idx == k
        if not m.any():
            continue
        w = float(np.clip(-np.sum(err[m] * r[m]) / max(np.sum(r[m] ** 2), 1e-12), 0.0, 1.0))
        total += float(np.sum((err[m] + w * r[m]) ** 2))
    return total / prior.size


# ---- processes and models ------------------------------------------------------------------
def single_thread() -> None:
    """One torch thread (each benchmark process gets one core's share of a shared machine)."""
    torch.set_num_threads(1)


def write_zarr_array(path: str | Path, data: np.ndarray, chunks: tuple[int, ...]) -> str:
    """A plain zarr array of ``data`` (the benchmarks' lazily read inputs)."""
    import zarr

    z = zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype)
    z[...] = data
    return str(path)


def make_volume(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], seed: int = 0) -> str:
    """Write a noisy synthetic volume chunk by chunk (never the whole array in memory)."""
    axes = "yx" if len(shape) == 2 else "zyx"
    from quietscope.io.writing import OutputSpec, create_ome_zarr, open_level
    from quietscope.tiling import plan_blocks

    spec = OutputSpec(path=str(path), axes=axes, shape=shape, chunks=chunks, dtype="uint16", n_levels=1,
                      channel_windows=[(0, 400)])
    create_ome_zarr(spec)
    arr = open_level(path, 0)
    for b in plan_blocks(shape, chunks):
        rng = np.random.default_rng([seed, *b.index])
        grids = np.meshgrid(*[np.arange(a, z) for a, z in zip(b.start, b.stop)], indexing="ij")
        signal = 100 + 80 * np.sin(sum(g * 0.05 * (i + 1) for i, g in enumerate(grids))) ** 2
        arr[b.slices()] = rng.poisson(signal).astype(np.uint16)
    return str(path)


def random_model(path: str | Path, spatial_ndim: int, in_channels: int = 1, method: str = "n2v", depth: int = 2,
                 filters: int = 8, batch_norm: bool = True, z_pool: bool = True, mean: float = 100.0,
                 std: float = 20.0, seed: int = 0, **extra: Any) -> str:
    """A model file with random weights (speed does not depend on training).

    The same builder as ``tests/helpers.random_model`` (copied: benchmarks do not import tests).
    """
    torch.manual_seed(seed)
    m = build_method({"method": method, "spatial_ndim": spatial_ndim, "in_channels": in_channels,
                      "net": {"depth": depth, "filters": filters, "batch_norm": batch_norm, "z_pool": z_pool}, **extra})
    # Non-trivial batch-norm statistics so eval-mode normalisation is exercised.
    for mod in m.modules():
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.set_normalization([mean] * in_channels, [std] * in_channels)
    save_model(path, m.eval(), {"data_stats": {"min": 0.0, "max": 255.0}})
    return str(path)


# ---- the splitting task (split.py, split_probe.py) -----------------------------------------
#: BPAE stains of the splitting task (``shared/data/bpae``).
SPLIT_DATA = (find_data_dir() or ROOT.parent / "shared" / "data") / "bpae"
SPLIT_TRAIN = (slice(0, 680), slice(0, 512))
SPLIT_TEST = (slice(0, 256), slice(832, 1088))
SPLIT_CALIB = (slice(256, 512), slice(832, 1088))
SPLIT_NET = {"net": {"depth": 3, "filters": 16}, "latent_channels": 8}
SPLIT_TRAIN_OPTS = {"patch": (64,), "batch": 8, "lr": 1e-3, "val_fraction": 0.1, "val_every": 100,
                    "checkpoint_every": 10_000, "device": "cpu", "seed": 0}


def rescale_stain(a: np.ndarray) -> np.ndarray:
    """``a`` (float64) mapped so that its 1st..99.5th percentile spans 0..1000, clipped below at 0."""
    lo, hi = np.percentile(a, [1, 99.5])
    return np.clip((a - lo) / (hi - lo), 0, None) * 1000.0


def split_clean() -> np.ndarray:
    """The two stains rescaled so that their 1st..99.5th percentile spans 0..1000."""
    return np.stack([rescale_stain(read_tiff(SPLIT_DATA / f"bpae_{name}.tif").astype(np.float64))
                     for name in ("actin", "mito")]).astype(np.float32)


def write_tif(path: Path, arr: np.ndarray) -> str:
    """``arr`` as a float32 TIFF; its path."""
    tifffile.imwrite(path, np.ascontiguousarray(arr, dtype=np.float32))
    return str(path)


def split_train(inputs: Any, model: Path, options: dict[str, Any], steps: int) -> float:
    """:func:`train` with :data:`SPLIT_TRAIN_OPTS`; the library's training seconds."""
    return train(inputs, model, options, {**SPLIT_TRAIN_OPTS, "steps": steps}).result.seconds


def split_predict(model: str, inp: str, out: Path, **kw: Any) -> np.ndarray:
    """Predict with two dask threads (``kw``: more :class:`PredictOptions` fields and
    ``inference``); every output channel as float32."""
    inference = kw.pop("inference", None)
    arr = predict(model, inp, out, inference=inference, channel=None,
                  options={"progress": False, "overwrite": True, "threads": 2, **kw})
    return arr.astype(np.float32)


def split_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, list[float]]:
    """Range-invariant PSNR (2 decimals) and SSIM (3 decimals) per channel."""
    per = [score(p, g, only=("ssim", "ri_psnr")) for p, g in zip(pred, gt)]
    return {"ri_psnr": [round(s["ri_psnr"], 2) for s in per], "ssim": [round(s["ssim"], 3) for s in per]}


#: Noise levels of the splitting task: (name, photons per intensity unit, Gaussian std relative
#: to the clean channel's std).
SPLIT_LEVELS = [("moderate", 0.05, 0.1), ("high", 0.01, 0.25)]
#: Two-structure pairs of the curve benchmark: BPAE nuclei + actin (distinct morphology) first,
#: then the issue's actin + mito (similar, fine structures), both from the one BPAE field; then
#: W2S mitochondria (ch0) + F-actin (ch2) of the ten W2S fields' 400-frame means: the same kind
#: of pair with 5x the training pixels (seven fields), to test whether the share of the first
#: stain that the second output keeps on BPAE is a lack of training data.
SPLIT_PAIRS = {"nuclei_actin": ("nuclei", "actin"), "actin_mito": ("actin", "mito"), "w2s_mito_actin": ("mito", "actin")}
#: Held-apart field for the keep-best criterion: noisy data only, between training and test.
SPLIT_VAL = (slice(0, 680), slice(512, 832))
#: W2S fields, laid side by side along x (fov081 at x 0..512, ...): train on 081-087, keep-best
#: criterion on 088, test on 089, calibration on the top half of 090. Patches that straddle two
#: fields are still valid two-structure sums (both channels straddle alike).
SPLIT_W2S_CH = (0, 2)
SPLIT_W2S_REGIONS = {"train": (slice(0, 512), slice(0, 7 * 512)), "val": (slice(0, 512), slice(7 * 512, 8 * 512)),
                     "test": (slice(0, 512), slice(8 * 512, 9 * 512)), "calib": (slice(0, 256), slice(9 * 512, 10 * 512))}


def split_pair_regions(pair: str) -> tuple[np.ndarray, dict]:
    """Clean stains of ``pair`` ``(2, H, W)`` and its train / val / test / calib slices."""
    if pair.startswith("w2s_"):
        w2s = SPLIT_DATA.parent / "w2s" / "clean"
        return np.stack([rescale_stain(np.concatenate([read_tiff(w2s / f"{f}_ch{c}.tif") for f in FIELDS], axis=1)
                                       .astype(np.float64)) for c in SPLIT_W2S_CH]).astype(np.float32), SPLIT_W2S_REGIONS
    return split_stains(SPLIT_PAIRS[pair]), {"train": SPLIT_TRAIN, "val": SPLIT_VAL, "test": SPLIT_TEST, "calib": SPLIT_CALIB}


def split_noisy(clean: np.ndarray, pscale: float, grel: float) -> np.ndarray:
    """The splitting task's noisy channels: Poisson at ``pscale`` photons per unit plus Gaussian
    ``grel`` x each clean channel's std, seeded per channel (11, 12, ...) so every script that
    simulates a level gets the same realisation."""
    from quietscope.simulate import poisson_gaussian

    return np.stack([poisson_gaussian(c, pscale, grel, float(c.std()), seed=11 + i) for i, c in enumerate(clean)])


def split_stains(names: tuple[str, ...]) -> np.ndarray:
    """Stains ``names`` of the BPAE field, each rescaled (1st..99.5th percentile -> 0..1000)."""
    return np.stack([rescale_stain(read_tiff(SPLIT_DATA / f"bpae_{name}.tif").astype(np.float64)) for name in names]).astype(np.float32)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-30))


def split_separation(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Output-output correlation, each output vs its own / the other clean channel, RI-PSNR.

    ``separated``: the outputs correlate within 0.1 of the clean stains' own correlation and
    each output correlates with its own stain at least 0.15 more than with the other.
    """
    stains = pearson(gt[0], gt[1])
    out = pearson(pred[0], pred[1])
    own = [pearson(pred[0], gt[0]), pearson(pred[1], gt[1])]
    other = [pearson(pred[0], gt[1]), pearson(pred[1], gt[0])]
    return {
        "corr_outputs": round(out, 3),
        "corr_stains": round(stains, 3),
        "corr_own": [round(v, 3) for v in own],
        "corr_other": [round(v, 3) for v in other],
        "ri_psnr": [round(range_invariant_psnr(p, g), 2) for p, g in zip(pred, gt)],
        "separated": bool(abs(out - stains) <= 0.1 and all(o - t >= 0.15 for o, t in zip(own, other))),
    }


# ---- the pn2v-boot data and protocol (benchmarks/pn2v_boot.py, benchmarks/fold_in_ceiling.py) ----------
FIELDS = [f"fov{i:03d}" for i in range(81, 91)]
BUDGET = {"batch": 16, "patch": 32, "depth": 2, "filters": 16, "lr": 1e-3, "mask_percent": 2.0}
BPAE_NOISE = (25.0, 0.1)


def make_data(work: Path, name: str) -> dict[str, Any]:
    """Write dataset ``name`` as OME-Zarr (noisy) + npy (clean); return its paths."""
    from quietscope.simulate import poisson_gaussian
    from quietscope.workflows.demo import write_ome_zarr_image

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    src = d / "noisy.ome.zarr"
    if name.startswith("w2s"):
        ch = name.split("-ch")[1]
        noisy = np.stack([read_tiff(data_dir() / "w2s" / "noisy" / f"{f}_ch{ch}.tif") for f in FIELDS])
        clean = np.stack([read_tiff(data_dir() / "w2s" / "clean" / f"{f}_ch{ch}.tif") for f in FIELDS]).astype(np.float32)
        if not src.exists():
            write_ome_zarr_image(src, noisy, "tyx", (1, 256, 256))  # uint8, as recorded
    else:
        clean = read_tiff(data_dir() / "bpae" / "bpae_actin.tif").astype(np.float32)
        photons, g = BPAE_NOISE
        noisy = poisson_gaussian(clean, photons / float(clean.mean()), g, float(clean.std()), seed=0).astype(np.float32)
        if not src.exists():
            write_ome_zarr_image(src, noisy, "yx", (256, 256))
        clean = clean[None]
    np.save(d / "clean.npy", clean)
    return {"name": name, "dir": str(d)}


def predict_array(model: Path, src: Path, out: Path, inference: dict | None = None) -> np.ndarray:
    """:func:`predict_run` of ``src`` (:data:`PREDICT_DEFAULTS`), every time point read back; ``out`` removed.

    Not :func:`predict`: that reads time point 0 only, and W2S's fields are stacked along t.
    """
    predict_run(model, src, out, inference=inference)
    arr = np.asarray(open_image(str(out)).array)
    shutil.rmtree(out, ignore_errors=True)
    return arr


def train_options(steps: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Method and training options of the PN2V benchmarks (:data:`BUDGET`) for ``steps`` and ``seed``."""
    method = {"net": {"depth": BUDGET["depth"], "filters": BUDGET["filters"]}, "masked_pixel_percentage": BUDGET["mask_percent"]}
    return method, budget_train_options(BUDGET, steps, seed)


def field_psnr(pred: np.ndarray, clean: np.ndarray) -> float:
    """Mean over fields (first axis) of :func:`psnr_db` after an affine fit of each field onto its clean image."""
    return float(np.mean([psnr_db(p, c, "psnr_affine") for p, c in zip(pred, clean)]))
