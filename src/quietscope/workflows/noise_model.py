"""``quietscope noise-model``: fit a noise model from images on disk.

The sources: a calibration stack, noisy/clean pairs, or a trained denoiser's prediction of
the data itself ("bootstrapping", Prakash et al. 2020).

The images are opened lazily (:func:`quietscope.io.open_image`) and at most ``max_pairs``
``(signal, observation)`` pixels are sampled from them, so that an image of any size gives a
noise model in bounded memory and time. The only full passes over the data are the ones the
source needs: the pixel-wise mean of a calibration stack, and the chunked prediction of the
data for bootstrapping.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from quietscope.chunked import PredictOptions
from quietscope.errors import ConfigError, InputError
from quietscope.io.reading import Image, open_image
from quietscope.io.sampling import block_shape_for, covering_tiles, read_blocks, sample_blocks
from quietscope.noise_analysis.poisson_gaussian import estimate_poisson_gaussian
from quietscope.noise_models import load_noise_model
from quietscope.noise_models.base import NoiseModel
from quietscope.noise_models.fit import DEFAULT_MAX_PAIRS, Kind, fit_noise_model
from quietscope.noise_models.pairs import detect_clipping, match_variance_line, pairs_from_paired, pairs_from_prediction
from quietscope.noise_models.plot import plot_noise_model
from quietscope.workflows.predict import predict

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "bootstrap",
    "bootstrap_pairs",
    "calibration_pairs",
    "data_range",
    "data_variance_line",
    "fit_from_calibration",
    "fit_from_pairs",
    "fit_noise_model",
    "integer_data_fit_options",
    "paired_pairs",
    "sample_pairs",
]

def _finish(
    s: np.ndarray, x: np.ndarray, kind: Kind, plot_path: str | Path | None, fit: dict[str, Any]
) -> NoiseModel:
    log.info("fitting a %s noise model on %d pairs (signal %.6g..%.6g)", kind, s.size, s.min(), s.max())
    model = fit_noise_model(s, x, kind, **fit)
    if plot_path is not None:

        plot_noise_model(model, s, x, path=plot_path)
    return model


# ---- lazy sampling -----------------------------------------------------------------------
def _channel(image: Image, channel: int | None, where: str) -> int:
    n = image.n_channels
    if channel is None:
        if n > 1:
            raise ConfigError(
                f"{where} has {n} channels; choose the one to fit with --channel (0..{n - 1})"
            )
        return 0
    if not 0 <= channel < n:
        raise ConfigError(f"--channel {channel} does not exist in {where}: it has channels 0..{n - 1}")
    return channel


def _stack(image: Image, channel: int) -> Any:
    """Dask view ``(T, *spatial)`` of one channel (``T = 1`` without a time axis)."""
    arr = image.data[tuple(channel if a == "c" else slice(None) for a in image.axes)]
    return arr if "t" in image.axes else arr[None]


def _subsample(
    s: np.ndarray, x: np.ndarray, max_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if s.size <= max_pairs:
        return s, x
    keep = rng.choice(s.size, size=int(max_pairs), replace=False)
    return s[keep], x[keep]


def _check_max_pairs(max_pairs: int) -> None:
    if int(max_pairs) != max_pairs or max_pairs < 100:
        raise ConfigError(f"max_pairs={max_pairs} is invalid; use an integer >= 100 (default 10^6)")


def sample_pairs(
    signal_uri: str | Path,
    noisy_uri: str | Path,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    signal_channel: int | None = None,
    axes: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Read matching ``(signal, observation)`` pixels from two images of the same shape.

    ``signal_uri`` may also hold one time point for a noisy time series (a clean image of a
    static sample recorded many times). At most about ``max_pairs`` pixels are read.

    Parameters
    ----------
    signal_uri, noisy_uri : str or Path
        Clean (or pseudo-clean) image and its noisy counterpart.
    max_pairs : int
        Upper bound on the pairs returned.
    channel : int, optional
        Channel of the noisy image (required when it has several).
    signal_channel : int, optional
        Channel of the signal image; default ``channel``, or 0 when the signal has one.
    axes : str, optional
        Axes of both images when their metadata lacks them.
    seed : int
        Seeds the choice of regions.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    _check_max_pairs(max_pairs)
    return _pairs_from_images(
        open_image(signal_uri, axes=axes), open_image(noisy_uri, axes=axes),
        max_pairs, channel, signal_channel, seed,
    )


def _pairs_from_images(
    clean: Image,
    noisy: Image,
    max_pairs: int,
    channel: int | None,
    signal_channel: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    c_noisy = _channel(noisy, channel, f"noisy image {noisy.ref.uri!r}")
    if signal_channel is None:
        signal_channel = 0 if clean.n_channels == 1 else c_noisy
    c_clean = _channel(clean, signal_channel, f"clean image {clean.ref.uri!r}")
    xs, ss = _stack(noisy, c_noisy), _stack(clean, c_clean)
    if ss.shape[1:] != xs.shape[1:] or ss.shape[0] not in (1, xs.shape[0]):
        raise InputError(
            f"noisy image {noisy.ref.uri!r} has shape {noisy.shape} ({noisy.axes}) but clean "
            f"image {clean.ref.uri!r} has shape {clean.shape} ({clean.axes}); pass images of the "
            "same shape (or one clean image for a noisy time series)"
        )
    rng = np.random.default_rng(seed)
    s_parts, x_parts = [], []
    for region in covering_tiles(tuple(xs.shape), 2 * max_pairs, rng):
        x = np.asarray(xs[region].compute())
        s_region = region if ss.shape[0] > 1 else (slice(0, 1),) + region[1:]
        s = np.asarray(ss[s_region].compute())
        s, x = pairs_from_paired(x, np.broadcast_to(s, x.shape))
        s_parts.append(s)
        x_parts.append(x)
    return _subsample(np.concatenate(s_parts), np.concatenate(x_parts), max_pairs, rng)


def data_range(
    uri: str | Path,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Smallest and largest value of one channel of an image.

    From about ``max_pairs`` sampled pixels (exact when the image holds no more), for
    :meth:`~quietscope.noise_models.base.NoiseModel.check_range`.
    """
    _check_max_pairs(max_pairs)
    image = open_image(uri, axes=axes)
    arr = _stack(image, _channel(image, channel, f"image {str(uri)!r}"))
    lo, hi = math.inf, -math.inf
    for region in covering_tiles(tuple(arr.shape), max_pairs, np.random.default_rng(seed)):
        block = np.asarray(arr[region].compute())
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return lo, hi


# ---- the three sources -------------------------------------------------------------------
def calibration_pairs(
    stack_uri: str | Path,
    *,
    stack_axis: Literal["t", "z"] | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from a calibration stack: many noisy images of one static sample.

    The signal of a pixel is its mean over the stack (one lazy pass over the data); the
    observations are a random subset of the stack's images.

    Parameters
    ----------
    stack_uri : str or Path
        The stack (TIFF, zarr or OME-Zarr).
    stack_axis : {"t", "z"}, optional
        Axis along which the images are stacked; default ``t`` when the data has a time
        axis, else ``z`` (a ``zyx`` TIFF of 2D frames).
    max_pairs, channel, axes, seed
        As in :func:`sample_pairs`.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    _check_max_pairs(max_pairs)
    image = open_image(stack_uri, axes=axes)
    where = f"calibration stack {str(stack_uri)!r}"
    c = _channel(image, channel, where)
    if stack_axis is None:
        stack_axis = "t" if "t" in image.axes else "z"
        if stack_axis not in image.axes:
            raise InputError(
                f"{where} is a single {image.axes} image; a calibration stack needs ≥2 (ideally "
                "≥50) noisy images of a static sample, stacked along t or z"
            )
    if stack_axis not in image.axes:
        raise InputError(
            f"{where} has axes {image.axes!r}, without the stack axis {stack_axis!r}; stack the "
            "noisy images along t or z (or pass --axes, e.g. --axes tyx)"
        )
    arr = image.data[tuple(c if a == "c" else slice(None) for a in image.axes)]
    kept = [a for a in image.axes if a != "c"]
    arr = arr.transpose([kept.index(stack_axis)] + [i for i, a in enumerate(kept) if a != stack_axis])
    n = int(arr.shape[0])
    if n < 2:
        raise InputError(
            f"{where} holds {n} image along {stack_axis}; a calibration stack needs ≥2 (ideally "
            "≥50) noisy images of a static sample"
        )
    log.info("calibration stack %s: %d images of %s along %s", stack_uri, n, arr.shape[1:], stack_axis)
    signal = np.asarray(arr.astype(np.float64).mean(axis=0).compute(), dtype=np.float32)
    rng = np.random.default_rng(seed)
    per_image = signal.size
    n_images = min(n, max(2, -(-2 * max_pairs // per_image)))
    picks = np.sort(rng.choice(n, size=n_images, replace=False))
    frames = np.asarray(arr[picks].compute())
    # Paired with the mean of the *whole* stack (pairs_from_calibration would average only
    # the frames read here), as PN2V's calibration protocol does.
    s, x = pairs_from_paired(frames, signal)
    return _subsample(s, x, max_pairs, rng)


def paired_pairs(
    noisy_uri: str | Path,
    clean_uri: str | Path,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from noisy images and their clean (ground-truth) counterpart; see :func:`sample_pairs`."""
    return sample_pairs(clean_uri, noisy_uri, max_pairs=max_pairs, channel=channel, axes=axes, seed=seed)


def bootstrap_pairs(
    model_path: str | Path,
    data_uri: str | Path,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    clip_percentile: float = 0.5,
    work_dir: str | Path | None = None,
    predict_options: Any = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrapped pairs: a trained denoiser's prediction of DATA as pseudo-signal.

    DATA is predicted through the chunked pipeline (:func:`quietscope.chunked.predict`) into a
    temporary OME-Zarr, so data of any size works; pairs are then sampled from prediction and
    data, and those whose pseudo-signal lies in the lowest or highest ``clip_percentile``
    percent are dropped (:func:`~quietscope.noise_models.pairs_from_prediction`).

    Parameters
    ----------
    model_path : str or Path
        A model file (``quietscope train``, e.g. ``--method n2v``).
    data_uri : str or Path
        The noisy data the noise model is for.
    max_pairs, channel, axes, seed
        As in :func:`sample_pairs`.
    clip_percentile : float
        Percent of pairs dropped at each end of the pseudo-signal range.
    work_dir : str or Path, optional
        Where the temporary prediction is written (default: the system's temporary folder);
        it needs room for one float32 copy of DATA and is removed afterwards.
    predict_options : quietscope.chunked.PredictOptions, optional
        Options of the prediction (device, tile size, threads, ...).

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    s, x = _predicted_pairs(model_path, data_uri, max_pairs, channel, axes, work_dir, predict_options, seed)
    return pairs_from_prediction(s, x, clip_percentile)


def _predicted_pairs(
    model_path: str | Path, data_uri: str | Path, max_pairs: int, channel: int | None, axes: str | None,
    work_dir: str | Path | None, predict_options: Any, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, data) pairs of :func:`bootstrap_pairs` before clipping."""
    _check_max_pairs(max_pairs)
    opts = predict_options or PredictOptions()
    opts = opts.model_copy(update={"output": opts.output.model_copy(
        update={"n_levels": 1, "overwrite": True, "resume": False, "dtype": "float32"})})
    tmp = Path(tempfile.mkdtemp(prefix="quietscope-bootstrap-", dir=None if work_dir is None else str(work_dir)))
    try:
        out = tmp / "prediction.ome.zarr"
        log.info("bootstrapping: predicting %s with %s into %s", data_uri, model_path, out)
        predict(model_path, data_uri, out, opts, axes=axes)
        # The prediction's OME-Zarr carries its own axes; only the data may need --axes.
        return _pairs_from_images(open_image(out), open_image(data_uri, axes=axes), max_pairs, channel, None, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fit_from_calibration(
    stack_uri: str | Path,
    kind: Kind = "gmm",
    *,
    stack_axis: Literal["t", "z"] | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
    **fit: Any,
) -> NoiseModel:
    """Fit a noise model on a calibration stack (signal = pixel-wise mean of the stack).

    Parameters
    ----------
    stack_uri : str or Path
        Noisy images of a static sample stacked along t (or z).
    kind : {"gmm", "histogram"}
        Model kind (default GMM with 3 components, linear in the signal).
    stack_axis, max_pairs, channel, axes, seed
        See :func:`calibration_pairs`.
    plot_path : str or Path, optional
        Also write :func:`~quietscope.noise_models.plot_noise_model`'s PNG with the pairs.
    **fit
        ``n_gaussian``, ``n_coeff``, ``bins``, ``min_row_pairs``, ``n_iterations`` of
        :func:`fit_noise_model`.

    Returns
    -------
    NoiseModel
    """
    s, x = calibration_pairs(
        stack_uri, stack_axis=stack_axis, max_pairs=max_pairs, channel=channel, axes=axes, seed=seed
    )
    return _finish(s, x, kind, plot_path, {"seed": seed, **fit})


def fit_from_pairs(
    noisy_uri: str | Path,
    clean_uri: str | Path,
    kind: Kind = "gmm",
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
    **fit: Any,
) -> NoiseModel:
    """Fit a noise model on noisy images and their clean counterpart (same shape).

    Parameters are as in :func:`fit_from_calibration`; see :func:`paired_pairs`.
    """
    s, x = paired_pairs(noisy_uri, clean_uri, max_pairs=max_pairs, channel=channel, axes=axes, seed=seed)
    return _finish(s, x, kind, plot_path, {"seed": seed, **fit})


def bootstrap(
    model_path: str | Path,
    data_uri: str | Path,
    kind: Kind = "gmm",
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    channel: int | None = None,
    axes: str | None = None,
    clip_percentile: float = 0.5,
    work_dir: str | Path | None = None,
    predict_options: Any = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
    variance_from_data: bool = False,
    censor_clipped: bool = True,
    **fit: Any,
) -> NoiseModel:
    """Fit a noise model on DATA with a trained denoiser's prediction as pseudo-signal.

    For data without a calibration stack or clean images: train N2V on DATA
    (``quietscope train DATA --method n2v``), then bootstrap a noise model for PN2V from it.
    Parameters are as in :func:`bootstrap_pairs` and :func:`fit_from_calibration`.

    With ``variance_from_data`` (GMM only) the residuals are rescaled so that their variance
    follows DATA's own Poisson–Gaussian line (:func:`data_variance_line`,
    :func:`~quietscope.noise_models.pairs.match_variance_line`): the denoiser's error no longer
    widens the model. For data whose noise is Poisson–Gaussian (cameras, photon counters).

    With ``censor_clipped`` (GMM only) integer data are treated as what they are
    (:func:`integer_data_fit_options`): observations piled up at the ends of the type's range
    (8-bit 0/255 after a contrast stretch, a saturated camera) are censored, and no component
    may be narrower than half a quantisation step.
    """
    if variance_from_data and kind != "gmm":
        raise ConfigError("--variance-from-data applies to GMM noise models; drop it or use --kind gmm")
    s_all, x_all = _predicted_pairs(model_path, data_uri, max_pairs, channel, axes, work_dir, predict_options, seed)
    s, x = pairs_from_prediction(s_all, x_all, clip_percentile)
    if kind == "gmm":
        # Clipping drops the pairs whose *pseudo-signal* is extreme, and with them the brightest
        # observations; the GMM extrapolates, so it must accept the sample's whole range, or PN2V
        # training refuses the data whenever a batch holds one of those pixels.
        fit = {"observed_range": (float(x_all.min()), float(x_all.max())), **fit}
        if censor_clipped:
            fit = {**integer_data_fit_options(open_image(data_uri, axes=axes).dtype, s_all, x_all), **fit}
    if not variance_from_data:
        return _finish(s, x, kind, plot_path, {"seed": seed, **fit})

    gain, intercept = data_variance_line(data_uri, channel=channel, axes=axes, seed=seed)
    x_fit, bin_s, factor = match_variance_line(s, x, gain, intercept)
    log.info(
        "variance from the data: var = %.6g * s + %.6g; residuals scaled by %.3f..%.3f (median %.3f) "
        "over signal %.6g..%.6g", gain, intercept, factor.min(), factor.max(), float(np.median(factor)),
        bin_s.min(), bin_s.max(),
    )
    return _finish(s, x_fit, kind, plot_path, {"seed": seed, **fit})


def integer_data_fit_options(dtype: Any, s: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """GMM fit options for integer data: censored ends where pixels pile up at the type's
    limits, and a std floor of half a quantisation step (a component narrower than that sits
    on one integer value and turns the quantisation into spikes of density). ``{}`` for
    floating-point data.

    Parameters
    ----------
    dtype : numpy dtype
        The data's type.
    s, x : np.ndarray
        Pseudo-signal and observations of the fitting pairs.

    Returns
    -------
    dict
        ``clip``, ``half_step`` and ``min_sigma`` for :func:`fit_noise_model`.
    """
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        return {}
    info = np.iinfo(dt)
    clip = detect_clipping(x, (float(info.min), float(info.max)))
    if clip != (None, None):
        lo, hi = clip
        log.info("the data are clipped at %s: %.3f %% of the sampled pixels at %s, %.3f %% at %s; those are censored in "
                 "the noise model", dt.name, 100 * float(np.mean(x <= info.min)), info.min, 100 * float(np.mean(x >= info.max)),
                 info.max)
    span = float(s.max() - s.min())
    return {"clip": clip if clip != (None, None) else None, "half_step": 0.5,
            "min_sigma": max(0.5, 1e-3 * span) if span > 0 else 0.5}


def data_variance_line(
    data_uri: str | Path,
    *,
    channel: int | None = None,
    axes: str | None = None,
    n_blocks: int = 32,
    block_size: int = 128,
    seed: int = 0,
) -> tuple[float, float]:
    """``(gain, intercept)`` of DATA's noise variance line ``var = gain * mean + intercept``.

    Estimated from local residuals of ``n_blocks`` sampled blocks (as ``inspect-noise`` does).
    """
    image = open_image(data_uri, axes=axes)
    ch = _channel(image, channel, str(data_uri))
    block = block_shape_for(image.spatial_shape, block_size)
    sample = sample_blocks(image.spatial_shape, block, n_blocks, image.n_timepoints, seed)
    est = estimate_poisson_gaussian([b.astype(np.float64) for b in read_blocks(image, sample, ch)])
    if not est.gain > 0:
        raise InputError(
            f"the noise variance of {str(data_uri)!r} does not grow with intensity (fitted gain "
            f"{est.gain:.4g}); it is not Poisson–Gaussian, so bootstrap without --variance-from-data"
        )
    return float(est.gain), float(est.intercept)


def plot_model_file(
    noise_model_file: str | Path,
    output: str | Path,
    data: str | Path | None = None,
    signal: str | Path | None = None,
    channel: int | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    axes: str | None = None,
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Draw a noise-model file as a PNG, optionally over data (``quietscope noise-model plot``).

    Parameters
    ----------
    noise_model_file : str or pathlib.Path
        JSON noise model.
    output : str or pathlib.Path
        PNG to write.
    data : str or pathlib.Path, optional
        Noisy data the model is meant for: its range is checked against the model's.
    signal : str or pathlib.Path, optional
        With ``data``: its clean or denoised counterpart; the pairs are drawn under the model.
    channel : int, optional
        Channel of multi-channel data.
    max_pairs : int
        Pixels sampled from the data.
    axes : str, optional
        Axes of the data when its metadata lacks them.

    Returns
    -------
    ((float, float), (float, float)) or None
        The data's range and the model's observation range, when ``data`` was given.

    Raises
    ------
    ModelError
        The model file is unreadable, or the data lie outside the model's range.
    """
    model = load_noise_model(noise_model_file)
    s = x = None
    covered = None
    if data is not None:
        lo, hi = data_range(data, channel=channel, axes=axes, max_pairs=max_pairs)
        model.check_range(lo, hi)
        covered = ((lo, hi), tuple(model.observation_range))
        if signal is not None:
            s, x = sample_pairs(signal, data, max_pairs=max_pairs, channel=channel, axes=axes)
    plot_noise_model(model, s, x, path=output)
    return covered

