"""Random 2D/3D patches from lazily read images far larger than memory.

Patches are read chunk-locally (a random stored chunk is chosen first, then a patch around
it) so a training step touches a handful of chunks, never the volume. Validation patches
come from a held-apart slab (the last ``val_fraction`` of the longest spatial axis) that
training never samples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from quietscope.errors import InputError
from quietscope.io.reading import Image
from quietscope.io.validation import check_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """A box in spatial coordinates ``[start, stop)``."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))


def split_train_val(shape: tuple[int, ...], patch: tuple[int, ...], val_fraction: float) -> tuple[Region, Region | None]:
    """Split the spatial extent into a training region and a held-apart validation slab."""
    full = Region((0,) * len(shape), tuple(shape))
    if val_fraction <= 0:
        return full, None
    # Split along the axis with most room beyond one patch for both parts.
    axis = int(np.argmax([s / p for s, p in zip(shape, patch)]))
    n_val = max(patch[axis], int(round(shape[axis] * val_fraction)))
    if shape[axis] - n_val < patch[axis]:
        log.warning("volume too small to hold validation patches apart; validating on training data")
        return full, full
    cut = shape[axis] - n_val
    train = Region(full.start, tuple(cut if i == axis else s for i, s in enumerate(shape)))
    val = Region(tuple(cut if i == axis else 0 for i in range(len(shape))), tuple(shape))
    return train, val


class PatchSampler:
    """Draw random patches ``(C, *patch)`` (float32, raw units) from an image.

    Parameters
    ----------
    image
        Lazily opened image; its spatial axes must match ``len(patch)``.
    patch
        Patch shape over the spatial axes.
    region
        Spatial box to sample from (e.g. the training part of :func:`split_train_val`).
    foreground
        Fraction (0..1) of patches that must be brighter than ``threshold`` on average
        (up to 10 redraws), so training is not dominated by empty background.
    """

    def __init__(
        self,
        image: Image,
        patch: tuple[int, ...],
        region: Region | None = None,
        foreground: float = 0.0,
        threshold: float | None = None,
        augment: bool = True,
    ) -> None:
        self.image = image
        self.patch = tuple(int(p) for p in patch)
        spatial = image.spatial_shape
        if len(self.patch) != len(spatial):
            raise InputError(
                f"patch {self.patch} has {len(self.patch)} axes but the data has {len(spatial)} spatial axes "
                f"({image.spatial_axes}); give --patch with {len(spatial)} values or one number"
            )
        self.region = region or Region((0,) * len(spatial), spatial)
        if any(p > s for p, s in zip(self.patch, self.region.shape)):
            raise InputError(
                f"patch {self.patch} is larger than the volume's usable extent {self.region.shape} "
                f"(axes {image.spatial_axes}); use a smaller --patch"
            )
        self.foreground = foreground
        self.threshold = threshold
        self.augment = augment
        sp_chunks = tuple(c for c, a in zip(image.chunks, image.axes) if a in "zyx")
        self.chunks = sp_chunks

    def _random_origin(self, rng: np.random.Generator) -> tuple[int, ...]:
        # Pick a stored chunk inside the region, then a patch origin near it: chunk-local reads.
        origin = []
        for a, b, c, p in zip(self.region.start, self.region.stop, self.chunks, self.patch):
            first, last = a // c, (b - 1) // c
            ci = int(rng.integers(first, last + 1))
            # Clamp to the region: a last chunk within half a patch of the end must not
            # push the patch past it.
            lo = min(max(a, ci * c - p // 2), b - p)
            hi = max(lo, min(b - p, ci * c + c - p // 2))
            origin.append(int(rng.integers(lo, hi + 1)))
        return tuple(origin)

    def read_patch(self, t: int, origin: tuple[int, ...]) -> np.ndarray:
        sl = tuple(slice(o, o + p) for o, p in zip(origin, self.patch))
        arr = self.image.read_tc(t, sl).astype(np.float32)
        check_finite(arr, f"input {self.image.ref.uri!r}")
        return arr

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` patches stacked as ``(n, C, *patch)``."""
        out = np.empty((n, self.image.n_channels) + self.patch, dtype=np.float32)
        for i in range(n):
            t = int(rng.integers(self.image.n_timepoints))
            want_fg = self.threshold is not None and rng.random() < self.foreground
            for _ in range(10 if want_fg else 1):
                arr = self.read_patch(t, self._random_origin(rng))
                if not want_fg or arr.mean() > self.threshold:
                    break
            out[i] = augment(arr, rng) if self.augment else arr
        return out


def augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and 90° rotations in the y-x plane (the sampled plane), axis 0 = channels."""
    k = int(rng.integers(4))
    out = np.rot90(patch, k, axes=(-2, -1)) if patch.shape[-1] == patch.shape[-2] else patch
    if rng.random() < 0.5:
        out = out[..., ::-1]
    if rng.random() < 0.5:
        out = out[..., ::-1, :]
    return np.ascontiguousarray(out)


def estimate_statistics(
    image: Image, patch: tuple[int, ...], n_patches: int = 64, seed: int = 0
) -> dict[str, list[float] | float]:
    """Per-channel mean/std and a foreground threshold from a random sample of patches."""
    rng = np.random.default_rng(seed)
    sampler = PatchSampler(image, patch, augment=False)
    sample = sampler.sample(n_patches, rng)
    axes = (0,) + tuple(range(2, sample.ndim))
    mean = sample.mean(axis=axes, dtype=np.float64)
    std = sample.std(axis=axes, dtype=np.float64)
    patch_means = sample.mean(axis=tuple(range(1, sample.ndim)))
    smoothed = ndimage.gaussian_filter(sample.astype(np.float32), sigma=[0, 0] + [2.0] * (sample.ndim - 2), mode="reflect")
    return {
        "mean": [float(m) for m in mean],
        "std": [float(max(s, 1e-6)) for s in std],
        "foreground_threshold": float(np.median(patch_means)),
        "min": float(sample.min()),
        "max": float(sample.max()),
        # Percentiles of the sample smoothed over space (σ 2 px): close to the *signal* range,
        # which noise would otherwise widen (used to check a noise model covers the data).
        "signal_p01": float(np.percentile(smoothed, 1)),
        "signal_p99": float(np.percentile(smoothed, 99)),
        "n_patches": n_patches,
        "voxels": int(math.prod(sample.shape)),
    }
