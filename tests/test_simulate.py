"""Synthetic Poisson-Gaussian noise: statistics and independence from chunking."""

from __future__ import annotations

import numpy as np
import pytest

from quietscope.errors import ConfigError, InputError
from quietscope.simulate import noise_tile_edge, poisson_gaussian


def simulate_in_blocks(clean, block, **kwargs):
    """Noise every block separately, at its global offset, and stitch them."""
    out = np.empty(clean.shape, np.float32)
    starts = [range(0, n, b) for n, b in zip(clean.shape, block)]
    for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, clean.ndim):
        sl = tuple(slice(c, c + b) for c, b in zip(corner, block))
        out[sl] = poisson_gaussian(clean[sl], offset=tuple(corner), **kwargs)
    return out


@pytest.mark.parametrize(
    ("shape", "block"),
    [((70, 90), (25, 40)), ((9, 40, 70), (4, 17, 33)), ((600, 20), (250, 7))],
)
def test_blocks_stitch_to_whole_image_bit_identically(shape, block):
    # The last case crosses a 512-pixel noise tile boundary inside a block.
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 100, shape).astype(np.float32)
    kwargs = dict(poisson_scale=0.5, gauss_rel=0.1, data_std=float(clean.std()), seed=7)
    whole = poisson_gaussian(clean, **kwargs)
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(simulate_in_blocks(clean, block, **kwargs), whole)


def test_noise_depends_on_seed_and_position():
    clean = np.full((40, 40), 50.0)
    a = poisson_gaussian(clean, 1.0, 0.1, 10.0, seed=1)
    assert not np.array_equal(a, poisson_gaussian(clean, 1.0, 0.1, 10.0, seed=2))
    assert np.array_equal(a, poisson_gaussian(clean, 1.0, 0.1, 10.0, seed=1))
    # A block at another place of the image gets other noise, though its clean values match.
    shifted = poisson_gaussian(clean, 1.0, 0.1, 10.0, seed=1, offset=(0, 40))
    assert not np.array_equal(a, shifted)


def test_noise_has_expected_mean_and_variance():
    level, scale, rel, data_std = 40.0, 0.5, 0.2, 10.0
    noisy = poisson_gaussian(np.full((200, 300), level), scale, rel, data_std, seed=3)
    expected_var = level / scale + (rel * data_std) ** 2  # Poisson(l*k)/k has variance l/k
    n = noisy.size
    assert noisy.mean() == pytest.approx(level, abs=5 * np.sqrt(expected_var / n))
    assert noisy.var() == pytest.approx(expected_var, rel=5 * np.sqrt(2 / n))


def test_poisson_part_is_counts_over_scale_and_clips_negatives():
    clean = np.array([[-5.0, 0.0, 3.0, 1000.0]] * 50)
    noisy = poisson_gaussian(clean, 2.0, None, 0.0, seed=0)
    assert np.all(noisy[:, :2] == 0)  # negative and zero signal: no photons
    np.testing.assert_array_equal(noisy * 2, np.round(noisy * 2))  # whole photon counts
    assert noisy[:, 3].mean() == pytest.approx(1000.0, rel=0.01)


def test_gaussian_only_and_no_noise():
    clean = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    gauss = poisson_gaussian(clean, None, 0.5, 2.0, seed=0)
    assert np.std(gauss - clean) == pytest.approx(1.0, rel=0.05)
    np.testing.assert_array_equal(poisson_gaussian(clean, None, None, 1.0, seed=0),
                                  clean.astype(np.float32))


def test_tile_edge_keeps_tiles_near_a_quarter_million_voxels():
    assert noise_tile_edge(2) == 512
    assert noise_tile_edge(3) == 64


def test_invalid_arguments_are_rejected():
    clean = np.ones((8, 8))
    with pytest.raises(ConfigError, match="offset"):
        poisson_gaussian(clean, 1.0, 0.1, 1.0, seed=0, offset=(0,))
    with pytest.raises(ConfigError, match="poisson_scale"):
        poisson_gaussian(clean, 0.0, 0.1, 1.0, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        poisson_gaussian(clean, 1.0, 0.1, 1.0, seed=-1)
    with pytest.raises(InputError, match="NaN"):
        poisson_gaussian(np.full((4, 4), np.nan), 1.0, 0.1, 1.0, seed=0)
