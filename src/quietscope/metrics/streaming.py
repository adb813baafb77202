"""The metrics of :mod:`quietscope.metrics.image_quality`, computed block by block.

A ground-truth volume can be larger than memory, so :func:`streamed_metrics` reads blocks of
a prediction/ground-truth pair, keeps running sums, and combines them into the same four
numbers the whole-image functions give (equal to rounding; tested):

* PSNR and SNR need only sums of squared differences and the ground truth's min/max.
* Range-invariant PSNR is a closed form of first and second moments (means, variances and the
  covariance of prediction and ground truth), accumulated about a per-image shift so that
  large offsets do not cancel catastrophically.
* SSIM is scikit-image's map on each block read with a 3-voxel halo (half the 7-voxel window),
  so every voxel's map value sees exactly the neighbourhood it sees in the whole image; the
  mean is taken over the same interior scikit-image averages (3 voxels in from every border).
  SSIM's constants depend on the data range, so the ground truth is read twice: once for its
  range, once for everything else.

scikit-image has no streaming variant of these metrics and dask-image none of SSIM, which is
why the accumulation is written here; the per-block SSIM map itself is scikit-image's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

from quietscope.errors import InputError
from quietscope.tiling import iter_blocks

#: scikit-image's default SSIM window (7 voxels per axis) and the halo it needs.
SSIM_WIN = 7
SSIM_HALO = SSIM_WIN // 2

Reader = Callable[[tuple[slice, ...]], np.ndarray]


def block_shape_for(shape: tuple[int, ...], max_voxels: int) -> tuple[int, ...]:
    """Halve the longest axis of ``shape`` until a block holds at most ``max_voxels`` voxels
    (axes of 8 or less are left alone), so blocks stay compact and their SSIM halo small in
    proportion."""
    block = list(shape)
    while math.prod(block) > max_voxels:
        i = max(range(len(block)), key=lambda k: block[k])
        if block[i] <= 8:
            break
        block[i] = -(-block[i] // 2)
    return tuple(block)


@dataclass
class _Sums:
    n: int = 0
    sq_err: float = 0.0
    sq_gt: float = 0.0
    sg: float = 0.0
    sp: float = 0.0
    sgg: float = 0.0
    spp: float = 0.0
    spg: float = 0.0
    ssim_sum: float = 0.0
    ssim_n: int = 0


def _checked(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} contains NaN or infinite values; mask or replace them first")
    return a


def _window(start: int, stop: int, n: int) -> tuple[int, int]:
    # Halo on both sides, and at least the SSIM window where the axis allows it.
    rstop = min(n, stop + SSIM_HALO)
    rstart = max(0, min(start - SSIM_HALO, rstop - SSIM_WIN))
    return rstart, rstop


def streamed_metrics(
    read_pred: Reader, read_gt: Reader, shape: tuple[int, ...], max_voxels: int = 2**22
) -> dict[str, float]:
    """PSNR, range-invariant PSNR, SSIM and SNR of one 2D/3D image read in blocks.

    Parameters
    ----------
    read_pred, read_gt
        Functions returning the prediction / ground truth over a tuple of slices.
    shape
        Spatial shape of the image.
    max_voxels
        Largest block (before its SSIM halo) held in memory at once.

    Returns
    -------
    dict
        ``psnr``, ``ri_psnr``, ``ssim``, ``snr`` as :func:`~quietscope.metrics.image_quality.psnr`,
        :func:`~quietscope.metrics.image_quality.range_invariant_psnr`,
        :func:`~quietscope.metrics.image_quality.ssim` and
        :func:`~quietscope.metrics.image_quality.snr` give for the whole image.
    """
    if min(shape) < SSIM_WIN:
        raise InputError(
            f"images of shape {tuple(shape)} are smaller than SSIM's {SSIM_WIN}-pixel window on some axis; "
            "pass a larger crop"
        )
    block = block_shape_for(tuple(shape), max_voxels)
    # Pass 1: the ground truth's range (PSNR peak and SSIM constants) and a shift near its mean.
    lo, hi = math.inf, -math.inf
    shift_g = shift_p = None
    for b in iter_blocks(shape, block):
        sl = tuple(slice(a, z) for a, z in zip(b.start, b.stop))
        g = _checked(read_gt(sl), "ground truth")
        lo, hi = min(lo, float(g.min())), max(hi, float(g.max()))
        if shift_g is None:
            shift_g = float(g.mean())
            shift_p = float(_checked(read_pred(sl), "prediction").mean())
    data_range = hi - lo
    if data_range == 0:
        raise InputError("ground truth is constant, so it has no data range; pass data_range")
    # Pass 2: sums, and the SSIM map on halo'd blocks.
    s = _Sums()
    for b in iter_blocks(shape, block):
        win = [_window(a, z, n) for a, z, n in zip(b.start, b.stop, shape)]
        rsl = tuple(slice(a, z) for a, z in win)
        p = _checked(read_pred(rsl), "prediction")
        g = _checked(read_gt(rsl), "ground truth")
        core = tuple(slice(a - ra, z - ra) for a, z, (ra, _) in zip(b.start, b.stop, win))
        pc, gc = p[core], g[core]
        d = pc - gc
        s.n += pc.size
        s.sq_err += float(np.sum(d * d))
        s.sq_gt += float(np.sum(gc * gc))
        G, P = gc - shift_g, pc - shift_p
        s.sg += float(G.sum())
        s.sp += float(P.sum())
        s.sgg += float(np.sum(G * G))
        s.spp += float(np.sum(P * P))
        s.spg += float(np.sum(P * G))
        # SSIM over the block's core voxels that lie in the whole image's averaged interior.
        inner = tuple(
            slice(max(a, SSIM_HALO) - ra, min(z, n - SSIM_HALO) - ra)
            for a, z, n, (ra, _) in zip(b.start, b.stop, shape, win)
        )
        if all(x.stop > x.start for x in inner):
            _, smap = structural_similarity(g, p, data_range=data_range, channel_axis=None, full=True)
            part = smap[inner]
            s.ssim_sum += float(part.sum())
            s.ssim_n += part.size
    return _combine(s, data_range, lo, hi)


def _combine(s: _Sums, data_range: float, lo: float, hi: float) -> dict[str, float]:
    n = s.n
    mse = s.sq_err / n
    with np.errstate(divide="ignore"):
        psnr = float(10 * np.log10(data_range**2 / mse)) if mse > 0 else math.inf
        snr = float(10 * np.log10(s.sq_gt / s.sq_err)) if s.sq_err > 0 else math.inf
    mg, mp = s.sg / n, s.sp / n
    var_g = max(s.sgg / n - mg * mg, 0.0)
    var_p = max(s.spp / n - mp * mp, 0.0)
    cov = s.spg / n - mp * mg
    if var_g == 0:
        raise InputError("ground truth is constant; range-invariant PSNR is undefined for it")
    sd_g = math.sqrt(var_g)
    # range_invariant_psnr in closed form: standardised GT, zero-mean prediction scaled by
    # alpha = cov / (sd_g * var_p); its MSE to the standardised GT is
    # alpha^2 var_p - 2 alpha cov / sd_g + 1 (1 for a constant prediction).
    if var_p > 0:
        alpha = cov / (sd_g * var_p)
        ri_mse = max(alpha * alpha * var_p - 2 * alpha * cov / sd_g + 1.0, 0.0)
    else:
        ri_mse = 1.0
    ri_range = (hi - lo) / sd_g
    ri = float(10 * np.log10(ri_range**2 / ri_mse)) if ri_mse > 0 else math.inf
    return {"psnr": psnr, "ri_psnr": ri, "ssim": s.ssim_sum / s.ssim_n, "snr": snr}
