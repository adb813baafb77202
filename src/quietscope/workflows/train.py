"""``quietscope train``: open data, build the method, train on sampled patches, write the model file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quietscope import __version__
from quietscope.errors import ConfigError, ModelError, OutputError, validation_message
from quietscope.io.reading import Image
from quietscope.io.sample_data import read_tiff
from quietscope.io.stacking import open_stacked
from quietscope.io.stores import probe_writable
from quietscope.io.validation import check_finite_sample, check_not_constant
from quietscope.methods import available_methods, build_method, get_method_class
from quietscope.methods.base import Method, NetConfig
from quietscope.methods.modelfile import load_model, save_model
from quietscope.methods.n2v import N2V
from quietscope.methods.pn2v import PN2V, implied_prior_std
from quietscope.methods.struct_mask import load_struct_mask, parse_struct_mask, struct_mask
from quietscope.noise_models import load_noise_model
from quietscope.training.config import expand_patch, resolve_z_pool
from quietscope.training.curves import plot_learning_curve
from quietscope.training.loop import TrainConfig, TrainResult, train
from quietscope.training.sampler import PatchSampler, split_train_val

__all__ = ["apply_recommended", "checkpoint_path", "load_init", "recommended_options", "resolve_method_files", "resolve_z_pool", "train_model",
           "warm_start"]

log = logging.getLogger(__name__)


def checkpoint_path(model_path: str | Path) -> Path:
    """The training checkpoint kept next to a model file until training ends."""
    p = Path(model_path)
    return p.with_name(p.name + ".ckpt")


def resolve_method_files(method_options: dict[str, Any], image: Image) -> dict[str, Any]:
    """Method options with the files they name read in, so the model file holds their content.

    Parameters
    ----------
    method_options : dict
        Method config fields. ``noise_model`` may be a path to a noise-model JSON file, ``psf``
        a path to a PSF TIFF, ``struct_mask`` a mask file (``.npy``/``.tif``) or ``AXIS:LENGTH``.
        ``masked_pixel_percentage`` is dropped for methods that do not mask.
    image : Image
        The training data (the axes a ``struct_mask`` like ``x:5`` refers to).

    Returns
    -------
    dict
        A copy, ready for :func:`quietscope.methods.build_method`.

    Raises
    ------
    ConfigError
        A named file is missing or malformed.
    """
    out = dict(method_options)
    if "masked_pixel_percentage" not in get_method_class(str(out.get("method", "n2v"))).Config.model_fields:
        out.pop("masked_pixel_percentage", None)
    if isinstance(out.get("noise_model"), (str, Path)):
        out["noise_model"] = load_noise_model(out["noise_model"]).to_dict()
    if isinstance(out.get("psf"), (str, Path)):
        if not Path(out["psf"]).exists():
            raise ConfigError(f"--psf {str(out['psf'])!r} does not exist; give a TIFF of the point-spread function")
        out["psf"] = np.asarray(read_tiff(Path(out["psf"])), dtype=float).tolist()
    mask = out.get("struct_mask")
    if isinstance(mask, str):
        if Path(mask).suffix.lower() in (".npy", ".tif", ".tiff"):
            out["struct_mask"] = load_struct_mask(mask).astype(int).tolist()
        else:
            axis, length = parse_struct_mask(mask, image.spatial_axes)
            out["struct_mask"] = struct_mask(len(image.spatial_axes), axis, length).astype(int).tolist()
    return out


def recommended_options(method: str) -> dict[str, Any]:
    """A method's recommended training options (CLI names), for options the user left at default.

    Parameters
    ----------
    method : str
        Method name.

    Returns
    -------
    dict
        E.g. ``{"patch": "32", "steps": 6000, "params": {"context_levels": 2}}``; empty when the
        method has no recommendation.
    """
    if method not in available_methods():  # e.g. pn2v-boot, a pipeline of two methods
        return {}
    return dict(get_method_class(method).recommended_options)


def apply_recommended(method: str, options: dict[str, Any], given: set[str], given_params: set[str]
                      ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The method's recommendations in place of the options the user did not give.

    Parameters
    ----------
    method : str
        Method name.
    options : dict
        Training options by CLI name (``patch``, ``steps``, ``keep``, ...), as parsed.
    given : set of str
        Names in ``options`` the user gave (the others are at their generic default).
    given_params : set of str
        ``--param`` keys the user gave.

    Returns
    -------
    (dict, dict, list of str)
        The options with the recommendations applied, the recommended method parameters the
        user did not give (``--param`` values go on top of them), and one line per
        recommendation applied, for the log.
    """
    recommended = recommended_options(method)
    rec_params = recommended.pop("params", {})
    out, notes = dict(options), []
    for key, value in recommended.items():
        if key in out and key not in given:
            out[key] = value
            notes.append(f"{method}: --{key} {value} (recommended default)")
    params = {k: v for k, v in rec_params.items() if k not in given_params}
    notes += [f"{method}: --param {k}={json.dumps(v)} (recommended default)" for k, v in params.items()]
    return out, params, notes


def _validated(model: type, values: dict[str, Any], what: str) -> Any:
    try:
        return model.model_validate(values)
    except Exception as exc:
        raise ConfigError(f"invalid {what}: {validation_message(exc)}") from None


def _build(image: Image, method_options: dict[str, Any], tcfg: TrainConfig) -> Method:
    """Decide z pooling, check the patch against the pooling, seed, and build the method."""
    nd = len(image.spatial_axes)
    net = dict(method_options.get("net", {}))
    z_pool, why = resolve_z_pool(net.get("z_pool", "auto"), str(method_options.get("method", "n2v")),
                                 image.spatial_axes, dict(zip(image.axes, image.scale)), dict(zip(image.axes, image.units)))
    net["z_pool"] = z_pool
    if nd == 3:
        log.info("z pooling %s: %s", "on" if z_pool else "off", why)
    net_cfg = _validated(NetConfig, net, "network options")
    factor_needed = tuple(p**net_cfg.depth for p in net_cfg.pool(nd))
    if any(p % f for p, f in zip(tcfg.patch, factor_needed)):
        raise ConfigError(f"--patch {tcfg.patch} must be a multiple of {factor_needed} (2**depth on every pooled axis)")
    config = {"spatial_ndim": nd, "in_channels": image.n_channels, **method_options, "net": net}
    # Seed before building: the initial weights are part of what --seed makes reproducible.
    torch.manual_seed(tcfg.seed)
    return build_method(config)


#: Patches of the training data on which a warm start measures N2V's blind-spot error.
_WARM_START_PATCHES = 64


def load_init(init: str | Path, method_options: dict[str, Any]) -> tuple[N2V, dict[str, Any]]:
    """Read the ``--init`` model and return it with ``method_options`` taking its network.

    Parameters
    ----------
    init : str or pathlib.Path
        An N2V/N2V2 model file.
    method_options : dict
        The PN2V options; their ``net`` is replaced by the init model's (the weights fix it).

    Returns
    -------
    (N2V, dict)

    Raises
    ------
    ConfigError
        ``--init`` with another method than pn2v, or an init model that is not N2V.
    ModelError
        The model file is unreadable.
    """
    if str(method_options.get("method", "n2v")) != "pn2v":
        raise ConfigError("--init warm-starts --method pn2v from an N2V model; drop --init for other methods")
    n2v, _ = load_model(init)
    if not isinstance(n2v, N2V) or isinstance(n2v, PN2V):
        raise ConfigError(f"--init {str(init)!r} is a {n2v.name} model; warm-start from an N2V or N2V2 model")
    net = n2v.config.net.model_dump()
    if method_options.get("net") and {**net, **method_options["net"]} != net:
        log.info("--init: the network options of %s are used (%s); the ones given are ignored", init, net)
    return n2v, {**method_options, "net": net}


def warm_start(method: Method, n2v: N2V, image: Image, tcfg: TrainConfig) -> list[float]:
    """Warm-start PN2V ``method`` from ``n2v`` (:meth:`PN2V.warm_start`), its prior spread
    measured on patches of the training region; returns that spread per channel (raw units).
    """
    if not isinstance(method, PN2V):
        raise ConfigError(f"--init warm-starts --method pn2v; {method.name} cannot start from an N2V model")
    train_region, _ = split_train_val(image.spatial_shape, tuple(tcfg.patch), tcfg.val_fraction)
    sampler = PatchSampler(image, tuple(tcfg.patch), train_region, augment=False)
    batch = torch.from_numpy(sampler.sample(_WARM_START_PATCHES, np.random.default_rng(tcfg.seed + 7)))
    std = implied_prior_std(n2v, method.noise_model, batch, torch.Generator().manual_seed(tcfg.seed + 7))
    method.warm_start(n2v, std)
    log.info("warm start from N2V: prior mean = N2V's prediction, prior spread %s (raw units)",
             ", ".join(f"{v:.4g}" for v in std))
    return std


def _save(model_path: Path, result: TrainResult, tcfg: TrainConfig, image: Image, input_uri: Any, level: int,
          extra: dict[str, Any] | None = None) -> None:
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
        **(extra or {}),
    }
    if result.paused_at is not None:
        info["paused_at"] = result.paused_at
    save_model(model_path, result.method, info)
    if result.paused_at is None:  # a paused run's checkpoint is how it continues
        checkpoint_path(model_path).unlink(missing_ok=True)
    try:
        plot_learning_curve(result.history, model_path.with_suffix(".learning_curve.png"))
    except Exception as exc:  # a plot must never lose a trained model
        log.warning("could not write the learning-curve plot: %s", exc)


def check_model_output(model_path: Path, overwrite: bool, resume: bool) -> None:
    """Before any data is read: the model file and its checkpoint may be written, and are not
    replaced by accident (a killed run's checkpoint is hours of work).

    Raises
    ------
    ConfigError
        ``overwrite`` with ``resume``.
    OutputError
        The model file, or a checkpoint of an interrupted run, exists without ``overwrite``/``resume``.
    StorageError
        The folder is read-only, not permitted or full.
    ModelError
        ``resume`` of a checkpoint that cannot be read.
    """
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: --resume continues the checkpoint, "
                          "--overwrite starts afresh; give one")
    ckpt = checkpoint_path(model_path)
    if model_path.exists() and not (overwrite or resume):
        raise OutputError(f"model file {str(model_path)!r} already exists; pass --overwrite to replace it")
    if ckpt.exists() and not (overwrite or resume):
        raise OutputError(f"{str(ckpt)!r} holds the checkpoint of an interrupted training; pass --resume to continue it "
                          "or --overwrite to discard it and start afresh")
    probe_writable(model_path)
    if resume and ckpt.exists():
        try:
            torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"--resume: the checkpoint {str(ckpt)!r} cannot be read ({type(exc).__name__}: damaged or "
                             "not a quietscope checkpoint); remove it and start with --overwrite") from None


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
    init: str | Path | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train a model on ``input_uri`` and save it to ``model_path`` (one self-describing file).

    Parameters
    ----------
    input_uri : str, pathlib.Path or list of them
        The noisy data; several inputs are stacked as the channels of one image (splitting
        methods).
    model_path : str or pathlib.Path
        ``.qs`` file to write; its checkpoint ``<model>.ckpt`` lives beside it until the end.
    method_options : dict
        ``method`` (a name from ``quietscope methods``), ``net`` (:class:`NetConfig` fields) and
        the method's config fields; files are named by path (:func:`resolve_method_files`).
    train_options : dict
        :class:`~quietscope.training.loop.TrainConfig` fields (``patch``, ``batch``, ``steps``...).
    axes : str, optional
        Axes of the input when its metadata lacks them.
    level : int
        Resolution level of a multiscale input.
    overwrite, resume : bool
        Replace an existing model file; continue from its checkpoint.
    progress : bool
        Show a progress bar.
    init : str or pathlib.Path, optional
        ``--method pn2v`` only: an N2V model to warm-start from (:func:`warm_start`); its
        network options replace the ones given.
    stop_at : int, optional
        Pause after this many of ``steps`` (:func:`~quietscope.training.loop.train`): the model
        file holds the weights so far and the checkpoint stays, so ``resume=True`` finishes
        the run exactly as an uninterrupted one.

    Returns
    -------
    TrainResult
        The trained method, history, best/kept step and time.

    Raises
    ------
    OutputError
        The model file exists (without ``overwrite`` or ``resume``).
    ConfigError
        Invalid options, or a patch that does not fit the network or the data.
    InputError
        Missing or unreadable data, NaNs.

    Examples
    --------
    >>> train_model("noisy.ome.zarr", "n2v.qs", {"method": "n2v"},
    ...             {"patch": (64,), "steps": 2000})           # doctest: +SKIP
    """
    model_path = Path(model_path)
    check_model_output(model_path, overwrite, resume)
    image = open_stacked(input_uri, level=level, axes=axes)
    # Created now, not at the first checkpoint: a missing folder must not cost a training run.
    model_path.parent.mkdir(parents=True, exist_ok=True)
    check_finite_sample(image)
    check_not_constant(image)
    train_options = dict(train_options)
    train_options["patch"] = expand_patch(tuple(train_options.get("patch", (64,))), len(image.spatial_axes))
    tcfg = _validated(TrainConfig, train_options, "training options")
    n2v = None
    if init is not None:
        n2v, method_options = load_init(init, method_options)
    method = _build(image, resolve_method_files(method_options, image), tcfg)
    extra = None
    if n2v is not None:
        extra = {"init": {"model": str(init), "prior_std": warm_start(method, n2v, image, tcfg)}}
    log.info("training %s on %s: axes %s, shape %s, patch %s, batch %d, %d steps",
             method.name, input_uri, image.axes, image.shape, tcfg.patch, tcfg.batch, tcfg.steps)
    result = train(image, method, tcfg, checkpoint=checkpoint_path(model_path), resume=resume, progress=progress,
                   stop_at=stop_at)
    _save(model_path, result, tcfg, image, input_uri, level, extra)
    log.info("model written to %s (%.1f s)", model_path, result.seconds)
    return result
