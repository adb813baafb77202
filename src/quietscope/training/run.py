"""``quietscope train``: open data, build the method, train on sampled patches, write the model file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quietscope import __version__
from quietscope.errors import ConfigError, OutputError
from quietscope.io.validation import check_finite_sample
from quietscope.methods import build_method
from quietscope.modelfile import save_model
from quietscope.training.loop import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)


def expand_patch(patch: tuple[int, ...], spatial_ndim: int) -> tuple[int, ...]:
    """``(64,)`` -> ``(64, 64)`` or ``(64, 64, 64)``; longer tuples must match the data."""
    if len(patch) == 1:
        return patch * spatial_ndim
    if len(patch) != spatial_ndim:
        raise ConfigError(f"--patch has {len(patch)} values but the data has {spatial_ndim} spatial axes; give 1 or {spatial_ndim}")
    return patch


def method_extras(
    noise_model: str | None = None,
    n_samples: int | None = None,
    psf_sigma: str | None = None,
    psf: str | None = None,
    positivity_lambda: float | None = None,
    gain: float | None = None,
    offset: float | None = None,
    noise_sigma: float | None = None,
) -> dict[str, Any]:
    """Method-specific options given on the command line, as config fields (only those set).

    Files are read here so the method's config (and thus the model file) holds their content.
    """
    out: dict[str, Any] = {}
    if noise_model is not None:
        from quietscope.noise_models import load_noise_model

        out["noise_model"] = load_noise_model(noise_model).to_dict()
    if n_samples is not None:
        out["n_samples"] = n_samples
    if psf_sigma is not None:
        try:
            out["psf_sigma"] = [float(v) for v in str(psf_sigma).split(",")]
        except ValueError:
            raise ConfigError(f"--psf-sigma {psf_sigma!r} must be a number or comma-separated numbers") from None
    if psf is not None:
        import numpy as np

        from quietscope.sample_data import read_tiff

        if not Path(psf).exists():
            raise ConfigError(f"--psf {psf!r} does not exist; give a TIFF of the point-spread function")
        out["psf"] = np.asarray(read_tiff(Path(psf)), dtype=float).tolist()
    for key, value in (("positivity_lambda", positivity_lambda), ("gain", gain), ("offset", offset), ("noise_sigma", noise_sigma)):
        if value is not None:
            out[key] = value
    return out


#: z step / pixel size from which ``--z-pool auto`` keeps full z resolution. Pooling z by 2 on
#: such a stack merges planes lying further apart than the pixels it merges in y/x, and each
#: pooled level widens the z halo by as much as the y/x one (24 voxels at depth 2).
ANISOTROPY_NO_Z_POOL = 2.0


def resolve_z_pool(
    setting: bool | str, method: str, spatial_axes: str, scale: dict[str, float],
    units: dict[str, str | None] | None = None,
) -> tuple[bool, str]:
    """Decide whether a 3D U-Net pools along z.

    Parameters
    ----------
    setting : bool or "auto"
        The user's choice; ``"auto"`` decides from the voxel size.
    method : str
        Method name (only U-Net methods can keep full z resolution).
    spatial_axes : str
        The data's spatial axes, e.g. ``"zyx"``.
    scale : dict
        Physical voxel size per axis.
    units : dict, optional
        Unit per axis; a z scale of 1 without a unit is read as "not recorded".

    Returns
    -------
    (bool, str)
        Whether to pool z, and the reason (for the log).
    """
    from quietscope.methods import get_method_class

    if setting not in (True, False, "auto"):
        raise ConfigError(f"--z-pool {setting!r} is unknown; use auto, yes or no")
    is_3d = len(spatial_axes) == 3
    if not is_3d:
        if setting is False:
            raise ConfigError("--z-pool no applies to 3D data only; drop it for 2D images")
        return True, "2D data"
    if setting != "auto":
        return bool(setting), "as given (--z-pool)"
    if not get_method_class(method).supports_z_pool_off:
        return True, f"{method} always pools z"
    z, yx = scale.get("z", 1.0), 0.5 * (scale.get("y", 1.0) + scale.get("x", 1.0))
    if units is not None and units.get("z") is None and z == 1.0:
        return True, "the input records no z spacing, so voxels are taken as isotropic; pass --z-pool no for an anisotropic stack"
    ratio = z / yx if yx > 0 else 1.0
    if ratio >= ANISOTROPY_NO_Z_POOL:
        return False, f"anisotropic voxels (z step {ratio:.3g}x the pixel size >= {ANISOTROPY_NO_Z_POOL:g}): z kept at full resolution"
    return True, f"voxels near isotropic (z step {ratio:.3g}x the pixel size)"


def checkpoint_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + ".ckpt")


def train_model(
    input_uri: str | Path | list[str | Path],
    model_path: str | Path,
    method_options: dict[str, Any],
    train_options: dict[str, Any],
    axes: str | None = None,
    level: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a model on ``input_uri`` and save it to ``model_path`` (one self-describing file).

    Several inputs (a list) are stacked as the channels of one image (splitting methods).
    """
    model_path = Path(model_path)
    if model_path.exists() and not (overwrite or resume):
        raise OutputError(f"model file {str(model_path)!r} already exists; pass --overwrite to replace it")
    from quietscope.io.stacking import open_stacked

    image = open_stacked(input_uri, level=level, axes=axes)
    # Created now, not at the first checkpoint: a missing folder must not cost a training run.
    model_path.parent.mkdir(parents=True, exist_ok=True)
    check_finite_sample(image)
    nd = len(image.spatial_axes)
    train_options = dict(train_options)
    train_options["patch"] = expand_patch(tuple(train_options.get("patch", (64,))), nd)
    try:
        tcfg = TrainConfig.model_validate(train_options)
    except Exception as exc:
        from quietscope.errors import validation_message

        raise ConfigError(f"invalid training options: {validation_message(exc)}") from None
    net = dict(method_options.get("net", {}))
    z_pool, why = resolve_z_pool(net.get("z_pool", "auto"), str(method_options.get("method", "n2v")),
                                 image.spatial_axes, dict(zip(image.axes, image.scale)),
                                 dict(zip(image.axes, image.units)))
    net["z_pool"] = z_pool
    if nd == 3:
        log.info("z pooling %s: %s", "on" if z_pool else "off", why)
    from quietscope.methods.base import NetConfig

    try:
        net_cfg = NetConfig.model_validate(net)
    except Exception as exc:
        from quietscope.errors import validation_message

        raise ConfigError(f"invalid network options: {validation_message(exc)}") from None
    factor_needed = tuple(p**net_cfg.depth for p in net_cfg.pool(nd))
    if any(p % f for p, f in zip(tcfg.patch, factor_needed)):
        raise ConfigError(f"--patch {tcfg.patch} must be a multiple of {factor_needed} (2**depth on every pooled axis)")
    config = {"spatial_ndim": nd, "in_channels": image.n_channels, **method_options, "net": net}
    # Seed before building: the initial weights are part of what --seed makes reproducible.
    import torch

    torch.manual_seed(tcfg.seed)
    method = build_method(config)
    log.info(
        "training %s on %s: axes %s, shape %s, patch %s, batch %d, %d steps",
        method.name, input_uri, image.axes, image.shape, tcfg.patch, tcfg.batch, tcfg.steps,
    )
    result = train(image, method, tcfg, checkpoint=checkpoint_path(model_path), resume=resume, progress=progress)
    info = {
        "train": tcfg.model_dump(mode="json"),
        "axes": image.axes,
        "spatial_axes": image.spatial_axes,
        "scale": list(image.scale),
        "data_stats": result.stats,
        "training_data": {"uri": str(input_uri), "level": level, "shape": list(image.shape), "dtype": str(image.dtype)},
        "history": result.history,
        "best_val_loss": result.best_val,
        "best_step": result.best_step,
        "kept_step": result.kept_step,
        "train_seconds": result.seconds,
        "created_by": f"quietscope {__version__}",
    }
    save_model(model_path, result.method, info)
    checkpoint_path(model_path).unlink(missing_ok=True)
    try:
        from quietscope.training.curves import plot_learning_curve

        plot_learning_curve(result.history, model_path.with_suffix(".learning_curve.png"))
    except Exception as exc:  # a plot must never lose a trained model
        log.warning("could not write the learning-curve plot: %s", exc)
    log.info("model written to %s (%.1f s)", model_path, result.seconds)
    return result
