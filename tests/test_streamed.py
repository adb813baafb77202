"""The streamed U-Net pass: slab by slab, same result as a whole pass, memory that does not grow with depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import quietscope.tiling as tiling
from helpers import random_model, write_zarr_array
from quietscope.chunked import PredictOptions
from quietscope.inference import method_halo, predict_tile, predict_whole
from quietscope.inference_memory import _peak_bytes, memory_profile, probe_memory, probe_streamed_memory
from quietscope.methods.modelfile import load_model
from quietscope.nets import streamed
from quietscope.nets.unet import UNet, inference_slabs
from quietscope.tiling import slab_extent
from quietscope.workflows.predict import predict
from test_memory_blocks import _budget_for


def _bn_stats(net: torch.nn.Module) -> None:
    """Non-trivial running statistics, so eval-mode batch norm is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("ndim, depth, n2v2, pool, bn, shape, step", [
    (3, 2, False, None, False, (36, 12, 8), 8),
    (3, 2, True, None, False, (36, 12, 8), 5),       # blur-pool: replicate padding at the true borders only
    (3, 2, False, (1, 2, 2), True, (37, 12, 8), 4),  # z unpooled, odd planes, batch norm
    (3, 2, True, (1, 2, 2), False, (19, 8, 8), 3),
    (3, 1, False, None, False, (18, 8, 8), 1),       # one-plane slabs: both borders in every slab
    (2, 3, True, None, True, (72, 40), 8),
    (2, 2, False, None, False, (36, 20), 100),       # one slab larger than the tile
    (3, 3, False, None, False, (64, 8, 8), 8),       # three levels: each runs ahead of the one above
    (3, 2, True, None, True, (40, 8, 8), 2),         # thinner slabs than the receptive field
])
def test_streamed_pass_equals_whole_pass(ndim, depth, n2v2, pool, bn, shape, step):
    torch.manual_seed(0)
    net = UNet(ndim, 2, 3, depth=depth, filters=4, batch_norm=bn, n2v2=n2v2, pool=pool).eval()
    _bn_stats(net)
    x = torch.randn((2, 2) + shape)
    with torch.no_grad():
        with inference_slabs(net, 0):
            ref = net(x)
        got = streamed.streamed_forward(net, x, step)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max()))


def test_unet_slabs_only_in_inference(monkeypatch):
    calls = []
    monkeypatch.setattr("quietscope.nets.unet.streamed_forward",
                        lambda net, x, step: calls.append(step) or streamed.streamed_forward(net, x, step))
    net = UNet(3, 1, 1, depth=1, filters=4)
    x = torch.randn(1, 1, 64, 64, 64)  # 262 144 voxels: slab_extent gives 2 slabs of 32 planes
    assert slab_extent((64, 64, 64)) == 32
    net.train()
    net(x[:, :, :16, :16, :16]).sum().backward()  # training: never slabbed
    net.eval()
    net(x[:, :, :16, :16, :16])  # autograd on: not slabbed
    assert calls == []
    with torch.no_grad():
        net(x)
        with inference_slabs(net, 0):
            net(x)
    assert calls == [32]


def test_streamed_pass_memory_does_not_grow_with_depth(tmp_path):
    """Counted peak of a 32-filter 3D U-Net streamed along z: planes deeper cost only their input
    and output, a deep tile a fraction of the whole pass, as the profile predicts."""
    method = load_model(random_model(tmp_path / "m.qs", 3, depth=2, filters=32, batch_norm=False))[0]
    plane, step = (48, 48), 8
    with inference_slabs(method, step):
        peaks = {z: _peak_bytes(method, (z,) + plane) for z in (96, 192)}
    per_plane = 48 * 48
    # 96 more planes add their input and output (8 bytes per voxel), nothing held per level
    assert (peaks[192] - peaks[96]) / (96 * per_plane) == pytest.approx(8.0, abs=1.0)
    whole = probe_memory(method)
    assert whole > 700 and peaks[192] / (192 * per_plane) < 0.15 * whole
    a, b = probe_streamed_memory(method)
    for z, peak in peaks.items():
        assert a * z * per_plane + b * step * per_plane == pytest.approx(peak, rel=0.05)
    prof = memory_profile(method, 1)
    assert prof.whole_bytes_per_voxel == pytest.approx(1.25 * whole)
    # The profile charges the whole pass where the window is too thin to slab.
    assert slab_extent((12, 400, 400)) is None
    assert prof.net_bytes((12, 400, 400)) - prof.fixed_bytes == pytest.approx(1.25 * whole * 12 * 400 * 400)


@pytest.mark.parametrize("shape, chunks, z_pool, block", [
    ((45, 37, 29), (8, 16, 16), True, None),
    ((23, 30, 26), (4, 16, 16), False, None),
    # 2D, streamed along y: a 2D plan runs two tasks at once, and its buffers are small enough
    # that the planner would take one block: --block makes several
    ((150, 70), (16, 32), True, (48, 32)),
])
def test_streamed_chunked_equals_whole(tmp_path, monkeypatch, shape, chunks, z_pool, block):
    """With slabs engaged on small windows, chunked prediction still equals whole-image prediction."""
    monkeypatch.setattr(tiling, "SLAB_MIN_VOXELS", 256)
    monkeypatch.setattr(tiling, "SLAB_MIN_PLANES", 4)
    steps = []
    real = streamed.streamed_forward
    monkeypatch.setattr("quietscope.nets.unet.streamed_forward",
                        lambda net, x, step: steps.append(step) or real(net, x, step))
    rng = np.random.default_rng(4)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, chunks)
    model = random_model(tmp_path / "m.qs", len(shape), depth=1, filters=4, z_pool=z_pool)
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, memory=_budget_for(model, 1, 3) * (2 if len(shape) == 2 else 1),
                                                  block=block, progress=False))
    assert res.n_blocks > 1 and res.extra["subtile"], "the plan must exercise blocks and sub-tiles"
    assert steps, "the chunked run must use slabbed passes"
    n_chunked = len(steps)
    method, _ = load_model(model)
    ref = predict_whole(lambda t: predict_tile(method, t), data[None], method_halo(method), method.downsampling_factor)[0]
    assert len(steps) > n_chunked, "the whole-image reference must use slabbed passes too"
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    assert np.abs(got - ref).max() / 20 <= 1e-4
