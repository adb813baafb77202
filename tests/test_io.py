"""Reading every input kind lazily, and writing outputs that validate against the NGFF spec."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from helpers import random_model, write_ome, write_zarr_array
from quietscope.chunked import PredictOptions
from quietscope.errors import InputError
from quietscope.io import OutputSpec, create_ome_zarr, open_image
from quietscope.io.writing import build_pyramid, open_level
from quietscope.workflows.predict import predict


def test_plain_zarr_array_with_and_without_dimension_names(tmp_path):
    data = np.arange(6 * 7 * 8, dtype=np.uint16).reshape(6, 7, 8)
    p = write_zarr_array(tmp_path / "a.zarr", data, (3, 7, 4), dims=["z", "y", "x"])
    img = open_image(p)
    assert img.axes == "zyx" and img.shape == (6, 7, 8) and img.chunks == (3, 7, 4)
    np.testing.assert_array_equal(img.read((slice(1, 3), slice(None), slice(2, 5))), data[1:3, :, 2:5])
    q = write_zarr_array(tmp_path / "b.zarr", data, (3, 7, 4))
    assert open_image(q).axes == "zyx"  # default for 3D, logged
    assert open_image(q, axes="cyx").axes == "cyx"


def test_zarr_array_inside_a_group(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    arr = g.create_array("raw/volume", shape=(4, 5), chunks=(2, 5), dtype="f4")
    arr[...] = 1.5
    img = open_image(str(tmp_path / "g.zarr" / "raw" / "volume"))
    assert img.shape == (4, 5) and float(img.read((slice(None), slice(None))).mean()) == 1.5


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_ome_zarr_levels_axes_and_scale(tmp_path, ngff):
    spec = OutputSpec(path=str(tmp_path / "x.ome.zarr"), axes="czyx", shape=(2, 5, 64, 48), chunks=(1, 5, 16, 16),
                      scale=(1.0, 2.0, 0.5, 0.5), units=(None, "micrometer", "micrometer", "micrometer"), ngff=ngff)
    create_ome_zarr(spec)
    data = np.random.default_rng(0).random((2, 5, 64, 48)).astype("f4")
    open_level(spec.path, 0)[...] = data
    build_pyramid(spec)
    img = open_image(spec.path)
    assert img.axes == "czyx" and img.n_levels == spec.n_levels == 3
    assert img.scale == (1.0, 2.0, 0.5, 0.5) and img.units[1] == "micrometer"
    lvl1 = open_image(spec.path, level=1)
    assert lvl1.shape == (2, 5, 32, 24) and lvl1.scale == (1.0, 2.0, 1.0, 1.0)
    np.testing.assert_allclose(lvl1.read((slice(None),) * 4), data.reshape(2, 5, 32, 2, 24, 2).mean(axis=(3, 5)), rtol=1e-6)
    with pytest.raises(InputError, match="--level 7 does not exist"):
        open_image(spec.path, level=7)


def test_tiff_imagej_hyperstack_is_read_lazily_with_axes(tmp_path):
    data = np.random.default_rng(0).integers(0, 4000, (3, 2, 20, 30), dtype=np.uint16)  # z c y x
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX", "spacing": 2.5, "unit": "um"}, resolution=(1 / 0.2, 1 / 0.2))
    img = open_image(path)
    assert img.source_axes == "zcyx" and img.axes == "czyx"
    assert img.shape == (2, 3, 20, 30)
    assert img.scale[2] == pytest.approx(0.2) and img.scale[1] == pytest.approx(2.5)
    np.testing.assert_array_equal(img.read((slice(1, 2), slice(None), slice(0, 5), slice(None))), data[:, 1:2, 0:5].transpose(1, 0, 2, 3))
    sp = (slice(None), slice(2, 9), slice(4, 30))
    np.testing.assert_array_equal(img.read_tc(0, sp, 1), img.read_tc(0, sp)[1:2])
    with pytest.raises(InputError, match="out of range"):
        img.read_tc(0, sp, 2)


def test_axes_contradicting_the_metadata_are_refused_and_kept_where_it_names_none(tmp_path):
    vol = np.zeros((5, 8, 8), np.uint16)
    ome = write_ome(tmp_path / "v.ome.zarr", vol, "zyx", (5, 8, 8))
    named = write_zarr_array(tmp_path / "n.zarr", vol, (5, 8, 8), dims=["t", "y", "x"])
    tifffile.imwrite(ij := tmp_path / "ij.tif", vol, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(om := tmp_path / "om.tif", vol, ome=True, metadata={"axes": "ZYX"})
    for path, meta, source in ((ome, "zyx", "OME-Zarr"), (named, "tyx", "zarr dimension names"),
                               (ij, "tyx", "ImageJ"), (om, "zyx", "OME-XML")):
        wrong = "cyx" if meta != "cyx" else "zyx"
        with pytest.raises(InputError, match=f"--axes {wrong} contradicts the axes {meta} in the {source}") as err:
            open_image(path, axes=wrong)
        assert f"drop --axes (or pass --axes {meta})" in str(err.value) and "\n" not in str(err.value)
        assert open_image(path, axes=meta.upper()).source_axes == meta  # the matching one is accepted
        assert open_image(path).source_axes == meta
    # Where the metadata names no axes (plain zarr, a TIFF without ImageJ/OME axes), --axes rules.
    plain = write_zarr_array(tmp_path / "p.zarr", vol, (5, 8, 8))
    tifffile.imwrite(bare := tmp_path / "bare.tif", vol)  # tifffile guesses QYX
    tifffile.imwrite(dims := tmp_path / "dims.tif", vol, imagej=True, metadata={"axes": "ZYX"})
    for path in (plain, bare):
        assert open_image(path, axes="tyx").source_axes == "tyx"
    assert open_image(dims).source_axes == "zyx"
    odd = write_zarr_array(tmp_path / "o.zarr", vol, (5, 8, 8), dims=["dim_0", "dim_1", "dim_2"])
    assert open_image(odd, axes="zyx").source_axes == "zyx"  # names that are no axes: not a contradiction


def test_rgb_tiff_samples_become_channels(tmp_path):
    data = np.zeros((10, 12, 3), np.uint8)
    data[..., 1] = 7
    tifffile.imwrite(tmp_path / "rgb.tif", data)
    img = open_image(tmp_path / "rgb.tif")
    assert img.axes == "cyx" and img.n_channels == 3
    assert img.read_tc(0, (slice(None), slice(None)))[1].max() == 7


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_prediction_output_validates_and_keeps_axes_and_scale(tmp_path, ngff):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = (100 + 20 * np.random.default_rng(0).standard_normal((6, 70, 90))).astype(np.float32)
    src = write_ome(tmp_path / "in.ome.zarr", data, "zyx", (3, 32, 32), scale=(2.0, 0.25, 0.25))
    model = random_model(tmp_path / "m.qs", 3, depth=1, filters=4)
    out = tmp_path / "out.ome.zarr"
    predict(model, src, out, PredictOptions(chunks=(3, 16, 16), ngff=ngff, progress=False))
    group = zarr.open_group(str(out), mode="r")
    if ngff == "0.5":
        from ome_zarr_models.v05.image import Image as NgffImage
    else:
        from ome_zarr_models.v04.image import Image as NgffImage
    NgffImage.from_zarr(group)  # raises on any spec violation
    img = open_image(out)
    assert img.axes == "zyx" and img.scale == (2.0, 0.25, 0.25)
    assert [open_image(out, level=k).shape for k in range(img.n_levels)] == [(6, 70, 90), (6, 35, 45), (6, 18, 23), (6, 9, 12)]
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes and nodes[0].data[0].shape == (6, 70, 90)
    assert len(nodes[0].data) == img.n_levels
