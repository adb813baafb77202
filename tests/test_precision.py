"""--precision and train --amp on the CPU: bf16 autocast through the chunked path, its error
against fp32 bounded, fp32 the unchanged CPU default, noise-model likelihoods in float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr

from helpers import blobs, random_model, write_zarr_array
from quietscope.chunked import PredictOptions
from quietscope.device import amp_precision, module_precision, resolve_precision, set_module_precision
from quietscope.errors import ConfigError
from quietscope.inference import LoadedModel, ModelProcessor, device_tile_function, method_halo, predict_tile, predict_whole
from quietscope.io.reading import open_image
from quietscope.methods import build_method
from quietscope.methods.modelfile import load_model
from quietscope.metrics.image_quality import psnr
from quietscope.noise_models import GMMNoiseModel
from quietscope.training.loop import TrainConfig, train
from quietscope.workflows.predict import predict

TOL = 1e-4  # chunked == whole, in normalised units (std 20), as tests/test_chunked.py
#: bf16 against fp32 on these images, as PSNR over the fp32 output's range. Measured 2026-12-01
#: on this CPU (oneDNN bf16 convolutions, float32 accumulation): 39.3 dB for the 2D U-Net below
#: (depth 2, 8 filters, random weights) and 38.8 dB for the 3D one (depth 1, 4 filters); asserted
#: with ~3 dB to spare. docs/cluster.md ("Precision") has the figures of a trained model.
BF16_MIN_PSNR_DB = 36.0
CPU = torch.device("cpu")


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.poisson(20 + 180 * blobs(shape, seed)).astype(np.float32)


def _whole_at(model, data, precision):
    method, _ = load_model(model)
    set_module_precision(method.net, precision, "cpu")
    halo = method_halo(method)
    return predict_whole(lambda t: predict_tile(method, t), data[None], halo, method.downsampling_factor)[0]


def test_precision_names_and_defaults():
    assert resolve_precision("auto", CPU) == "fp32"  # nothing changes on the CPU by default
    assert resolve_precision("bf16", CPU) == "bf16"
    assert amp_precision(CPU) == "bf16"
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="unknown"):
        resolve_precision("int8", CPU)


def test_cpu_default_is_the_plain_fp32_path(tmp_path):
    """Default options on the CPU build the very tile function of before (bit-identical)."""
    model = random_model(tmp_path / "m.qs", 2, depth=1, filters=4)
    fn = ModelProcessor(model, "cpu", "t").build()
    method, _ = load_model(model)
    tile = _image((1, 48, 48))
    assert np.array_equal(fn(tile), predict_tile(method, tile))
    assert not method.net._forward_hooks and not method.net._forward_pre_hooks


@pytest.mark.parametrize("ndim, shape, chunks, block", [(2, (75, 93), (16, 32), (32, 32)), (3, (12, 40, 36), (8, 16, 16), (8, 16, 16))])
def test_bf16_chunked_equals_whole_and_error_is_bounded(tmp_path, ndim, shape, chunks, block):
    data = _image(shape, seed=ndim)
    src = write_zarr_array(tmp_path / "in.zarr", data, chunks)
    model = random_model(tmp_path / "m.qs", ndim, depth=2 if ndim == 2 else 1, filters=8 if ndim == 2 else 4,
                         mean=float(data.mean()), std=float(data.std()))
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, block=block, precision="bf16", progress=False))
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    whole_bf16 = _whole_at(model, data, "bf16")
    whole_fp32 = _whole_at(model, data, "fp32")
    assert res.n_blocks > 1
    std = float(data.std())
    assert np.abs(got - whole_bf16).max() / std <= TOL  # chunked == whole at bf16
    err = np.abs(got - whole_fp32).max() / std
    assert err > 10 * TOL  # bf16 really ran (it is not fp32 under another name)
    value = psnr(got, whole_fp32, data_range=float(whole_fp32.max() - whole_fp32.min()))
    assert value >= BF16_MIN_PSNR_DB, value


def test_precision_changes_the_resume_token(tmp_path):
    """An fp32 output is not resumed at bf16 (the values differ)."""
    from quietscope.errors import OutputError

    data = _image((32, 64))
    src = write_zarr_array(tmp_path / "in.zarr", data, (32, 32))
    model = random_model(tmp_path / "m.qs", 2, depth=1, filters=4)
    out = tmp_path / "out.ome.zarr"
    predict(model, src, out, PredictOptions(chunks=(32, 32), progress=False))
    with pytest.raises(OutputError):
        predict(model, src, out, PredictOptions(chunks=(32, 32), precision="bf16", resume=True, progress=False))


def test_noise_model_likelihoods_stay_fp32(tmp_path, monkeypatch):
    """PN2V at bf16: the network is lowered, the GMM likelihood and the MMSE stay float32."""
    nm = GMMNoiseModel([[0.0], [math.log(25 / 500**2)], [0.0]], -100.0, 400.0, min_sigma=1e-3)
    model = random_model(tmp_path / "m.qs", 2, method="pn2v", depth=1, filters=4, noise_model=nm.to_dict(), n_samples=4)
    method, manifest = load_model(model)
    seen = []
    real = type(method.noise_model).log_likelihood

    def spy(self, x, s):
        out = real(self, x, s)
        seen.append((torch.as_tensor(s).dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(type(method.noise_model), "log_likelihood", spy)
    loaded = LoadedModel(method, manifest, CPU, method_halo(method), precision="bf16")
    fn = device_tile_function(loaded)
    tile = _image((1, 32, 32))
    seen.clear()  # the halo probe and range checks above ran in float64 on purpose
    out = fn(tile)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert seen and all(s == torch.float32 and o == torch.float32 and not ac for s, o, ac in seen)


def _train(tmp_path, amp, steps=4):
    data = _image((64, 64))
    image = open_image(write_zarr_array(tmp_path / f"t{amp}.zarr", data, (32, 32)))
    torch.manual_seed(0)
    method = build_method({"method": "n2v", "spatial_ndim": 2, "net": {"depth": 1, "filters": 4}})
    cfg = TrainConfig(patch=(16, 16), batch=4, steps=steps, val_every=2, checkpoint_every=2, pool_size=8, device="cpu", amp=amp)
    return train(image, method, cfg, checkpoint=tmp_path / f"ck{amp}", progress=False)


def test_train_amp_on_cpu(tmp_path):
    plain, mixed = _train(tmp_path, False), _train(tmp_path, True)
    losses_p = [h["loss"] for h in plain.history]
    losses_m = [h["loss"] for h in mixed.history]
    assert all(np.isfinite(losses_m)) and len(losses_m) == len(losses_p)
    assert losses_m != losses_p  # autocast was on
    assert max(abs(a - b) / a for a, b in zip(losses_p, losses_m)) < 0.1  # ... and close to fp32
    assert all(p.dtype == torch.float32 for p in mixed.method.parameters())
    assert not mixed.method.net._forward_hooks  # the network is plain fp32 again afterwards


def test_module_precision_restores_fp32():
    net = torch.nn.Conv2d(1, 1, 3)
    x = torch.randn(1, 1, 16, 16)
    ref = net(x)
    with module_precision(net, "bf16", "cpu"):
        low = net(x)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert torch.equal(net(x), ref)


def test_filter_refuses_a_lower_precision(tmp_path):
    from quietscope.workflows.filter import filter_image

    src = write_zarr_array(tmp_path / "in.zarr", _image((32, 32)), (32, 32))
    with pytest.raises(ConfigError, match="filters compute in float32"):
        filter_image(src, tmp_path / "out.ome.zarr", "box", size=3, options=PredictOptions(precision="bf16", progress=False))
    assert not (tmp_path / "out.ome.zarr").exists()
