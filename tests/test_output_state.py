"""What a viewer and a user see of an output: its run state, display windows, translations,
a clean zarr listing while it runs, and the physical scale of TIFF inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from box_job import run_box_job
from helpers import read_levels, write_zarr_array
from quietscope.chunked import PredictOptions, display_windows
from quietscope.errors import ConfigError
from quietscope.io import open_image
from quietscope.io.writing import STATE_ATTR
from quietscope.runner.ledger import Ledger
from quietscope.workflows.info import describe


def _data(shape, seed=0):
    return (100 + 20 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """An output whose job was SIGKILLed after a few blocks (16 blocks in all)."""
    d = tmp_path_factory.mktemp("killed")
    src = write_zarr_array(d / "in.zarr", _data((64, 64), seed=1), (16, 16))
    out = d / "out.ome.zarr"
    job = {"input_uri": src, "output": str(out), "options": {"chunks": (16, 16), "block": (16, 16), "progress": False,
                                                               "threads": 1}, "processor": {"sleep": 0.3}}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("box_job.py")), json.dumps(job)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen_running = None
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if seen_running is None and (out / "zarr.json").exists():
                attrs = json.loads((out / "zarr.json").read_text())["attributes"]
                seen_running = attrs.get(STATE_ATTR)
            if len(Ledger(out).done()) >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished (or failed) before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return src, out, seen_running


def test_running_state_is_visible_from_the_start(killed):
    _, out, seen = killed
    assert seen is not None and seen["status"] == "running" and seen["blocks_total"] == 16
    state = zarr.open_group(str(out), mode="r").attrs[STATE_ATTR]
    assert state["status"] == "running" and 0 <= state["blocks_done"] <= len(Ledger(out).done())


def test_info_on_a_killed_output_says_incomplete_with_the_right_count(killed):
    _, out, _ = killed
    n = len(Ledger(out).done())
    line = describe(out)["status"]
    assert line.startswith(f"incomplete: {n} of 16 blocks (interrupted)"), line
    assert "--resume" in line


def test_zarr_lists_a_running_output_without_warnings(killed):
    _, out, _ = killed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(out), mode="r")
        assert sorted(group.array_keys()) == ["0", "1", "2"]
        assert len(list(group.members())) == 4  # the levels and the ledger group


def test_finished_output_is_complete_everywhere(killed, tmp_path):
    src, out, _ = killed
    run_box_job(src, str(out), {"chunks": (16, 16), "block": (16, 16), "progress": False, "resume": True})
    assert describe(out)["status"] == "complete"
    state = zarr.open_group(str(out), mode="r").attrs[STATE_ATTR]
    assert state["status"] == "complete" and state["blocks_done"] == state["blocks_total"] == 16


def test_an_error_leaves_an_interrupted_state(tmp_path):
    data = _data((32, 32))
    data[20, 20] = np.nan  # a block task fails on it (run_box_job skips the preflight sample)
    src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
    out = tmp_path / "out.ome.zarr"
    with pytest.raises(Exception, match="NaN|finite"):
        run_box_job(src, str(out), {"chunks": (16, 16), "block": (16, 16), "progress": False})
    assert zarr.open_group(str(out), mode="r").attrs[STATE_ATTR]["status"] == "interrupted"
    line = describe(out)["status"]
    assert line.startswith("incomplete: ") and " of 4 blocks (interrupted)" in line


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_display_windows_fit_the_output_and_both_viewers_find_them(tmp_path, ngff):
    data = np.stack([_data((48, 40), seed=2), 5 * _data((48, 40), seed=3)])
    g = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    g.create_array("raw", shape=data.shape, chunks=(2, 16, 16), dtype="f4", dimension_names=list("cyx"))[...] = data
    from quietscope.chunked import run_prediction
    from quietscope.runner.testing import BoxProcessor

    out = tmp_path / "out.ome.zarr"
    run_prediction(open_image(str(tmp_path / "in.zarr" / "raw")), str(out), BoxProcessor(), ["nuclei", "membrane"],
                   (1, 1), 1, PredictOptions(chunks=(16, 16), ngff=ngff, progress=False), {}, [(341.0, 6184.0)] * 2)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    top = attrs["omero"]  # neuroglancer reads the top-level omero, for 0.4 and 0.5
    napari = attrs["ome"]["omero"] if ngff == "0.5" else attrs["omero"]  # ome-zarr-py / napari-ome-zarr
    assert top == napari
    level0 = read_levels(out)[0]
    for c, ch in enumerate(top["channels"]):
        values = level0[c].ravel()
        lo, hi = np.percentile(values, 0.1), np.percentile(values, 99.9)
        w = ch["window"]
        assert lo <= w["start"] < w["end"] <= hi  # not the model's training range (341..6184)
        assert w["min"] <= values.min() and w["max"] >= values.max()  # the slider covers the data
    assert [ch["label"] for ch in top["channels"]] == ["nuclei", "membrane"]


def test_display_windows_of_integers_span_the_type():
    w = display_windows(np.arange(1000, dtype=np.float64)[None], "uint16")[0]
    assert w[:2] == (pytest.approx(0.999), pytest.approx(998.001)) and w[2:] == (0.0, 65535.0)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_coarse_levels_carry_half_pixel_translations_and_read_back(tmp_path, ngff):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    src = write_zarr_array(tmp_path / "in.zarr", _data((64, 80)), (16, 16))
    out = tmp_path / "out.ome.zarr"
    run_box_job(src, str(out), {"chunks": (16, 16), "ngff": ngff, "scale": (0.2, 0.2), "unit": "um", "progress": False})
    n_levels = open_image(out).n_levels
    assert n_levels == 4
    for k in range(n_levels):
        img = open_image(out, level=k)
        assert img.scale == pytest.approx((0.2 * 2**k,) * 2) and img.units == ("micrometer", "micrometer")
        assert img.translation == pytest.approx(((2**k - 1) / 2 * 0.2,) * 2)
    group = zarr.open_group(str(out), mode="r")
    if ngff == "0.5":
        from ome_zarr_models.v05.image import Image as NgffImage
    else:
        from ome_zarr_models.v04.image import Image as NgffImage
    NgffImage.from_zarr(group)  # translations after scales, as the spec requires
    assert len(list(Reader(parse_url(str(out)))())[0].data) == n_levels


def test_tiff_default_resolution_is_unknown_and_scale_option_sets_it(tmp_path):
    data = (100 + np.arange(40 * 30).reshape(40, 30) % 50).astype(np.uint16)
    path = tmp_path / "default.tif"
    tifffile.imwrite(path, data, resolution=(1, 1), resolutionunit="CENTIMETER")  # a writer's default
    img = open_image(path)
    assert img.scale == (1.0, 1.0) and img.units == (None, None)
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, data, imagej=True, resolution=(5.0, 5.0))  # ImageJ without a unit
    assert open_image(ij).units == (None, None)
    real = tmp_path / "cm.tif"
    tifffile.imwrite(real, data, resolution=(50000, 50000), resolutionunit="CENTIMETER")  # 0.2 um
    assert open_image(real).scale == pytest.approx((0.2, 0.2))
    out = tmp_path / "out.ome.zarr"
    run_box_job(str(path), str(out), {"chunks": (16, 16), "scale": (0.5, 0.25), "unit": "nm", "progress": False})
    back = open_image(out)
    assert back.scale == (0.5, 0.25) and back.units == ("nanometer", "nanometer")
    with pytest.raises(ConfigError, match="--scale has 1 values"):
        run_box_job(str(path), str(tmp_path / "x.ome.zarr"), {"scale": (0.5,), "progress": False})
    with pytest.raises(Exception, match="NGFF space unit"):
        PredictOptions(scale=(1.0, 1.0), unit="parsecs")
