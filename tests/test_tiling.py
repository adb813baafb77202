"""Pure shape arithmetic of chunked prediction (no torch, no dask)."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from quietscope.tiling import (
    MemoryProfile,
    best_subtile,
    block_window,
    choose_block_shape,
    compute_factor,
    halo_factor,
    halo_from_radius,
    parse_bytes,
    per_axis,
    plan_blocks,
    plan_memory_blocks,
    read_window,
    reflect_indices,
    subtile_cuts,
    subtile_voxels,
    trim_slices,
    whole_window,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("pad", [0, 1, 5, 23])
def test_reflect_indices_match_numpy_pad(n, pad):
    a = np.arange(n) * 10
    expected = np.pad(a, (pad, pad + 3), mode="reflect") if n > 1 else np.pad(a, (pad, pad + 3), mode="edge")
    got = a[reflect_indices(-pad, n + pad + 3, n)]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape,block", [((100,), (32,)), ((37, 50), (16, 24)), ((5, 33, 17), (2, 16, 16))])
def test_blocks_cover_volume_exactly_once(shape, block):
    cover = np.zeros(shape, int)
    for b in plan_blocks(shape, block):
        cover[b.slices()] += 1
        assert all(s <= bs for s, bs in zip(b.shape, block))
    assert (cover == 1).all()


@pytest.mark.parametrize("start,stop,halo,factor", [((0,), (32,), (8,), 4), ((40, 3), (64, 29), (12, 6), 8), ((5,), (6,), (0,), 2)])
def test_read_window_is_aligned_and_covers_halo(start, stop, halo, factor):
    rstart, rstop = read_window(start, stop, halo, factor)
    for a, b, h, ra, rb in zip(start, stop, halo, rstart, rstop):
        assert ra % factor == 0 and rb % factor == 0
        assert ra <= a - h and rb >= b + h
        assert (a - h) - ra < factor and rb - (b + h) < factor


def test_read_window_with_a_factor_per_axis():
    """A U-Net that does not pool z has factor (1, 4, 4): z windows need no alignment."""
    rstart, rstop = read_window((3, 5, 9), (6, 21, 30), (10, 24, 24), (1, 4, 4))
    assert rstart == (-7, -20, -16) and rstop == (16, 48, 56)
    assert whole_window((11, 37, 29), (10, 24, 24), (1, 4, 4)) == ((-10, -24, -24), (21, 64, 56))
    assert halo_from_radius((10, 21, 21), (1, 4, 4)) == (10, 24, 24)


def test_per_axis_factor_is_checked():
    assert per_axis(4, 3) == (4, 4, 4) and per_axis((1, 4, 4), 3) == (1, 4, 4)
    with pytest.raises(ValueError, match="does not fit 2 axes"):
        per_axis((1, 4, 4), 2)


def test_trim_slices_cut_block_out_of_window():
    start, stop = (40, 3), (64, 29)
    rstart, rstop = read_window(start, stop, (12, 6), 8)
    window = np.arange(np.prod([b - a for a, b in zip(rstart, rstop)])).reshape([b - a for a, b in zip(rstart, rstop)])
    cut = window[trim_slices(start, stop, rstart)]
    assert cut.shape == (24, 26)
    assert cut[0, 0] == window[start[0] - rstart[0], start[1] - rstart[1]]


def test_whole_window_starts_at_minus_halo():
    wstart, wstop = whole_window((37, 50), (8, 8), 4)
    assert wstart == (-8, -8)
    assert wstop[0] >= 37 + 8 and wstop[0] % 4 == 0


def test_halo_rounded_up_to_factor():
    assert halo_from_radius((21, 0, 8), 4) == (24, 0, 8)


def test_block_choice_reaches_halo_target_in_2d_within_memory():
    shape, chunks, halo = (4096, 4096), (256, 256), (24, 24)
    block = choose_block_shape(shape, chunks, halo, max_voxels=1_500_000)
    assert all(b % c == 0 for b, c in zip(block, chunks))
    assert np.prod([b + 2 * h for b, h in zip(block, halo)]) <= 1_500_000
    assert halo_factor(block, halo) <= 1.25


def test_block_choice_respects_volume_and_memory_in_3d():
    shape, chunks, halo = (64, 1024, 1024), (32, 128, 128), (24, 24, 24)
    block = choose_block_shape(shape, chunks, halo, max_voxels=3_000_000)
    assert np.prod([b + 2 * h for b, h in zip(block, halo)]) <= 3_000_000
    assert block[0] <= 64
    # The search stops only when no one-chunk growth fits in memory (or the volume) and helps.
    for ax in range(3):
        bigger = list(block)
        bigger[ax] += chunks[ax]
        over_memory = np.prod([b + 2 * h for b, h in zip(bigger, halo)]) > 3_000_000
        beyond_volume = block[ax] >= shape[ax]
        assert over_memory or beyond_volume


def test_block_choice_in_powers_of_two_of_chunks_along_pyramid_axes():
    shape, chunks, halo = (4096, 4096), (96, 96), (24, 24)
    free = choose_block_shape(shape, chunks, halo, max_voxels=1_500_000)
    pow2 = choose_block_shape(shape, chunks, halo, max_voxels=1_500_000, pow2_axes=(0, 1))
    assert free == (576, 480)  # 6 x 5 chunks: no pyramid level can be written block-locally
    for ax in (0, 1):
        n = pow2[ax] // chunks[ax]
        assert n & (n - 1) == 0 or pow2[ax] >= shape[ax]  # 1, 2, 4, ... chunks, or the whole axis
    assert pow2 == (768, 384)  # 8 x 4 chunks: levels 1 and 2 are written by each block
    assert np.prod([b + 2 * h for b, h in zip(pow2, halo)]) <= 1_500_000
    assert halo_factor(pow2, halo) < halo_factor(free, halo) + 0.01  # alignment costs little halo


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(" 1.5 g") == 15 * 10**8
    for bad in ("", "GB", "2 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("length, halo, tile", [(64, 8, 16), (68, 8, 16), (40, 8, 24), (20, 4, 4), (96, 24, 4), (12, 0, 4)])
def test_subtile_cuts_cover_once_with_halo_inside_the_window(length, halo, tile):
    cuts = subtile_cuts(length, halo, tile)
    cover = np.zeros(length, int)
    for a, b, r0, r1 in cuts:
        cover[a:b] += 1
        assert 0 <= r0 <= a < b <= r1 <= length
        assert (a - r0 == halo or r0 == 0) and (r1 - b == halo or r1 == length)  # full halo unless at the edge
        assert r1 - r0 <= tile + 2 * halo and r0 % 4 == 0 and a % 4 == 0
    assert (cover == 1).all()
    assert len(cuts) == 1 or len(cuts) == len(range(halo + tile, length - halo, tile)) + 1


def test_best_subtile_is_the_cheapest_fitting_tile_of_its_window():
    halo, window = (8, 8, 8), (48, 80, 96)

    def fits(w):
        return math.prod(w) <= 40**3

    def cost(t):
        return math.prod(sum(r1 - r0 for *_, r0, r1 in subtile_cuts(n, h, a)) for n, h, a in zip(window, halo, t))

    t = best_subtile(window, halo, 4, fits)
    brute = min((cost(c), c) for c in product(*(range(4, n - 2 * h + 4, 4) for n, h in zip(window, halo)))
                if fits(tuple(min(a + 2 * h, n) for a, h, n in zip(c, halo, window))))
    assert cost(t) == brute[0] and all(a % 4 == 0 for a in t)
    assert best_subtile((16, 64, 64), (24, 24, 24), 4, lambda w: True) == (4, 16, 16)  # one tile: the window's output
    assert best_subtile(window, halo, 4, lambda w: False) is None


def test_memory_plan_shapes_the_subtile_to_its_block():
    # The probed profile of a 32-filter depth-2 3D U-Net (z pooled) at the default CPU budget:
    # a sub-tile chosen alone (112^3) cut a 64-plane block's 112-plane window unevenly in xy
    # and computed 4.02 voxels per voxel written; chosen with its block it computes 3.31.
    prof = MemoryProfile(net_bytes_per_voxel=210.0, io_bytes_per_voxel=20.0, fixed_bytes=8.7e7,
                         slab_bytes_per_voxel=880.0, whole_bytes_per_voxel=1005.0)
    shape, chunks, halo = (128, 1024, 1024), (32, 256, 256), (24, 24, 24)
    block, tile = plan_memory_blocks(shape, chunks, halo, 4, prof, 1.58e9, pow2_axes=(1, 2))
    assert compute_factor(shape, block, halo, 4, tile) < 3.4
    assert compute_factor(shape, block, halo, 4, tile) <= compute_factor(shape, block, halo, 4, (112, 112, 112))
    big_block, big_tile = plan_memory_blocks(shape, chunks, halo, 4, prof, 4e9, pow2_axes=(1, 2))
    assert big_block[0] == 128 and compute_factor(shape, big_block, halo, 4, big_tile) < 2.3  # more memory: deeper


def test_memory_plan_fits_the_budget_and_goes_deep_in_z():
    prof = MemoryProfile(net_bytes_per_voxel=1000.0, io_bytes_per_voxel=20.0, fixed_bytes=5e7)
    shape, chunks, halo = (128, 1024, 1024), (32, 256, 256), (24, 24, 24)
    for budget in (1e9, 2e9, 8e9):
        block, tile = plan_memory_blocks(shape, chunks, halo, 4, prof, budget, pow2_axes=(1, 2))
        win = block_window(block, halo, 4)
        assert prof.task_bytes(win, tuple(min(t + 2 * h, w) for t, h, w in zip(tile, halo, win))) <= budget
        assert all(b % c == 0 for b, c in zip(block, chunks))
        assert block[0] >= 64 or budget < 2e9  # several chunks deep in z once the buffers fit
        assert compute_factor(shape, block, halo, 4, tile) <= compute_factor(shape, chunks, halo, 4, tile)
    with pytest.raises(ValueError):
        plan_memory_blocks(shape, chunks, halo, 4, prof, 1e8)


def test_compute_factor_counts_subtile_halos():
    assert compute_factor((64,), (64,), (8,), 4) == pytest.approx(80 / 64)
    assert subtile_voxels((80,), (8,), (16,)) == 4 * 32  # reads [0,32) [16,48) [32,64) [48,80)
    assert compute_factor((64,), (64,), (8,), 4, (16,)) == pytest.approx(128 / 64)
