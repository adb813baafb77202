"""Cheap checks on lazily read data (a sample of chunks, never a full pass)."""

from __future__ import annotations

import numpy as np

from quietscope.errors import InputError
from quietscope.io.reading import Image


def sample_chunk_slices(image: Image, n: int, rng: np.random.Generator) -> list[tuple[slice, ...]]:
    """Slices (canonical order) of up to ``n`` randomly chosen whole stored chunks."""
    chunks = image.chunks
    counts = [-(-s // c) for s, c in zip(image.shape, chunks)]
    total = int(np.prod(counts))
    picks = rng.choice(total, size=min(n, total), replace=False)
    out = []
    for p in picks:
        idx = np.unravel_index(int(p), counts)
        out.append(tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, image.shape)))
    return out


def check_finite(block: np.ndarray, where: str) -> None:
    """Raise a one-line error when ``block`` holds NaN or infinite values."""
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        n_bad = int((~np.isfinite(block)).sum())
        raise InputError(
            f"{where} contains {n_bad} NaN/inf values; replace them (e.g. with 0 or the background level) before denoising"
        )


def check_finite_sample(image: Image, n_chunks: int = 16, seed: int = 0) -> None:
    """Check a sample of chunks for NaN/inf (float data only). Blocks are checked again when read."""
    if image.dtype.kind != "f":
        return
    rng = np.random.default_rng(seed)
    for sl in sample_chunk_slices(image, n_chunks, rng):
        check_finite(image.read(sl), f"input {image.ref.uri!r}")


def check_not_constant(image: Image, n_chunks: int = 16, seed: int = 0, min_levels: int = 3) -> None:
    """Refuse training data that is (nearly) constant on a sample of chunks.

    Self-supervised methods learn from the structure of the noise; data with fewer than
    ``min_levels`` distinct values (per channel) has neither signal nor noise to learn from, and
    training on it would produce a model silently.

    Raises
    ------
    InputError
        Fewer than ``min_levels`` distinct values, or a standard deviation of 0, in a channel.
    """
    rng = np.random.default_rng(seed)
    samples = [image.read(sl) for sl in sample_chunk_slices(image, n_chunks, rng)]
    c_axis = image.axes.index("c") if "c" in image.axes else None
    for c in range(image.n_channels):
        vals = np.concatenate([(s.take(c, axis=c_axis) if c_axis is not None else s).ravel() for s in samples])
        vals = vals[np.isfinite(vals)] if vals.dtype.kind == "f" else vals
        n_distinct = len(np.unique(vals[:1_000_000]))
        if n_distinct < min_levels or float(np.std(vals)) == 0.0:
            what = f"channel {c} of " if image.n_channels > 1 else ""
            value = f"constant ({vals.flat[0]!r})" if n_distinct == 1 else f"nearly constant ({n_distinct} distinct values)"
            raise InputError(f"{what}input {image.ref.uri!r} is {value} in the sampled chunks: there is no signal or noise "
                             "to learn from; check that the right file, channel and --level are given")
