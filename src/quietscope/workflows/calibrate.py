"""``quietscope calibrate``: predict held-out data, calibrate the predicted spread against clean data.

The arithmetic (binned RMV vs RMSE, the fitted line, ENCE, the plot) is in
:mod:`quietscope.metrics.calibration`; this module reads the images, runs the prediction and
writes the calibrated model file.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from quietscope.chunked import PredictOptions
from quietscope.errors import ConfigError, InputError, OutputError
from quietscope.io.reading import open_image
from quietscope.methods.denoisplit import ChannelCalibration
from quietscope.methods.modelfile import load_model, save_model
from quietscope.metrics.calibration import (
    CalibrationResult,
    ChannelCurve,
    binned_rmv_rmse,
    calibrate_arrays,
    ence,
    fit_line,
    plot_calibration,
)
from quietscope.workflows.predict import predict

__all__ = ["CalibrationResult", "ChannelCurve", "binned_rmv_rmse", "calibrate_arrays", "calibrate_model", "ence",
           "fit_line", "plot_calibration"]

log = logging.getLogger(__name__)


def _read_all(uri: str | Path, axes: str | None, level: int) -> np.ndarray:

    img = open_image(uri, level=level, axes=axes)
    if img.n_timepoints != 1:
        raise InputError(f"{str(uri)!r} has {img.n_timepoints} time points; calibrate on one (crop it)")
    return img.read_tc(0, tuple(slice(None) for _ in img.spatial_shape)).astype(np.float32)


def calibrate_model(
    model_path: str | Path,
    data_uri: str | Path,
    clean_uris: list[str | Path],
    output_model: str | Path,
    plot_path: str | Path | None = None,
    n_bins: int = 30,
    n_samples: int | None = None,
    axes: str | None = None,
    level: int = 0,
    overwrite: bool = False,
) -> CalibrationResult:
    """``quietscope calibrate``: predict held-out ``data_uri``, calibrate against ``clean_uris``.

    The prediction runs the normal chunked pipeline without any stored calibration; the clean
    images (one per channel, same field, same units) are read whole, so use a held-out crop.
    The calibrated model is written to ``output_model`` (config ``calibration`` and manifest
    ``calibration`` with the curves).

    Parameters
    ----------
    model_path : str or pathlib.Path
        A denoisplit or musplit model file.
    data_uri : str or pathlib.Path
        Held-out noisy data (the superimposed input).
    clean_uris : list of str or pathlib.Path
        One clean image per output channel, in order, same field and units.
    output_model : str or pathlib.Path
        Calibrated model file to write.
    plot_path : str or pathlib.Path, optional
        PNG of RMSE vs RMV per channel.
    n_bins : int
        Equal-count bins of predicted std.
    n_samples : int, optional
        Posterior samples per pixel for the predicted spread.
    axes : str, optional
        Axes of the inputs when their metadata lack them.
    level : int
        Resolution level of multiscale inputs.
    overwrite : bool
        Replace an existing ``output_model``.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    ConfigError
        The method predicts no uncertainty, or the clean images do not match its channels.
    InputError
        Data and clean images of different fields or shapes.
    OutputError
        ``output_model`` exists (without ``overwrite``).

    Examples
    --------
    >>> calibrate_model("split.qs", "heldout.tif", ["actin.tif", "mito.tif"], "split.cal.qs")  # doctest: +SKIP
    """
    output_model = Path(output_model)
    if output_model.exists() and not overwrite:
        raise OutputError(f"{str(output_model)!r} already exists; pass --overwrite to replace it")
    method, manifest = load_model(model_path)
    if "calibration" not in type(method.config).model_fields:
        raise ConfigError(f"method {method.name!r} predicts no uncertainty; calibrate a denoisplit or musplit model")
    c = method.config.in_channels
    if len(clean_uris) != c:
        raise ConfigError(f"the model splits into {c} channels; give {c} --clean images (one per channel, in order)")
    clean = np.concatenate([_read_all(u, axes, level) for u in clean_uris], axis=0)
    tmp = Path(tempfile.mkdtemp(prefix=".quietscope-calib-", dir=str(output_model.resolve().parent)))
    try:
        raw_model = tmp / "uncalibrated.qs"
        method.config.calibration = None
        info = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "quietscope_version", "torch_version", "method")}
        save_model(raw_model, method, info)
        predict(raw_model, data_uri, tmp / "pred.ome.zarr", PredictOptions(progress=False), axes=axes, level=level,
                inference={"n_samples": n_samples})
        out = _read_all(tmp / "pred.ome.zarr", None, 0)
        if out.shape[1:] != clean.shape[1:]:
            raise InputError(f"data has spatial shape {out.shape[1:]} but the clean images {clean.shape[1:]}; give the same field")
        result = calibrate_arrays(out[:c], out[c:2 * c], clean, n_bins, method.channel_names)

        method.config.calibration = [ChannelCalibration(**f) for f in result.factors]
        info["calibration"] = {"data": str(data_uri), "clean": [str(u) for u in clean_uris], **result.to_dict()}
        save_model(output_model, method, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if plot_path is not None:
        plot_calibration(result, plot_path)
    for ch in result.channels:
        log.info("%s: RMSE = %.4g * RMV %+.4g; ENCE %.3f -> %.3f", ch.name, ch.scale, ch.offset, ch.ence_before, ch.ence_after)
    return result
