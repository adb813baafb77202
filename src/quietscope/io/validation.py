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
