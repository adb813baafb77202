"""Blocks sized by memory, predicted in sub-tiles: still exactly whole-image prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from helpers import random_model, write_zarr_array
from quietscope.chunked import PredictOptions, plan_layout, tasks_at_once
from quietscope.errors import ConfigError
from quietscope.inference import method_halo, predict_tile, predict_whole
from quietscope.inference_memory import memory_profile, probe_memory
from quietscope.io import open_image
from quietscope.methods.modelfile import load_model
from quietscope.runner.subtiles import predict_in_subtiles
from quietscope.tiling import MemoryProfile, block_window, read_window
from quietscope.workflows.predict import predict
from quietscope_cli.main import cli

TOL = 1e-4  # in normalised units (std 20)


def _budget_for(model: str, n_out: int, window_steps: int) -> int:
    """A --memory that lets the net see about ``window_steps`` factor steps (plus halo) per axis."""
    method, _ = load_model(model)
    prof = memory_profile(method, n_out)
    halo = method_halo(method)
    f = method.downsampling_factor
    f = (f,) * len(halo) if isinstance(f, int) else f
    window = tuple(window_steps * k + 2 * h for k, h in zip(f, halo))
    return int((prof.net_bytes(window) + prof.io_bytes_per_voxel * 4 * math.prod(window)) / 0.8)


def test_probe_counts_activations_per_voxel(tmp_path):
    small = load_model(random_model(tmp_path / "a.qs", 3, filters=4, batch_norm=False))[0]
    wide = load_model(random_model(tmp_path / "b.qs", 3, filters=8, batch_norm=False))[0]
    a, b = probe_memory(small), probe_memory(wide)
    # At least the first level's feature map (4 bytes x filters) and its skip copy are alive.
    assert a >= 2 * 4 * 4 and 1.6 < b / a < 2.4
    assert probe_memory(small, steps=2) == pytest.approx(a, rel=0.05)  # per voxel, whatever the tile


@pytest.mark.parametrize("ndim, depth, window, subtile, z_pool", [
    (2, 2, (88, 76), (8, 12), True),
    (3, 1, (36, 44, 40), (4, 8, 8), True),
    (3, 1, (19, 44, 40), (3, 8, 12), False),  # odd z without z pooling
])
def test_subtiles_equal_the_whole_window(tmp_path, ndim, depth, window, subtile, z_pool):
    method, _ = load_model(random_model(tmp_path / "m.qs", ndim, depth=depth, filters=4, z_pool=z_pool))
    halo = method_halo(method)
    rng = np.random.default_rng(0)
    tile = (100 + 20 * rng.standard_normal((1,) + window)).astype(np.float32)
    whole = predict_tile(method, tile)
    calls = []

    def fn(t):
        calls.append(t.shape)
        return predict_tile(method, t)

    got = predict_in_subtiles(fn, tile, halo, subtile)
    assert len(calls) > 2 and all(math.prod(c) < tile.size for c in calls)
    assert np.abs(got - whole).max() / 20 <= TOL


@pytest.mark.parametrize("ndim, depth, shape, chunks, z_pool, steps", [
    (2, 2, (75, 93), (16, 32), True, 2),
    (3, 1, (21, 37, 29), (8, 16, 16), True, 2),
    (3, 1, (11, 30, 26), (4, 16, 16), False, 3),
])
def test_memory_sized_chunked_equals_whole(tmp_path, ndim, depth, shape, chunks, z_pool, steps):
    rng = np.random.default_rng(2)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, chunks)
    model = random_model(tmp_path / "m.qs", ndim, depth=depth, filters=4, z_pool=z_pool)
    budget = _budget_for(model, 1, steps) * tasks_at_once(PredictOptions(), ndim)[0]  # 2D: two tasks share it
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, memory=budget, progress=False))
    method, _ = load_model(model)
    halo = method_halo(method)
    win = block_window(tuple(min(b, s) for b, s in zip(res.block, shape)), halo, method.downsampling_factor)
    sub = res.extra["subtile"]
    assert any(w > t + 2 * h for w, t, h in zip(win, sub, halo)), "the plan must exercise sub-tiles"
    assert res.extra["predicted_bytes"] <= res.extra["memory_budget"] <= budget
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    ref = predict_whole(lambda t: predict_tile(method, t), data[None], halo, method.downsampling_factor)[0]
    assert np.abs(got - ref).max() / 20 <= TOL


def test_given_block_in_subtiles_and_resume_is_identical(tmp_path):
    rng = np.random.default_rng(3)
    data = (100 + 20 * rng.standard_normal((12, 40, 40))).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (4, 16, 16))
    model = random_model(tmp_path / "m.qs", 3, depth=1, filters=4)
    opts = PredictOptions(chunks=(4, 16, 16), block=(12, 32, 32), memory=_budget_for(model, 1, 2), progress=False)
    res = predict(model, src, tmp_path / "a.ome.zarr", opts)
    assert res.block == (12, 32, 32) and res.extra["subtile"]
    method, _ = load_model(model)
    ref = predict_whole(lambda t: predict_tile(method, t), data[None], method_halo(method), method.downsampling_factor)[0]
    got = zarr.open_array(store=str(tmp_path / "a.ome.zarr" / "0"), mode="r")[...]
    assert np.abs(got - ref).max() / 20 <= TOL
    again = predict(model, src, tmp_path / "a.ome.zarr", opts.model_copy(update={"resume": True}))
    assert again.n_done_before == again.n_blocks


def test_memory_too_small_is_a_clear_error(tmp_path):
    data = np.full((8, 32, 32), 100, np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (8, 16, 16))
    model = random_model(tmp_path / "m.qs", 3, filters=4)
    with pytest.raises(ConfigError, match=r"--memory 0\.01 GB cannot hold one tile.*give --memory .*GB or more"):
        predict(model, src, tmp_path / "o.ome.zarr", PredictOptions(memory="10MB", progress=False))
    res = CliRunner().invoke(cli, ["predict", model, src, "-o", str(tmp_path / "o2.ome.zarr"), "--memory", "10MB"])
    assert res.exit_code != 0 and "cannot hold one tile" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.ome.zarr").exists() and not (tmp_path / "o2.ome.zarr").exists()


def test_block_too_large_for_memory_is_a_clear_error(tmp_path):
    # The sub-tile fits the budget, the given block's buffers do not: the error names --block.
    data = np.full((8, 512, 512), 100, np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (8, 128, 128))
    model = random_model(tmp_path / "m.qs", 3, depth=1, filters=4)
    opts = PredictOptions(block=(8, 512, 512), memory=_budget_for(model, 1, 2), progress=False)
    with pytest.raises(ConfigError, match=r"--block \(8, 512, 512\) needs .* GB per task.*give a smaller --block"):
        predict(model, src, tmp_path / "o.ome.zarr", opts)
    assert not (tmp_path / "o.ome.zarr").exists()


def test_memory_option_parsing():
    assert PredictOptions(memory="2GB").blocks.memory == 2_000_000_000
    assert PredictOptions(memory="1.5GiB").blocks.memory == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="not both"):
        PredictOptions(memory="2GB", max_tile_voxels=10**6)
    with pytest.raises(ValueError, match="memory size"):
        PredictOptions(memory="lots")


def test_read_windows_align_for_subtiles(tmp_path):
    """Sub-tile reads start on multiples of the factor inside an aligned block window."""
    method, _ = load_model(random_model(tmp_path / "m.qs", 3, filters=4))
    halo, f = method_halo(method), method.downsampling_factor
    rs, re = read_window((8, 16, 16), (24, 48, 48), halo, f)
    assert all(a % f == 0 and (b - a) % f == 0 for a, b in zip(rs, re))


def test_tasks_sharing_a_budget():
    assert tasks_at_once(PredictOptions(), 3) == (1, 1)  # in-process 3D: one block, all cores
    assert tasks_at_once(PredictOptions(), 2) == (2, None)  # 2D: both task threads busy
    assert tasks_at_once(PredictOptions(max_in_flight=2), 3) == (2, 2)
    assert tasks_at_once(PredictOptions(threads=3, workers=2), 3) == (3, None)
    assert tasks_at_once(PredictOptions(scheduler="tcp://h:8786"), 3) == (1, None)


def test_plane_chunks_that_force_costly_blocks_are_flagged(tmp_path, caplog):
    # A stack chunked one full plane at a time: blocks are whole output chunks, so in this
    # memory only thin blocks fit; the log says what --chunks would save.
    data = np.zeros((64, 1024, 1024), np.uint8)
    z = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=data.shape, chunks=(1, 1024, 1024), dtype=data.dtype)
    image = open_image(str(tmp_path / "in.zarr"), axes="zyx")
    prof = MemoryProfile(net_bytes_per_voxel=210.0, io_bytes_per_voxel=20.0, fixed_bytes=8.7e7,
                         slab_bytes_per_voxel=880.0, whole_bytes_per_voxel=1005.0)
    with caplog.at_level("WARNING", logger="quietscope.chunked"):
        lay = plan_layout(image, 1, (24, 24, 24), PredictOptions(memory="1.58GB"), False, prof, 4)
    assert lay.chunks == (1, 1024, 1024) and z.shape == data.shape
    msg = [r.getMessage() for r in caplog.records if "--chunks 32,256,256" in r.getMessage()]
    assert msg and "less work" in msg[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="quietscope.chunked"):
        plan_layout(image, 1, (24, 24, 24), PredictOptions(memory="1.58GB", chunks=(32, 256, 256)), False, prof, 4)
    assert not [r for r in caplog.records if "less work" in r.getMessage()]
