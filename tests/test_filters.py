"""Classic filters: chunked filtering through the prediction path equals whole-image scipy."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

from quietscope.chunked import PredictOptions
from quietscope.errors import ConfigError
from quietscope.io.writing import open_level
from quietscope.methods.filters import FilterProcessor, filter_array, filter_processor, filter_radius
from quietscope.workflows.demo import write_ome_zarr_image
from quietscope.workflows.filter import filter_image


def _whole(a: np.ndarray, kind: str, value: float) -> np.ndarray:
    """The reference: scipy on the full array, mode='mirror' (= numpy 'reflect' padding)."""
    a = a.astype(np.float64)
    in_plane = (1,) * (a.ndim - 2) + (int(value),) * 2
    if kind == "box":
        return ndi.uniform_filter(a, size=in_plane, mode="mirror")
    if kind == "box3d":
        return ndi.uniform_filter(a, size=int(value), mode="mirror")
    if kind == "median":
        return ndi.median_filter(a.astype(np.float32), size=in_plane, mode="mirror")
    sig = (0.0,) * (a.ndim - 2) + (value,) * 2
    return ndi.gaussian_filter(a, sig, mode="mirror", truncate=4.0)


CASES = [
    # (shape, chunks/block, kind, size or sigma)
    ((37, 53), (16, 16), "box", 5),
    ((37, 53), (8, 24), "median", 3),
    ((37, 53), (16, 32), "gaussian", 1.5),
    ((9, 30, 41), (4, 16, 16), "box3d", 3),
    ((9, 30, 41), (3, 8, 32), "box", 7),
    ((9, 30, 41), (9, 16, 8), "gaussian", 0.8),
    ((9, 30, 41), (2, 16, 16), "median", 5),
]


@pytest.mark.parametrize(("shape", "block", "kind", "value"), CASES)
def test_chunked_filter_equals_whole_image_scipy(tmp_path, shape, block, kind, value):
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, 20.0, shape).astype(np.float32)
    axes = "yx" if len(shape) == 2 else "zyx"
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr_image(src, a, axes, block)
    key = "sigma" if kind == "gaussian" else "size"
    res = filter_image(src, tmp_path / "out.ome.zarr", kind, **{key: value},
                       options=PredictOptions(chunks=block, block=block, progress=False, threads=1, n_levels=1))
    assert res.n_blocks > 1  # really chunked
    out = np.asarray(open_level(tmp_path / "out.ome.zarr", 0, "r")[...])
    assert np.abs(out - _whole(a, kind, value)).max() <= 1e-5
    # and the in-memory helper agrees with both
    np.testing.assert_allclose(filter_array(a, kind, **{key: value}), out, rtol=0, atol=1e-4)


def test_halo_is_filter_radius_and_matches_scipy_kernel():
    assert filter_processor("box", 3, size=7).halo == (0, 3, 3)
    assert filter_processor("box3d", 3, size=5).halo == (2, 2, 2)
    assert filter_processor("median", 2, size=3).halo == (1, 1)
    for sigma in (0.3, 0.8, 1.5, 2.2):
        h = filter_radius("gaussian", (1, 1), (sigma, sigma), truncate=4.0)[0]
        # scipy's kernel radius is int(truncate * sigma + 0.5): the halo must cover it.
        assert h >= int(4.0 * sigma + 0.5)
        assert h == int(np.ceil(4.0 * sigma))


def test_gaussian_truncate_sets_halo_and_result():
    p = filter_processor("gaussian", 2, sigma=2.0, truncate=2.0)
    assert p.halo == (4, 4)
    a = np.random.default_rng(0).normal(size=(30, 30)).astype(np.float32)
    np.testing.assert_allclose(p.build()(a[None])[0], ndi.gaussian_filter(a.astype(np.float64), 2.0, mode="mirror", truncate=2.0), atol=1e-5)


def test_processor_is_picklable_and_token_depends_on_parameters():
    import pickle

    p = filter_processor("box", 2, size=3)
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q, FilterProcessor) and q.token == p.token
    assert p.token != filter_processor("box", 2, size=5).token
    assert p.token != filter_processor("median", 2, size=3).token


def test_multichannel_filtered_per_channel(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 24, 40)).astype(np.float32)
    a[1] *= 100
    write_ome_zarr_image(tmp_path / "c.ome.zarr", a, "cyx", (2, 16, 16))
    filter_image(tmp_path / "c.ome.zarr", tmp_path / "o.ome.zarr", "box", size=3,
                 options=PredictOptions(chunks=(16, 16), block=(16, 16), progress=False, threads=1, n_levels=1))
    out = np.asarray(open_level(tmp_path / "o.ome.zarr", 0, "r")[...])
    for c in range(2):
        np.testing.assert_allclose(out[c], ndi.uniform_filter(a[c].astype(np.float64), 3, mode="mirror"), atol=1e-4)


@pytest.mark.parametrize(("kind", "kw"), [("box", {"size": 4}), ("box", {}), ("gaussian", {"size": 3}),
                                          ("gaussian", {"sigma": 0}), ("sharpen", {"size": 3})])
def test_bad_parameters_are_config_errors(kind, kw):
    with pytest.raises(ConfigError):
        filter_processor(kind, 2, **kw)


def test_cli_filter_end_to_end(tmp_path):
    from quietscope_cli.main import cli

    a = np.random.default_rng(3).normal(10, 2, size=(40, 40)).astype(np.float32)
    write_ome_zarr_image(tmp_path / "in.ome.zarr", a, "yx", (16, 16))
    out = tmp_path / "out.ome.zarr"
    args = ["filter", str(tmp_path / "in.ome.zarr"), "-o", str(out), "--kind", "gaussian", "--sigma", "1",
            "--chunks", "16,16", "--block", "16,16", "--no-progress", "--threads", "1", "--levels", "1"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "halo [4, 4]" in r.output
    got = np.asarray(open_level(out, 0, "r")[...])
    np.testing.assert_allclose(got, ndi.gaussian_filter(a.astype(np.float64), 1.0, mode="mirror"), atol=1e-5)
    # existing output without --overwrite: one error line, exit 2
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "error:" in r.output
    r = CliRunner().invoke(cli, ["filter", str(tmp_path / "in.ome.zarr"), "-o", str(tmp_path / "x.ome.zarr"),
                                 "--kind", "box", "--size", "4"])
    assert r.exit_code == 2 and "odd" in r.output
