"""The heart of the tool: stitched block predictions equal whole-image prediction."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from helpers import random_model, write_ome, write_zarr_array
from quietscope.chunked import PredictOptions
from quietscope.inference import dihedral_mean, method_halo, predict_tile, predict_whole, tta_halo
from quietscope.methods.modelfile import load_model
from quietscope.workflows.predict import predict

TOL = 1e-4  # in normalised units (std 20 below)


def _whole(model_path, data):
    method, _ = load_model(model_path)
    halo = method_halo(method)
    arr = data[None] if data.ndim == len(halo) else data
    return predict_whole(lambda t: predict_tile(method, t), arr, halo, method.downsampling_factor), halo


@pytest.mark.parametrize(
    "shape,chunks,block,method",
    [
        ((75, 93), (16, 32), (32, 32), "n2v"),
        ((75, 93), (25, 31), (25, 62), "n2v"),  # chunks not a multiple of the pooling factor
        ((64, 64), (64, 64), None, "n2v"),  # one block
        ((61, 47), (20, 16), (20, 16), "n2v2"),
    ],
)
def test_chunked_equals_whole_2d(tmp_path, shape, chunks, block, method):
    rng = np.random.default_rng(1)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (32, 32))
    model = random_model(tmp_path / "m.qs", 2, method=method)
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, block=block, progress=False))
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    ref, halo = _whole(model, data)
    assert got.shape == shape
    assert res.halo == halo and all(h > 0 for h in halo)
    assert res.n_blocks > 1 or block is None
    assert np.abs(got - ref[0]).max() / 20 <= TOL


@pytest.mark.parametrize(
    "method, estimate, shape, chunks, block",
    [
        ("bayes-poisson", "mmse", (75, 93), (16, 32), (32, 32)),
        ("bayes-poisson", "prior", (75, 93), (25, 31), (25, 62)),
        ("bayes-gauss", "mmse", (13, 37, 29), (8, 16, 16), (8, 16, 16)),
    ],
)
def test_chunked_equals_whole_bayesian_blind_spot(tmp_path, method, estimate, shape, chunks, block):
    """The four/six-branch blind-spot net reaches further than a U-Net of the same depth; the
    measured halo must still cover it, for the posterior and for the prior estimate."""
    rng = np.random.default_rng(5)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, chunks)
    model = random_model(tmp_path / "m.qs", len(shape), method=method, depth=1, filters=4)
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, block=block, progress=False),
                  inference={"estimate": estimate})
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    method_, _ = load_model(model)
    method_.set_inference(estimate=estimate)
    ref = predict_whole(lambda t: predict_tile(method_, t), data[None], method_halo(method_),
                        method_.downsampling_factor)[0]
    assert res.n_blocks > 1 and res.halo == method_halo(method_)
    assert np.abs(got - ref).max() / 20 <= TOL
    method_.set_inference(estimate="prior" if estimate == "mmse" else "mmse")
    other = predict_whole(lambda t: predict_tile(method_, t), data[None], method_halo(method_),
                          method_.downsampling_factor)[0]
    assert np.abs(got - other).max() / 20 > 100 * TOL  # the option reached the workers


@pytest.mark.parametrize("ndim, shape, chunks, block", [(2, (75, 93), (16, 32), (32, 32)), (3, (9, 37, 29), (8, 16, 16), (8, 16, 16))])
def test_tta_chunked_equals_whole_tta(tmp_path, ndim, shape, chunks, block):
    """--tta: non-square blocks, rotated and flipped, stitch to the rotated/flipped whole image."""
    rng = np.random.default_rng(7)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, chunks)
    model = random_model(tmp_path / "m.qs", ndim, depth=1, filters=4)
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, block=block, progress=False), tta=True)
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    method, _ = load_model(model)
    halo = tta_halo(method_halo(method))
    ref = predict_whole(lambda t: dihedral_mean(lambda x: predict_tile(method, x), t), data[None], halo,
                        method.downsampling_factor)[0]
    plain, _ = _whole(model, data)
    assert res.n_blocks > 1 and res.halo == halo
    assert np.abs(got - ref).max() / 20 <= TOL
    assert np.abs(got - plain[0]).max() / 20 > 100 * TOL  # it really averaged something else


def test_tta_is_refused_for_sampled_outputs(tmp_path):
    from quietscope.errors import ConfigError

    rng = np.random.default_rng(8)
    src = write_zarr_array(tmp_path / "in.zarr", (100 + 20 * rng.standard_normal((32, 32))).astype(np.float32), (32, 32))
    model = random_model(tmp_path / "m.qs", 2, method="musplit", in_channels=2, depth=2, filters=4)
    with pytest.raises(ConfigError, match="--tta does not apply to 'musplit'"):
        predict(model, src, tmp_path / "out.ome.zarr", PredictOptions(progress=False), tta=True)
    assert not (tmp_path / "out.ome.zarr").exists()


@pytest.mark.parametrize("shape,chunks,block", [((13, 37, 29), (8, 16, 16), (8, 16, 16)), ((9, 20, 24), (5, 10, 12), (5, 20, 12))])
def test_chunked_equals_whole_3d(tmp_path, shape, chunks, block):
    rng = np.random.default_rng(2)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_ome(tmp_path / "in.ome.zarr", data, "zyx", (8, 16, 16))
    model = random_model(tmp_path / "m.qs", 3, depth=1, filters=4)
    out = tmp_path / "out.ome.zarr"
    res = predict(model, src, out, PredictOptions(chunks=chunks, block=block, progress=False))
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    ref, _ = _whole(model, data)
    assert got.shape == shape and res.n_blocks > 1
    assert np.abs(got - ref[0]).max() / 20 <= TOL


def test_chunked_equals_whole_with_time_and_channels(tmp_path):
    rng = np.random.default_rng(3)
    data = (100 + 20 * rng.standard_normal((2, 2, 40, 36))).astype(np.float32)  # t c y x
    src = write_ome(tmp_path / "in.ome.zarr", data, "tcyx", (1, 2, 16, 16))
    model = random_model(tmp_path / "m.qs", 2, in_channels=2, depth=1)
    out = tmp_path / "out.ome.zarr"
    predict(model, src, out, PredictOptions(chunks=(16, 16), block=(16, 16), progress=False))
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    assert got.shape == data.shape
    for t in range(2):
        ref, _ = _whole(model, data[t])
        assert np.abs(got[t] - ref).max() / 20 <= TOL


def test_integer_output_dtype_is_rounded_and_clipped(tmp_path):
    rng = np.random.default_rng(4)
    data = (100 + 20 * rng.standard_normal((40, 40))).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (20, 20))
    model = random_model(tmp_path / "m.qs", 2, depth=1)
    out = tmp_path / "out.ome.zarr"
    predict(model, src, out, PredictOptions(chunks=(20, 20), dtype="uint8", progress=False))
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    ref, _ = _whole(model, data)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.clip(np.rint(ref[0]), 0, 255).astype(np.uint8))


def test_resume_finishes_missing_blocks_identically(tmp_path):
    rng = np.random.default_rng(5)
    data = (100 + 20 * rng.standard_normal((64, 80))).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
    model = random_model(tmp_path / "m.qs", 2, depth=1)
    out = tmp_path / "out.ome.zarr"
    opts = PredictOptions(chunks=(16, 16), block=(16, 16), progress=False)
    predict(model, src, out, opts)
    full = {k: zarr.open_array(store=str(out / k), mode="r")[...] for k in ("0", "1")}
    # Simulate a crash: the state of an unfinished job (ledger folder with the job record and a
    # marker per finished block) in which some blocks were never written (no marker, no pixels).
    from quietscope.runner.executor import iter_tasks
    from quietscope.runner.ledger import JOB_ATTR, Ledger

    group = zarr.open_group(str(out), mode="r+")
    record = dict(group.attrs[JOB_ATTR], complete=False)
    del group.attrs[JOB_ATTR]
    ledger = Ledger(out)
    ledger.create(record)
    done = [t.key for t in iter_tasks((64, 80), (16, 16), 1)]
    lost = done[::3]
    z0 = zarr.open_array(store=str(out / "0"), mode="r+")
    for key in done:
        if key in lost:
            t, i, j = key[1:].split("_")
            z0[int(i) * 16 : int(i) * 16 + 16, int(j) * 16 : int(j) * 16 + 16] = 0
        else:
            ledger.mark_done(key)
    res = predict(model, src, out, opts.model_copy(update={"resume": True}))
    assert res.n_done_before == len(done) - len(lost)
    for k, ref in full.items():
        np.testing.assert_array_equal(zarr.open_array(store=str(out / k), mode="r")[...], ref)


def test_resume_of_a_finished_job_predicts_nothing(tmp_path):
    data = np.full((32, 32), 100, np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
    model = random_model(tmp_path / "m.qs", 2, depth=1)
    out = tmp_path / "out.ome.zarr"
    opts = PredictOptions(chunks=(16, 16), block=(16, 16), progress=False)
    predict(model, src, out, opts)
    res = predict(model, src, out, opts.model_copy(update={"resume": True}))
    assert res.n_done_before == res.n_blocks == 4 and res.voxels_per_s == 0.0


def test_halo_is_measured_not_declared(tmp_path):
    shallow = random_model(tmp_path / "a.qs", 2, depth=1)
    deep = random_model(tmp_path / "b.qs", 2, depth=3)
    h1 = method_halo(load_model(shallow)[0])
    h3 = method_halo(load_model(deep)[0])
    assert h1[0] % 2 == 0 and h3[0] % 8 == 0
    assert h3[0] > 2 * h1[0]


@pytest.mark.parametrize("method", ["n2v", "n2v2", "pn2v"])
def test_chunked_equals_whole_3d_without_z_pooling(tmp_path, method):
    """Anisotropic stacks: a U-Net that keeps full z resolution has a per-axis pooling factor
    (1, 4, 4); blocks need no z alignment, the z halo is the conv stack's alone, and stitched
    blocks still equal whole-image prediction (z chunks of 3 planes, odd sizes)."""
    import math

    from quietscope.noise_models import GMMNoiseModel

    rng = np.random.default_rng(3)
    shape = (11, 37, 29)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_ome(tmp_path / "in.ome.zarr", data, "zyx", (3, 16, 16))
    extra = {}
    if method == "pn2v":
        # One Gaussian component, sigma 5: enough for the MMSE path to run.
        nm = GMMNoiseModel([[0.0], [math.log(25 / 500**2)], [0.0]], -100.0, 400.0, min_sigma=1e-3)
        extra = {"noise_model": nm.to_dict(), "n_samples": 4}
    model = random_model(tmp_path / "m.qs", 3, method=method, depth=2, filters=4, z_pool=False, **extra)
    iso = random_model(tmp_path / "iso.qs", 3, method=method, depth=2, filters=4, **extra)
    out = tmp_path / "out.ome.zarr"
    # 3-plane blocks (off any pooling grid in z), 2 x 1 in y-x: 8 blocks.
    res = predict(model, src, out, PredictOptions(chunks=(3, 16, 16), block=(3, 32, 32), progress=False))
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    ref, halo = _whole(model, data)
    method_obj, _ = load_model(model)
    assert method_obj.downsampling_factor == (1, 4, 4)
    assert res.halo == halo and res.n_blocks > 1
    # Ten 3-voxel convolutions at full z resolution: z halo 10 (isotropic pooling: 24, N2V2 28).
    assert halo[0] == 10 and halo[1] == halo[2] > halo[0]
    assert method_halo(load_model(iso)[0])[0] >= 24
    assert np.abs(got - ref[0]).max() / 20 <= TOL


def test_tta_chunked_equals_whole_without_z_pooling(tmp_path):
    rng = np.random.default_rng(4)
    shape = (7, 37, 29)
    data = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    src = write_ome(tmp_path / "in.ome.zarr", data, "zyx", (3, 16, 16))
    model = random_model(tmp_path / "m.qs", 3, depth=1, filters=4, z_pool=False)
    out = tmp_path / "out.ome.zarr"
    predict(model, src, out, PredictOptions(chunks=(3, 16, 16), block=(3, 16, 32), progress=False), tta=True)
    got = zarr.open_array(store=str(out / "0"), mode="r")[...]
    method, _ = load_model(model)
    ref = predict_whole(lambda t: dihedral_mean(lambda x: predict_tile(method, x), t), data[None],
                        tta_halo(method_halo(method)), method.downsampling_factor)[0]
    assert np.abs(got - ref).max() / 20 <= TOL
