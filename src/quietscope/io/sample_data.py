"""Locate the real test images (``../shared/data``) and build small samples from them.

The images are never copied into the project; when they are absent (a fresh machine
without the shared folder) a synthetic sample is generated instead, and callers say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def find_data_dir() -> Path | None:
    """``$QUIETSCOPE_DATA``, else ``shared/data`` beside the current or the source checkout."""
    env = os.environ.get("QUIETSCOPE_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    candidates += [p / "shared" / "data" for p in here.parents]
    for c in candidates:
        if (c / "README.md").exists() or (c / "bpae").is_dir():
            return c
    return None


def read_tiff(path: Path) -> np.ndarray:
    """Read a whole TIFF into memory (small files only: PSFs, samples)."""
    import tifffile

    return tifffile.imread(path)


def synthetic_clean(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Blobs and filaments on a dim background, values roughly 10..200 (float32)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    n = max(8, int(np.prod(shape) / 600))
    idx = tuple(rng.integers(0, s, n) for s in shape)
    img[idx] = rng.uniform(0.5, 1.0, n) * 3000
    img = ndi.gaussian_filter(img, 2.5)
    lines = np.zeros(shape, np.float32)
    for _ in range(max(3, shape[-1] // 24)):
        start = np.array([rng.uniform(0, s) for s in shape])
        direction = rng.normal(size=len(shape))
        direction /= np.linalg.norm(direction)
        for t in np.linspace(0, max(shape), 4 * max(shape)):
            p = np.round(start + t * direction).astype(int)
            if np.all(p >= 0) and np.all(p < shape):
                lines[tuple(p)] = 1.0
    lines = ndi.gaussian_filter(lines, 1.0) * 120
    return (10 + img + lines).astype(np.float32)


def real_clean_2d(size: int = 256, seed: int = 0) -> tuple[np.ndarray, str] | None:
    """A high-SNR real crop (BPAE actin) as float32, or None when the data is absent."""
    d = find_data_dir()
    if d is None or not (d / "bpae" / "bpae_actin.tif").exists():
        return None
    img = read_tiff(d / "bpae" / "bpae_actin.tif").astype(np.float32)
    y0 = (img.shape[0] - size) // 2
    x0 = (img.shape[1] - size) // 2
    return img[y0 : y0 + size, x0 : x0 + size], "BPAE actin (shared/data/bpae, CC-BY-4.0), centre crop"
