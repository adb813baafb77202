"""``inspect-noise``: run the noise analysis on a bounded random sample of blocks of a large image.

The analysis functions of this package work on small in-memory blocks; this module picks
those blocks from a lazily opened image (OME-Zarr, zarr, TIFF), never reading the whole
volume, and optionally pairs them with a model's prediction or an already predicted image
to judge what a denoiser left in its residual.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quietscope.errors import ConfigError, InputError, OutputError
from quietscope.inference import load_for_inference, predict_whole
from quietscope.io.reading import Image, open_image
from quietscope.io.sampling import BlockSample, block_shape_for, read_blocks, sample_blocks
from quietscope.methods import get_method_class
from quietscope.methods.base import NetConfig
from quietscope.noise_analysis.correlation import (
    DEFAULT_THRESHOLD,
    NoiseStructure,
    ResidualQuality,
    detect_structured_noise,
    noise_autocorrelation,
    raw_noise_autocorrelation,
    residual_quality,
)
from quietscope.noise_analysis.plots import plot_autocorrelation, plot_mean_variance
from quietscope.noise_analysis.report import NoiseReport, analyse_noise, build_report, eight_bit_warning
from quietscope.training.config import DEFAULT_PATCH, fitting_patch

log = logging.getLogger(__name__)

#: |lag-1 residual correlation - raw noise lag-1 correlation| beyond which the residual is
#: judged to differ from the noise (the estimate's scatter is ~1/sqrt(pixels), far smaller).
RESIDUAL_TOLERANCE = 0.1
#: |correlation of residual and prediction| beyond which signal is said to leak.
SIGNAL_LEAK = 0.1


@dataclass
class InspectResult:
    """Outcome of :func:`inspect_noise`.

    Attributes
    ----------
    report : NoiseReport
        Assumptions, recommendation and (with a prediction) residual quality.
    acf : numpy.ndarray
        Noise autocorrelation window measured on the raw blocks.
    residual_acf : numpy.ndarray or None
        Full autocorrelation window of ``data - prediction`` when a prediction was given.
    sample : BlockSample
        Which blocks were read.
    block_shape : tuple of int
        Spatial shape of the blocks.
    voxels_read : int
        Voxels read from the data (per channel analysed).
    image_voxels : int
        Voxels of one channel of the whole image (all time points).
    axes : str
        Spatial axis letters.
    channel : int
        Channel analysed.
    files : dict
        Written files by role (``report``, ``mean_variance``, ``autocorrelation``, ...).
    command : list of str
        The recommended ``quietscope train`` command line, runnable on this input as it stands.
    """

    report: NoiseReport
    acf: np.ndarray
    residual_acf: np.ndarray | None
    sample: BlockSample
    block_shape: tuple[int, ...]
    voxels_read: int
    image_voxels: int
    axes: str
    channel: int
    source: str
    residual_source: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    @property
    def fraction_read(self) -> float:
        """Share of the image's voxels (one channel) that were read."""
        return self.voxels_read / max(self.image_voxels, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: the report plus where its numbers come from."""
        out = self.report.to_dict()
        out["sample"] = {
            "input": self.source,
            "axes": self.axes,
            "channel": self.channel,
            "n_blocks": len(self.sample.t),
            "block_shape": list(self.block_shape),
            "voxels_read": int(self.voxels_read),
            "fraction_read": float(self.fraction_read),
            "blocks": self.sample.to_dict(),
        }
        out["residual_source"] = self.residual_source
        out["command"] = shlex.join(self.command)
        out["files"] = {k: str(v) for k, v in self.files.items()}
        return out

    def to_json(self, indent: int = 2) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """The plain-words report preceded by one line on what was read."""
        head = (
            f"Read {len(self.sample.t)} blocks of {'x'.join(map(str, self.block_shape))} "
            f"({self.axes}) from {self.source}: {self.voxels_read:,} voxels, "
            f"{100 * self.fraction_read:.3g} % of the image"
            + (f" (channel {self.channel})" if self.channel else "")
            + "."
        )
        if self.residual_source:
            head += f"\nResidual: data minus {self.residual_source}."
        return head + "\n\n" + self.report.to_text()


def predict_blocks(
    model_path: str | Path, image: Image, sample: BlockSample, channel: int = 0, device: str = "cpu"
) -> list[np.ndarray]:
    """A model's prediction of each sampled block, each predicted on its own (reflect-padded).

    Blocks are small, so each is predicted in one tile with a halo equal to the model's
    measured receptive field (:func:`quietscope.chunked.predict_whole`).

    Parameters
    ----------
    model_path : str or pathlib.Path
        ``.qs`` model file.
    image : Image
        The data the blocks come from (all channels are fed to the model).
    sample : BlockSample
        Blocks to predict.
    channel : int
        Output channel compared with the data.
    device : str
        ``cpu``, ``cuda`` or ``auto``.

    Returns
    -------
    list of numpy.ndarray
        float32 predictions, one per block, spatial shape of the block.
    """
    model = load_for_inference(model_path, device, spatial_axes=image.spatial_axes, n_channels=image.n_channels,
                               where=f"input {image.ref.uri!r}")
    fn = model.tile_function()
    out = []
    for t, sl in zip(sample.t, sample.slices):
        block = image.read_tc(t, sl).astype(np.float32)
        pred = predict_whole(fn, block, model.halo, model.factor)
        out.append(pred[min(channel, pred.shape[0] - 1)])
    return out


def read_prediction(
    path: str | Path, image: Image, sample: BlockSample, channel: int = 0, level: int = 0
) -> list[np.ndarray]:
    """Read the same blocks from an already predicted image of the same shape."""
    pred = open_image(path, level=level)
    if pred.spatial_shape != image.spatial_shape or pred.n_timepoints != image.n_timepoints:
        raise InputError(
            f"prediction {str(path)!r} has spatial shape {pred.spatial_shape} and "
            f"{pred.n_timepoints} time points but the data has {image.spatial_shape} and "
            f"{image.n_timepoints}; pass the prediction of this image at the same level"
        )
    c = min(channel, pred.n_channels - 1)
    return [pred.read_tc(t, sl, c)[0].astype(np.float32) for t, sl in zip(sample.t, sample.slices)]


def residual_advice(
    structure: NoiseStructure,
    quality: ResidualQuality,
    tolerance: float = RESIDUAL_TOLERANCE,
    leak: float = SIGNAL_LEAK,
) -> list[str]:
    """Plain sentences on what a prediction left in (or took from) its residual.

    A perfect denoiser leaves exactly the noise in ``data - prediction``, so each axis's
    lag-1 correlation of the residual should match the raw noise's (0 for pixel-independent
    noise, the measured value for correlated noise). A residual *whiter* than the noise along
    a correlated axis means the structured noise was copied into the prediction; a residual
    *more* correlated than the noise means image structure was removed with it.

    Parameters
    ----------
    structure : NoiseStructure
        Noise correlation measured on the raw data.
    quality : ResidualQuality
        From :func:`~quietscope.noise_analysis.correlation.residual_quality`.
    tolerance : float
        Allowed difference of lag-1 correlations.
    leak : float
        |Correlation of residual and prediction| counted as signal leaking.

    Returns
    -------
    list of str
    """
    out = []
    for axis, r in quality.lag1.items():
        if axis not in structure.axes:
            continue
        a = structure.axes[axis]
        expected = a.strength
        if r < expected - tolerance and not a.correlated:
            out.append(
                f"residual along {axis} is anti-correlated (lag-1 {r:+.2f}, noise {expected:+.2f}): "
                "the prediction carries part of the neighbours' noise, typical of a blind-spot "
                "network leaning on its nearest neighbours (short training, little data, low SNR)"
            )
        elif r < expected - tolerance:
            out.append(
                f"residual along {axis} is whiter (lag-1 {r:+.2f}) than the noise itself "
                f"({expected:+.2f}): the correlated part of the noise stayed in the prediction; "
                f"train with --struct-mask {axis}:{a.mask_length}"
            )
        elif r > expected + tolerance:
            out.append(
                f"residual along {axis} is more correlated (lag-1 {r:+.2f}) than the noise "
                f"({expected:+.2f}): image structure was removed with the noise (over-smoothing); "
                "train longer, on more data, or with a smaller struct mask"
            )
    if abs(quality.signal_correlation) > leak:
        out.append(
            f"the residual correlates with the prediction ({quality.signal_correlation:+.2f}): "
            "signal leaks into the residual, or the prediction is biased with intensity"
        )
    if not out:
        out.append(
            "the residual looks like the noise: as correlated as the raw noise along every axis "
            "and uncorrelated with the prediction"
        )
    return out


def data_options(image: Image, options: list[str]) -> list[str]:
    """``options`` plus what ``train``'s defaults need to run on this image.

    The default patch (64 per axis) does not fit a thin stack (17 planes) or a small image, so
    a patch clipped to the data (a multiple of the U-Net's pooling) is added after the method;
    a stack thinner than that pooling is trained at full z resolution (``--z-pool no``).
    """
    shape = image.spatial_shape
    multiple = 2 ** NetConfig().depth
    patch = fitting_patch(shape, DEFAULT_PATCH, multiple)
    extra: list[str] = []
    if patch != (DEFAULT_PATCH,) * len(shape):
        extra += ["--patch", ",".join(map(str, patch))]
    method = options[1] if options[:1] == ["--method"] else "n2v"
    if len(shape) == 3 and shape[0] < multiple and get_method_class(method).supports_z_pool_off:
        extra += ["--z-pool", "no"]
    return options[:2] + extra + options[2:]


def train_command(uri: str | Path, options: list[str], axes: str | None, level: int) -> list[str]:
    """The ``quietscope train`` command line for ``uri`` with the recommended ``options``.

    ``--axes`` and ``--level`` are repeated when the analysis needed them, so the command
    opens the input the same way.
    """
    cmd = ["quietscope", "train", str(uri), "-o", "model.qs", *options]
    if axes is not None:
        cmd += ["--axes", axes]
    if level:
        cmd += ["--level", str(level)]
    return cmd


def _with_residual(report: NoiseReport, image: Image, sample: BlockSample, blocks: list[np.ndarray],
                   model: str | Path | None, prediction: str | Path | None, channel: int, device: str, level: int,
                   max_lag: int) -> tuple[NoiseReport, Any, str | None]:
    """Add what a denoiser left in its residual, when a model or a prediction is given."""
    if model is not None:
        preds = predict_blocks(model, image, sample, channel, device)
        source = f"the prediction of model {model}"
    elif prediction is not None:
        preds = read_prediction(prediction, image, sample, channel, level)
        source = f"the predicted image {prediction}"
    else:
        return report, None, None
    quality = residual_quality(blocks, preds, image.spatial_axes)
    residual_acf = noise_autocorrelation([b.astype(np.float64) - p for b, p in zip(blocks, preds)], max_lag)
    report = build_report(report.estimate, report.structure, quality)
    report.notes += residual_advice(report.structure, quality)
    return report, residual_acf, source


def inspect_noise(
    uri: str | Path,
    *,
    report_dir: str | Path | None = None,
    n_blocks: int = 16,
    block_size: Sequence[int] | int = 128,
    offset: float | None = None,
    model: str | Path | None = None,
    prediction: str | Path | None = None,
    axes: str | None = None,
    level: int = 0,
    channel: int = 0,
    seed: int = 0,
    max_lag: int = 6,
    threshold: float = DEFAULT_THRESHOLD,
    device: str = "cpu",
) -> InspectResult:
    """Measure the noise of a large image from a random sample of blocks, and advise a method.

    Parameters
    ----------
    uri : str or pathlib.Path
        Image (OME-Zarr, zarr array or TIFF) in raw camera units.
    report_dir : str or pathlib.Path, optional
        Folder for ``report.json``, ``mean_variance.png``, ``autocorrelation.png`` (and
        ``residual_autocorrelation.png`` with a prediction); created if missing. Nothing is
        written when None.
    n_blocks : int
        Blocks to read (at most; fewer if the image holds fewer).
    block_size : int or sequence of int
        Block edge, one value or one per spatial axis; clipped to the image.
    offset : float, optional
        Known camera offset (ADU); estimated from the darkest pixels otherwise.
    model : str or pathlib.Path, optional
        Model file whose prediction of each block defines the residual.
    prediction : str or pathlib.Path, optional
        Already predicted image of the same shape (alternative to ``model``).
    axes : str, optional
        Axes of the input when its metadata lacks them.
    level : int
        Resolution level (of the input and of ``prediction``).
    channel : int
        Channel to analyse.
    seed : int
        Seed of the block draw.
    max_lag : int
        Largest lag of the autocorrelation.
    threshold : float
        |Correlation| counted as correlated.
    device : str
        Device for ``model``.

    Returns
    -------
    InspectResult
    """
    if model is not None and prediction is not None:
        raise ConfigError("give either --model or --prediction, not both")
    image = open_image(uri, level=level, axes=axes)
    spatial_axes = image.spatial_axes
    block = block_shape_for(image.spatial_shape, block_size)
    sample = sample_blocks(image.spatial_shape, block, n_blocks, image.n_timepoints, seed)
    blocks = read_blocks(image, sample, channel)
    voxels = sum(b.size for b in blocks)
    image_voxels = math.prod(image.spatial_shape) * image.n_timepoints
    log.info(
        "read %d blocks of %s from %s: %d voxels (%.3g %% of the image)",
        len(blocks), block, uri, voxels, 100 * voxels / image_voxels,
    )
    if image.dtype.kind == "f" and not all(np.isfinite(b).all() for b in blocks):
        raise InputError(f"input {str(uri)!r} contains NaN/inf values; replace them before the analysis")
    # Lags must stay shorter than the block (thin z stacks).
    max_lag = min(max_lag, min(block) - 1)
    acf = raw_noise_autocorrelation(blocks, max_lag)
    try:
        report = analyse_noise(
            blocks, axes=spatial_axes, offset=offset, max_lag=max_lag, threshold=threshold
        )
    except InputError as exc:
        # Flat samples (one intensity level) defeat the gain fit, not the correlation.
        report = build_report(None, detect_structured_noise(acf, spatial_axes, threshold))
        report.notes.append(f"no camera noise model: {exc}")

    report, residual_acf, source = _with_residual(report, image, sample, blocks, model, prediction, channel, device,
                                                  level, max_lag)
    report.options = data_options(image, report.options)
    stretched = eight_bit_warning(blocks)
    if stretched:
        log.warning("%s", stretched)
        report.notes.append(stretched)

    result = InspectResult(
        report=report,
        acf=acf,
        residual_acf=residual_acf,
        sample=sample,
        block_shape=block,
        voxels_read=voxels,
        image_voxels=image_voxels,
        axes=spatial_axes,
        channel=channel,
        source=str(uri),
        residual_source=source,
        command=train_command(uri, report.options, axes, level),
    )
    if report_dir is not None:
        write_report(result, report_dir)
    return result


def write_report(result: InspectResult, report_dir: str | Path) -> dict[str, Path]:
    """Write the plots and ``report.json`` into ``report_dir`` (created if missing)."""
    d = Path(report_dir)
    if d.exists() and not d.is_dir():
        raise OutputError(f"report folder {str(d)!r} is a file; choose a folder with -o")
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if result.report.estimate is not None:
        files["mean_variance"] = plot_mean_variance(result.report.estimate, d / "mean_variance.png")
    files["autocorrelation"] = plot_autocorrelation(result.acf, result.axes, d / "autocorrelation.png")
    if result.residual_acf is not None:
        files["residual_autocorrelation"] = plot_autocorrelation(
            result.residual_acf, result.axes, d / "residual_autocorrelation.png"
        )
    files["report"] = d / "report.json"
    result.files.update(files)
    files["report"].write_text(result.to_json())
    return files
