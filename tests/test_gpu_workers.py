"""GPU workers without a GPU: device assignment, GPU=1 requests, clear errors, work sizing.

The GPUs are faked the way a node shows them: ``CUDA_VISIBLE_DEVICES`` in the environment and
a device count (monkeypatched, since torch here has no CUDA). Worker processes never touch CUDA:
a probe processor reports which device each block's worker was pinned to.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import quietscope.inference as inference
import quietscope.runner.cluster as cluster
from helpers import random_model, write_zarr_array
from quietscope.chunked import PredictOptions, run_prediction
from quietscope.errors import ConfigError
from quietscope.inference import (
    GPU_MAX_TILE_VOXELS,
    GPU_MEMORY_FRACTION,
    ModelProcessor,
    device_work_voxels,
    gpu_work_voxels,
    method_halo,
    predict_tile,
    predict_whole,
    subtile_windows,
)
from quietscope.io.reading import open_image
from quietscope.methods.modelfile import load_model
from quietscope.runner.cluster import PinnedGPUCluster, resolve_gpus, visible_gpus
from quietscope.runner.testing import DeviceProbeProcessor
from quietscope_cli.main import cli


@pytest.fixture
def fake_gpus(monkeypatch):
    """Three GPUs on this node, as SLURM would expose an allocation of physical 4, 5 and 7."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,7")
    monkeypatch.setattr(cluster, "cuda_device_count", lambda: 3)
    return ["4", "5", "7"]


# ---- which devices ---------------------------------------------------------------------------
def test_gpu_specs_select_distinct_visible_devices(fake_gpus, monkeypatch):
    assert visible_gpus() == fake_gpus
    assert resolve_gpus("all") == ["4", "5", "7"]
    assert resolve_gpus("2") == ["4", "5"]
    assert resolve_gpus("0,2") == ["4", "7"]
    assert resolve_gpus("1,") == ["5"]
    for bad, msg in [("4", "only 3 GPU"), ("0,3", "in 0..2"), ("1,1", "distinct"), ("two", "not all, a count")]:
        with pytest.raises(ConfigError, match=msg):
            resolve_gpus(bad)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1", "2"]  # no variable: torch's own numbering


def test_no_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(cluster, "cuda_device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # set, but no device behind it
    with pytest.raises(ConfigError, match="no CUDA GPU is visible") as exc:
        resolve_gpus("all")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("command", ["predict", "filter"])
def test_cli_gpus_without_a_gpu(tmp_path, command):
    """The real machine has no GPU: one line, exit 2, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    src = write_zarr_array(tmp_path / "in.zarr", np.ones((32, 32), np.float32), (32, 32))
    out = tmp_path / "out.ome.zarr"
    if command == "predict":
        args = ["predict", random_model(tmp_path / "m.qs", 2, depth=1, filters=4), src]
    else:
        args = ["filter", src, "--kind", "box", "--size", "3"]
    res = CliRunner().invoke(cli, ["-q", *args, "-o", str(out), "--gpus", "all", "--no-progress"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("quietscope: error: --gpus all: no CUDA GPU is visible"), res.output
    assert not out.exists()


def test_gpus_conflicts_are_refused(tmp_path, fake_gpus):
    src = write_zarr_array(tmp_path / "in.zarr", np.ones((32, 32), np.float32), (32, 32))
    model = random_model(tmp_path / "m.qs", 2, depth=1, filters=4)
    for extra, msg in [(["--device", "cpu"], "contradicts it"), (["--scheduler", "tcp://127.0.0.1:1"], "leave --gpus out"),
                       (["--workers", "3"], "disagree")]:
        res = CliRunner().invoke(cli, ["-q", "predict", model, src, "-o", str(tmp_path / "o.ome.zarr"), "--gpus", "0,2",
                                       "--no-progress", "--overwrite", *extra])
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)


def test_one_worker_per_gpu_each_task_requests_gpu(tmp_path, fake_gpus, caplog):
    """N workers, N distinct devices; every block task asked for GPU=1 (else the probe writes -1)."""
    data = np.zeros((48, 64), np.float32)
    image = open_image(write_zarr_array(tmp_path / "in.zarr", data, (16, 16)))
    out = tmp_path / "out.ome.zarr"
    options = PredictOptions(chunks=(16, 16), block=(16, 16), gpus="0,2", progress=False, n_levels=1)
    with caplog.at_level(logging.INFO, logger="quietscope.runner.cluster"):
        res = run_prediction(image, out, DeviceProbeProcessor(sleep=0.05), ["device"], (0, 0), 1, options, {})
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    assert res.n_blocks == 12
    per_block = {float(v) for v in np.unique(got.reshape(3, 16, 4, 16)[:, 0, :, 0])}
    assert per_block == {4.0, 7.0}  # both workers computed blocks, each on its own device, never -1
    log = caplog.text
    assert "PinnedGPUCluster" in log and "CUDA_VISIBLE_DEVICES=4" in log and "CUDA_VISIBLE_DEVICES=7" in log


def test_pinned_cluster_spec_gives_each_worker_its_device():
    """The worker specs themselves (no processes started): N workers, N distinct devices, GPU=1."""
    devices = ["3", "1", "0", "2"]
    cl = PinnedGPUCluster.__new__(PinnedGPUCluster)  # only the spec logic, no scheduler
    cl.devices = devices
    cl.worker_spec, cl._i, cl._name = {}, 0, "test"
    cl.new_spec = {"cls": object, "options": {"env": {"OMP_NUM_THREADS": "1"}, "nthreads": 2}}
    specs = {}
    for _ in devices:
        spec = cl.new_worker_spec()
        cl.worker_spec.update(spec)
        specs.update(spec)
    envs = [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()]
    assert sorted(envs) == sorted(devices) and len(set(envs)) == 4
    assert all(s["options"]["resources"] == {"GPU": 1} and s["options"]["env"]["OMP_NUM_THREADS"] == "1" for s in specs.values())
    assert cl.new_spec["options"]["env"] == {"OMP_NUM_THREADS": "1"}  # the template is not changed


# ---- work sizing -----------------------------------------------------------------------------
@pytest.mark.parametrize("free, bpv", [(80e9, 400.0), (16e9, 1200.0), (3e9, 64.0), (1e12, 10.0), (5e6, 20.0)])
def test_work_size_follows_the_rule(free, bpv):
    v = gpu_work_voxels(free, bpv)
    fit = GPU_MEMORY_FRACTION * free / bpv
    assert v == min(GPU_MAX_TILE_VOXELS, 2 ** math.floor(math.log2(fit)))
    assert v <= fit and v <= GPU_MAX_TILE_VOXELS and v & (v - 1) == 0
    assert v > fit / 2 or v == GPU_MAX_TILE_VOXELS  # the largest power of two that fits


def test_work_size_from_mocked_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(12e9), int(16e9)))
    assert device_work_voxels(torch.device("cuda"), 300.0) == gpu_work_voxels(12e9, 300.0) == 2**24
    assert device_work_voxels(torch.device("cpu"), 300.0) is None  # the CPU path is unchanged
    assert device_work_voxels(torch.device("cuda"), None) is None
    with pytest.raises(ConfigError, match="not even"):
        gpu_work_voxels(1e6, 300.0)  # 1666 voxels


def test_subtile_windows_cover_the_tile_once():
    shape, halo, f = (96, 120), (24, 24), 4
    window, cores = subtile_windows(shape, halo, f, 6000)
    assert math.prod(window) <= 6000 and len(cores) > 1
    cover = np.zeros(shape, int)
    for a, b, ws in cores:
        cover[tuple(slice(x, y) for x, y in zip(a, b))] += 1
        assert all(w0 % f == 0 and w0 + w <= s for w0, w, s in zip(ws, window, shape))
        # the core's context (halo each side, clipped to the tile) lies inside its window
        assert all(w0 <= max(x - h, 0) and min(y + h, s) <= w0 + w for x, y, w0, w, h, s in zip(a, b, ws, window, halo, shape))
    assert (cover == 1).all()
    assert subtile_windows(shape, halo, f, 10**9) == (shape, [((0, 0), shape, (0, 0))])
    with pytest.raises(ConfigError, match="smallest window"):
        subtile_windows(shape, halo, f, 2000)


def test_batched_tiles_chunked_equals_whole(tmp_path, monkeypatch):
    """Mocked free memory -> a pass bound smaller than the blocks: tiles are cut into windows of
    one shape (stacked as far as the bound allows), no pass exceeds the bound, and the stitched
    result still equals the whole image."""
    rng = np.random.default_rng(11)
    data = (100 + 20 * rng.standard_normal((75, 93))).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (32, 32))
    model = random_model(tmp_path / "m.qs", 2, depth=2, filters=8)
    method, _ = load_model(model)
    halo, factor = method_halo(method), method.downsampling_factor
    work = device_work_voxels(torch.device("cuda"), 1000.0, free_bytes=24e6)  # the rule: 2^13
    assert work == 8192
    passes = []
    real_forward = inference._forward
    monkeypatch.setattr(inference, "_forward", lambda m, batch, dev: (passes.append(batch.shape), real_forward(m, batch, dev))[1])
    factory = ModelProcessor(model, "cpu", "batched-test", work_voxels=work)
    out = tmp_path / "out.ome.zarr"
    res = run_prediction(open_image(src), out, factory, ["denoised"], halo, factor,
                         PredictOptions(chunks=(32, 32), block=(64, 64), progress=False), {})
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    ref = predict_whole(lambda t: predict_tile(method, t), data[None], halo, factor)[0]
    assert res.n_blocks == 4
    assert len(passes) > res.n_blocks  # the blocks' tiles were cut into windows
    assert all(s[0] * math.prod(s[2:]) <= work for s in passes)  # never over the bound
    assert np.abs(got - ref).max() / 20 <= 1e-4
