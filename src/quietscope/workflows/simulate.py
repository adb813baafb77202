"""``quietscope simulate``: add Poisson–Gaussian noise to a whole (possibly huge) image, chunked.

Every output chunk is noised separately by :func:`quietscope.simulate.poisson_gaussian` at its
global spatial offset, so the result does not depend on the chunking. Each ``(t, c)`` image gets
its own seed derived from ``(seed, t, c)``, and each channel is scaled by its own ``data_std``
(the denoiSplit protocol sets the Gaussian part relative to the clean data's std; channels of
different brightness would otherwise share one level).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quietscope import __version__
from quietscope.chunked import default_chunks
from quietscope.errors import ConfigError
from quietscope.io.reading import open_image
from quietscope.io.writing import OutputSpec, build_pyramid, check_output_path, create_ome_zarr, open_level, remove_output
from quietscope.simulate import poisson_gaussian
from quietscope.tiling import axes_layout

log = logging.getLogger(__name__)

#: Images up to this many voxels get their std computed exactly; larger ones from a sample.
EXACT_STD_VOXELS = 2**27
#: Chunks read to estimate the std of larger images.
SAMPLE_CHUNKS = 64


def image_seed(seed: int, t: int, c: int) -> int:
    """A non-negative seed for the ``(t, c)`` image, distinct for distinct ``(seed, t, c)``."""
    return int(np.random.SeedSequence([int(seed), int(t), int(c)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def noise_block(
    block: np.ndarray,
    axes: str,
    offset: tuple[int, ...],
    poisson_scale: float | None,
    gauss_rel: float | None,
    data_std: np.ndarray,
    seed: int,
) -> np.ndarray:
    """Noise one block shaped like the image's canonical ``axes`` at global ``offset``.

    Loops over the block's ``(t, c)`` planes; the noise of a voxel depends only on ``seed``,
    its ``t``, ``c`` and spatial index, never on the block.
    """
    has_t, has_c = "t" in axes, "c" in axes
    view = block
    if not has_t:
        view = view[None]
    if not has_c:
        view = view[:, None]
    t0 = offset[axes.index("t")] if has_t else 0
    c0 = offset[axes.index("c")] if has_c else 0
    sp_off = tuple(o for o, a in zip(offset, axes) if a in "zyx")
    out = np.empty(view.shape, np.float32)
    for i in range(view.shape[0]):
        for j in range(view.shape[1]):
            c = c0 + j
            out[i, j] = poisson_gaussian(
                view[i, j], poisson_scale, gauss_rel, float(data_std[c]), image_seed(seed, t0 + i, c), sp_off
            )
    if not has_c:
        out = out[:, 0]
    if not has_t:
        out = out[0]
    return out


def channel_std(data: Any, axes: str, exact_max_voxels: int = EXACT_STD_VOXELS,
                n_sample_chunks: int = SAMPLE_CHUNKS, seed: int = 0) -> tuple[np.ndarray, str]:
    """Std per channel of a dask array in canonical ``axes``: exact when small, else sampled.

    Returns the stds and a word for the log (``"exact"`` or ``"sampled from N chunks"``).
    """
    import dask.array as da

    caxis = axes.index("c") if "c" in axes else None
    red = tuple(i for i in range(data.ndim) if i != caxis)
    if math.prod(data.shape) <= exact_max_voxels:
        std = da.nanstd(data.astype(np.float64), axis=red).compute()
        return np.atleast_1d(np.asarray(std, np.float64)), "exact"
    # Sample whole chunks spread at random: unbiased for the mean of squares, cheap to read.
    blocks = list(np.ndindex(*data.numblocks))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(blocks), size=min(n_sample_chunks, len(blocks)), replace=False)
    n_c = data.shape[caxis] if caxis is not None else 1
    s1, s2, n = np.zeros(n_c), np.zeros(n_c), np.zeros(n_c)
    for k in picks:
        idx = blocks[k]
        b = np.asarray(data.blocks[idx].compute(), np.float64)
        if caxis is None:
            b = b[None]
            c_start = 0
        else:
            b = np.moveaxis(b, caxis, 0)
            c_start = sum(data.chunks[caxis][: idx[caxis]])
        flat = b.reshape(b.shape[0], -1)
        sl = slice(c_start, c_start + b.shape[0])
        s1[sl] += flat.sum(1)
        s2[sl] += (flat**2).sum(1)
        n[sl] += flat.shape[1]
    n = np.maximum(n, 1)
    var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
    return np.sqrt(var), f"sampled from {len(picks)} of {len(blocks)} chunks"


@dataclass
class SimulateResult:
    """What ``simulate`` wrote and the noise it added."""

    output: str
    data_std: list[float]
    std_source: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]


def simulate_image(
    clean_uri: str | Path,
    output: str | Path,
    poisson_scale: float | None,
    gauss_rel: float | None,
    seed: int = 0,
    chunks: tuple[int, ...] | None = None,
    overwrite: bool = False,
    axes: str | None = None,
    level: int = 0,
    ngff: str = "0.5",
    n_levels: int | None = None,
    data_std: float | list[float] | None = None,
) -> SimulateResult:
    """Write a noisy version of ``clean_uri`` as OME-Zarr (same axes, scale and units).

    Parameters
    ----------
    clean_uri : str or Path
        Clean image (OME-Zarr, zarr, TIFF), read lazily.
    output : str or Path
        ``.ome.zarr`` to create.
    poisson_scale : float or None
        Photons per intensity unit (``None``: no shot noise).
    gauss_rel : float or None
        Gaussian std as a fraction of each channel's clean std (``None``: no Gaussian noise).
    seed : int, optional
        Same seed, same noise, whatever ``chunks``.
    chunks : tuple of int, optional
        Output chunks over the spatial axes; default as ``quietscope predict`` chooses.
    data_std : float or list of float, optional
        Clean std per channel; default computed (exactly up to ``EXACT_STD_VOXELS`` voxels,
        else from a sample of chunks).

    Returns
    -------
    SimulateResult
        The output path, the seed and the noise parameters used per channel.

    Raises
    ------
    ConfigError
        No noise asked for, or invalid chunks / NGFF version.
    OutputError
        The output exists (without ``overwrite``) or lies inside the input.

    Examples
    --------
    >>> simulate_image("clean.ome.zarr", "noisy.ome.zarr", poisson_scale=0.5, gauss_rel=0.1)  # doctest: +SKIP
    """
    import dask.array as da


    if poisson_scale is None and gauss_rel is None:
        raise ConfigError("no noise requested; pass --poisson SCALE and/or --gauss REL")
    image = open_image(clean_uri, level=level, axes=axes)
    check_output_path(output, [image.ref.uri], overwrite)
    sp_axes = image.spatial_axes
    spatial = image.spatial_shape
    sp_chunks = tuple(chunks) if chunks else default_chunks(image)
    if len(sp_chunks) != len(spatial) or any(c < 1 for c in sp_chunks):
        raise ConfigError(f"--chunks {sp_chunks} must give one positive value per spatial axis ({sp_axes})")
    sp_chunks = tuple(min(c, s) for c, s in zip(sp_chunks, spatial))
    out_chunks = axes_layout(image.axes, sp_axes, sp_chunks)
    data = image.data.rechunk(out_chunks)
    if data_std is None:
        std, how = channel_std(image.data, image.axes)
    else:
        std = np.broadcast_to(np.asarray(data_std, np.float64).reshape(-1), (image.n_channels,)).copy()
        how = "given"
    log.info("clean std per channel %s (%s); noise: poisson_scale %s, gauss_rel %s, seed %d",
             [round(float(s), 4) for s in std], how, poisson_scale, gauss_rel, seed)

    axes_c = image.axes

    def _task(block: np.ndarray, block_info: Any = None) -> np.ndarray:
        offset = tuple(lo for lo, _ in block_info[0]["array-location"])
        return noise_block(block, axes_c, offset, poisson_scale, gauss_rel, std, seed)

    noisy = data.map_blocks(_task, dtype=np.float32)
    if Path(output).exists():
        remove_output(output)
    windows = None
    spec = OutputSpec(
        path=str(output), axes=image.axes, shape=image.shape, chunks=out_chunks, dtype="float32",
        scale=tuple(image.scale), units=tuple(image.units), ngff=ngff, n_levels=n_levels,
        channel_names=image.channel_names, channel_windows=windows,
        provenance={
            "quietscope_version": __version__, "simulate": {
                "clean": str(clean_uri), "level": level, "poisson_scale": poisson_scale,
                "gauss_rel": gauss_rel, "seed": seed, "data_std": [float(s) for s in std], "data_std_source": how,
            },
        },
    )
    create_ome_zarr(spec)
    da.store(noisy, open_level(output, 0), lock=False, scheduler="threads")
    if spec.n_levels and spec.n_levels > 1:
        build_pyramid(spec)
    return SimulateResult(str(output), [float(s) for s in std], how, image.shape, out_chunks)


def simulate_array(clean: np.ndarray, axes: str, poisson_scale: float | None, gauss_rel: float | None,
                   seed: int = 0, data_std: np.ndarray | None = None) -> np.ndarray:
    """Whole-array reference of :func:`simulate_image` (in memory, canonical ``axes``)."""
    clean = np.asarray(clean)
    if data_std is None:
        caxis = axes.index("c") if "c" in axes else None
        red = tuple(i for i in range(clean.ndim) if i != caxis)
        data_std = np.atleast_1d(clean.astype(np.float64).std(axis=red))
    return noise_block(clean, axes, (0,) * clean.ndim, poisson_scale, gauss_rel, np.asarray(data_std), seed)
