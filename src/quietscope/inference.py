"""A trained model as a tile function: load it for inference, measure its halo, predict tiles.

This is what prediction, noise inspection and bootstrapping share: the model is loaded once
(:func:`load_for_inference`: file, device, prediction-time options, halo), and every path,
chunked or whole-image, goes through :func:`predict_tile` so they differ only in what they read.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quietscope.device import resolve_device, set_module_precision
from quietscope.errors import ConfigError
from quietscope.methods.modelfile import check_matches, load_model
from quietscope.nets.receptive_field import method_receptive_radius
from quietscope.nets.unet import inference_slabs
from quietscope.tiling import Factor, halo_from_radius, per_axis, round_up, whole_window

log = logging.getLogger(__name__)

TileFunction = Callable[[np.ndarray], np.ndarray]


def predict_tile(method: torch.nn.Module, tile: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Predict one tile.

    Parameters
    ----------
    method : Method
        A loaded method in eval mode.
    tile : numpy.ndarray
        ``(C, *spatial)``, spatial sizes multiples of the method's down-sampling factor.
    device : torch.device or str
        Where the method lives.

    Returns
    -------
    numpy.ndarray
        float32 ``(C_out, *spatial)`` in input units.
    """
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32))[None].to(device)
        return method.predict(x)[0].float().cpu().numpy()


def dihedral_mean(fn: TileFunction, tile: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the mean of ``fn`` over the 8 flips/90° rotations in y/x.

    The training patches are augmented with the same transforms, so each is an equally valid
    prediction; averaging them removes part of the network's orientation-dependent error.
    A block window starts and ends on multiples of the pooling factor, so its flipped and
    rotated copies keep the whole image's pooling grid and chunked == whole still holds.

    Parameters
    ----------
    fn : callable
        Tile function ``(C, *spatial) -> (C_out, *spatial)``.
    tile : numpy.ndarray
        The tile; its last two axes are y and x.

    Returns
    -------
    numpy.ndarray
        float32 mean of the 8 predictions, each mapped back before averaging.
    """
    total = None
    for k in range(4):
        for flip in (False, True):
            x = np.rot90(tile, k, axes=(-2, -1))
            if flip:
                x = x[..., ::-1]
            y = fn(np.ascontiguousarray(x))
            if flip:
                y = y[..., ::-1]
            y = np.rot90(y, -k, axes=(-2, -1)).astype(np.float64)
            total = y if total is None else total + y
    return (total / 8).astype(np.float32)


def tta_halo(halo: tuple[int, ...]) -> tuple[int, ...]:
    """Rotations swap y and x, so both need the larger of their halos."""
    h = max(halo[-2:])
    return tuple(halo[:-2]) + (h, h)


def method_halo(method: Any) -> tuple[int, ...]:
    """Measured receptive-field radius plus the method's extra halo, rounded to its factor.

    Parameters
    ----------
    method : Method
        A built or loaded method.

    Returns
    -------
    tuple of int
        Halo per spatial axis, in voxels.
    """
    radius = method_receptive_radius(method)
    extra = method.extra_halo
    return halo_from_radius(tuple(r + e for r, e in zip(radius, extra)), method.downsampling_factor)


def predict_whole(fn: TileFunction, array: np.ndarray, halo: tuple[int, ...], factor: Factor) -> np.ndarray:
    """Reference: predict a whole ``(C, *spatial)`` array in one tile, reflect-padded by ``halo``.

    Parameters
    ----------
    fn : callable
        Tile function.
    array : numpy.ndarray
        ``(C, *spatial)`` input.
    halo : tuple of int
        Halo per spatial axis (as used by the chunked path).
    factor : int or tuple of int
        Down-sampling factor; the padded window is rounded to it.

    Returns
    -------
    numpy.ndarray
        ``(C_out, *spatial)`` prediction.
    """
    spatial = array.shape[1:]
    wstart, wstop = whole_window(spatial, halo, factor)
    pad = [(0, 0)] + [(-a, b - s) for a, b, s in zip(wstart, wstop, spatial)]
    padded = np.pad(array.astype(np.float32), pad, mode="reflect")
    out = fn(padded)
    return out[(slice(None),) + tuple(slice(-a, -a + s) for a, s in zip(wstart, spatial))]


@dataclass
class LoadedModel:
    """A model ready to predict: the method, its manifest, device, halo and tile function."""

    method: Any
    manifest: dict[str, Any]
    device: torch.device
    halo: tuple[int, ...]
    tta: bool = False
    #: Precision the network runs at (``fp32``/``bf16``/``fp16``; see :func:`device_tile_function`).
    precision: str = "fp32"
    #: Most spatial voxels one forward pass may hold (device memory); ``None``: one pass per tile.
    work_voxels: int | None = None

    @property
    def factor(self) -> Factor:
        return self.method.downsampling_factor

    @property
    def name(self) -> str:
        return str(self.manifest["method"]["method"])

    def tile_function(self) -> TileFunction:
        """``tile -> prediction`` on this model's device (TTA applied when asked for)."""
        method, dev = self.method, self.device
        if self.tta:
            return lambda tile: dihedral_mean(lambda t: predict_tile(method, t, dev), tile)
        return lambda tile: predict_tile(method, tile, dev)


def load_for_inference(
    model_path: str | Path,
    device: str = "auto",
    inference: dict[str, Any] | None = None,
    tta: bool = False,
    spatial_axes: str | None = None,
    n_channels: int | None = None,
    where: str = "the input",
) -> LoadedModel:
    """Load a model file for prediction: device, prediction-time options, halo, checks.

    Parameters
    ----------
    model_path : str or pathlib.Path
        ``.qs`` model file.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    inference : dict, optional
        Prediction-time method options (e.g. ``{"estimate": "prior"}``); ``None`` values are
        dropped.
    tta : bool
        Average the 8 flips/rotations in y/x (the halo is equalised in y and x).
    spatial_axes, n_channels : optional
        The data's spatial axes and channel count; when given, the model is checked against them.
    where : str
        How the data is named in a mismatch error.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        The file is unreadable or the model does not fit the data.
    ConfigError
        An unknown device or option, or TTA for a method whose outputs include spreads.
    """
    dev = resolve_device(device)
    method, manifest = load_model(model_path, dev)
    method.set_inference(**{k: v for k, v in (inference or {}).items() if v is not None})
    if spatial_axes is not None and n_channels is not None:
        check_matches(manifest, spatial_axes, n_channels, where, method.predict_in_channels)
    halo = method_halo(method)
    if tta:
        if not method.supports_tta:
            raise ConfigError(f"--tta does not apply to {manifest['method']['method']!r} (its outputs include sample "
                              "spreads); leave --tta out and use --samples for a smoother estimate")
        halo = tta_halo(halo)
    return LoadedModel(method, manifest, dev, halo, tta)


@dataclass(frozen=True)
class ModelProcessor:
    """Picklable processor factory: loads a model file once per worker and predicts tiles."""

    model_path: str
    device: str = "auto"
    token: str = ""
    inference: tuple[tuple[str, Any], ...] = ()
    tta: bool = False
    #: ``fp32``, ``bf16`` or ``fp16`` (autocast of the network; resolved by the caller).
    precision: str = "fp32"
    #: Measured once by the caller on CUDA (:func:`probe_bytes_per_voxel`): each worker sizes its
    #: forward passes from its own free device memory (:func:`gpu_work_voxels`).
    bytes_per_voxel: float | None = None
    #: A fixed bound on the voxels of one forward pass (overrides the memory rule).
    work_voxels: int | None = None

    def build(self) -> TileFunction:
        """Load the model (once per worker) and return its tile function."""
        loaded = load_for_inference(self.model_path, self.device, dict(self.inference), self.tta)
        if self.precision == "fp32" and self.work_voxels is None and loaded.device.type == "cpu":
            return loaded.tile_function()  # the CPU default: exactly the plain path
        loaded.precision = self.precision
        loaded.work_voxels = self.work_voxels or device_work_voxels(loaded.device, self.bytes_per_voxel)
        return device_tile_function(loaded)


def file_token(path: str | Path, extra: str = "") -> str:
    """A short content hash of a file (plus ``extra``): identifies a processor for resume."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()[:16]


# ---- GPU work sizing, batched sub-tiles, overlapped copies ------------------------------------
#: Share of a GPU's memory one forward pass may take: of its *total* memory when the block plan
#: is made (deterministic, so ``--resume`` finds the same blocks), of its *free* memory when a
#: worker sizes its passes (what is really there: another process or the CUDA context).
GPU_MEMORY_FRACTION = 0.5
#: Upper bound on one forward pass, whatever the memory: 2^27 voxels is 512 MB of float32 input
#: on the host per block, and far past the size where a GPU is busy (~10^7).
GPU_MAX_TILE_VOXELS = 1 << 27
#: Fewer than a 64² tile per pass: the memory figure is suspect, or the GPU is full; refused.
GPU_MIN_TILE_VOXELS = 1 << 12


def gpu_work_voxels(memory_bytes: float, bytes_per_voxel: float, fraction: float = GPU_MEMORY_FRACTION,
                    cap: int = GPU_MAX_TILE_VOXELS) -> int:
    """The rule for GPU work sizes: the voxels one forward pass may hold.

    ``min(cap, 2 ** floor(log2(fraction * memory_bytes / bytes_per_voxel)))``: the largest power
    of two whose measured activations fit the memory share (a power of two, so that small
    changes in the memory figure do not change the plan).

    Parameters
    ----------
    memory_bytes : float
        Device memory to size for (free or total, see :data:`GPU_MEMORY_FRACTION`).
    bytes_per_voxel : float
        Peak device memory of one forward pass per spatial voxel (:func:`probe_bytes_per_voxel`).
    fraction : float
        Share of ``memory_bytes`` a pass may use.
    cap : int
        Upper bound (:data:`GPU_MAX_TILE_VOXELS`).

    Returns
    -------
    int
        Spatial voxels per forward pass, ``<= fraction * memory_bytes / bytes_per_voxel`` and
        ``<= cap``.

    Raises
    ------
    ConfigError
        The memory holds fewer than :data:`GPU_MIN_TILE_VOXELS` voxels.

    Examples
    --------
    >>> gpu_work_voxels(80e9, 400.0)   # 80 GB free, 400 B/voxel: 10^8 -> 2^26
    67108864
    """
    fit = fraction * float(memory_bytes) / max(float(bytes_per_voxel), 1e-9)
    if fit < GPU_MIN_TILE_VOXELS:
        raise ConfigError(f"the GPU has {memory_bytes / 2**30:.2f} GiB to give and the model needs {bytes_per_voxel:.0f} "
                          f"bytes per voxel: not even {GPU_MIN_TILE_VOXELS} voxels per pass fit; free GPU memory or use --device cpu")
    return int(min(cap, 1 << int(math.floor(math.log2(fit)))))


def device_work_voxels(device: torch.device, bytes_per_voxel: float | None, free_bytes: float | None = None) -> int | None:
    """Voxels per forward pass on ``device`` from its free memory; ``None`` on the CPU.

    Parameters
    ----------
    device : torch.device
        The worker's device.
    bytes_per_voxel : float or None
        Measured once (:func:`probe_bytes_per_voxel`); ``None``: no sizing (one pass per tile).
    free_bytes : float, optional
        Free device memory (default: ``torch.cuda.mem_get_info``).

    Returns
    -------
    int or None
        :func:`gpu_work_voxels` of the free memory.
    """
    if device.type != "cuda" or not bytes_per_voxel:
        return None
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    return gpu_work_voxels(free, bytes_per_voxel)


def probe_bytes_per_voxel(method: Any, device: torch.device, shape: tuple[int, ...] | None = None) -> float:
    """Peak CUDA memory of one forward pass per spatial voxel, measured once on a zero tile.

    The method must already be on ``device`` at its precision. Activations grow linearly with
    the tile, so the figure of a 512² (2D) or 32×256² (3D) tile holds for larger ones.

    Parameters
    ----------
    method : Method
        A loaded method in eval mode on a CUDA device.
    device : torch.device
        A CUDA device.
    shape : tuple of int, optional
        Probe tile (spatial); rounded up to the down-sampling factor.

    Returns
    -------
    float
        Bytes per voxel.

    Raises
    ------
    ConfigError
        ``device`` is not a CUDA device.
    """
    if device.type != "cuda":
        raise ConfigError("probe_bytes_per_voxel measures CUDA memory; it needs a CUDA device")
    nd = method.config.spatial_ndim
    f = per_axis(method.downsampling_factor, nd)
    shape = tuple(round_up(s, k) for s, k in zip(shape or ((512, 512) if nd == 2 else (32, 256, 256)), f))
    x = torch.zeros((1, method.predict_in_channels) + shape, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    # Whole passes: a streamed pass needs less, but a thin pass (too few planes to slab) needs
    # this much, and the GPU plan bounds every pass with one figure.
    with torch.no_grad(), inference_slabs(method, 0):
        method.predict(x)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del x
    torch.cuda.empty_cache()
    return max(1.0, peak / math.prod(shape))


def subtile_windows(shape: tuple[int, ...], halo: tuple[int, ...], factor: Factor,
                    max_voxels: int) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Cut a tile into equal windows of at most ``max_voxels`` that reproduce its prediction.

    Each window is a core plus ``halo`` on each side, shifted inward at the tile's border so all
    windows have one shape (they can be stacked into one batch); starts stay on multiples of the
    down-sampling factor, so every window keeps the tile's pooling grid and each core voxel sees
    the same input over its receptive field as in the whole tile (the argument of
    :mod:`quietscope.tiling`, one level down). Cores are halved, longest first, until a window
    fits.

    Parameters
    ----------
    shape : tuple of int
        The tile's spatial shape (multiples of the factor along the axes that are split).
    halo : tuple of int
        Halo per axis (multiples of the factor).
    factor : int or tuple of int
        Down-sampling factor.
    max_voxels : int
        Most voxels per window.

    Returns
    -------
    (window, cores)
        The window shape and, per window, ``(core_start, core_stop, window_start)``.

    Raises
    ------
    ConfigError
        Not even the smallest window (one factor of core plus the halo) fits ``max_voxels``.
    """
    n = len(shape)
    f = per_axis(factor, n)
    core = list(shape)
    window = lambda: tuple(min(s, c + 2 * h) if c < s else s for s, c, h in zip(shape, core, halo))
    splittable = [i for i in range(n) if shape[i] % f[i] == 0 and halo[i] % f[i] == 0]
    while math.prod(window()) > max_voxels:
        cands = [i for i in splittable if core[i] > f[i]]
        if not cands:
            raise ConfigError(f"one forward pass may hold {max_voxels} voxels but the smallest window of this model "
                              f"({window()}) is larger; give the device more free memory or use --device cpu")
        i = max(cands, key=lambda k: window()[k])
        core[i] = round_up(-(-core[i] // 2), f[i])
    w = window()
    axes = []
    for s, c, h, wi in zip(shape, core, halo, w):
        axes.append([(a, min(a + c, s), min(max(a - h, 0), s - wi)) for a in range(0, s, c)])
    cores = []
    for combo in _product(axes):
        cores.append((tuple(a for a, _, _ in combo), tuple(b for _, b, _ in combo), tuple(ws for _, _, ws in combo)))
    return w, cores


def _product(axes: list[list[Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [()]
    for options in axes:
        out = [o + (v,) for o in out for v in options]
    return out


def _forward(method: torch.nn.Module, batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass; on CUDA from a pinned host buffer, the result copied back without
    waiting (the caller synchronises once), so the host prepares the next batch meanwhile.
    """
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if device.type != "cuda":
        return x, method.predict(x).float()
    x = x.pin_memory()
    y = method.predict(x.to(device, non_blocking=True)).float()
    host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(y, non_blocking=True)
    return x, host


def predict_tile_batched(method: torch.nn.Module, tile: np.ndarray, device: torch.device, halo: tuple[int, ...],
                         factor: Factor, max_voxels: int | None) -> np.ndarray:
    """Predict one tile in forward passes of at most ``max_voxels`` spatial voxels.

    A tile that fits is one pass (as :func:`predict_tile`); a larger one is cut by
    :func:`subtile_windows` and its equal windows are stacked, ``max_voxels // window`` per
    pass. The result equals the whole tile's prediction (chunked == whole holds through it).

    Parameters
    ----------
    method : Method
        A loaded method in eval mode on ``device``.
    tile : numpy.ndarray
        ``(C, *spatial)``.
    device : torch.device
        Where the method lives.
    halo, factor
        The method's halo and down-sampling factor.
    max_voxels : int or None
        Bound on one pass (batch x window voxels); ``None``: the whole tile in one pass.

    Returns
    -------
    numpy.ndarray
        float32 ``(C_out, *spatial)``.
    """
    spatial = tile.shape[1:]
    window, cores = subtile_windows(spatial, halo, factor, max_voxels or math.prod(spatial))
    per_pass = max(1, (max_voxels or 0) // math.prod(window))
    pending = []
    with torch.no_grad():
        for i in range(0, len(cores), per_pass):
            group = cores[i : i + per_pass]
            batch = np.stack([tile[(slice(None),) + tuple(slice(s, s + w) for s, w in zip(ws, window))] for _, _, ws in group])
            pending.append((group, *_forward(method, batch, device)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = None
    for group, _, pred in pending:
        pred = pred.numpy()
        if out is None:
            out = np.empty((pred.shape[1],) + tuple(spatial), dtype=np.float32)
        for k, (a, b, ws) in enumerate(group):
            src = tuple(slice(x - w, y - w) for x, y, w in zip(a, b, ws))
            out[(slice(None),) + tuple(slice(x, y) for x, y in zip(a, b))] = pred[(k, slice(None)) + src]
    return out


def device_tile_function(loaded: LoadedModel) -> TileFunction:
    """The tile function of ``loaded`` at its ``precision`` and ``work_voxels``.

    The network runs under autocast (:func:`quietscope.device.set_module_precision`: only the
    network is lowered; normalisation, noise-model likelihoods and posteriors stay float32), and
    each tile goes through :func:`predict_tile_batched`: pinned buffers and non-blocking copies
    on CUDA, passes bounded by ``work_voxels``.

    Parameters
    ----------
    loaded : LoadedModel
        From :func:`load_for_inference`, with ``precision`` / ``work_voxels`` set.

    Returns
    -------
    callable
        ``tile -> prediction`` (TTA applied when ``loaded.tta``).
    """
    method, dev, halo, factor, work = loaded.method, loaded.device, loaded.halo, loaded.factor, loaded.work_voxels
    net = getattr(method, "net", None)
    if net is None and loaded.precision != "fp32":
        raise ConfigError(f"--precision {loaded.precision}: method {loaded.name!r} has no network to autocast; use fp32")
    if net is not None:
        set_module_precision(net, loaded.precision, dev.type)
    log.info("model %s on %s at %s, forward passes of <= %s voxels", loaded.name, dev, loaded.precision, work or "one tile")
    fn = lambda tile: predict_tile_batched(method, tile, dev, halo, factor, work)
    if loaded.tta:
        return lambda tile: dihedral_mean(fn, tile)
    return fn
