"""Every bad input gets one clear line naming the problem and the fix, a non-zero exit, and the
input is left untouched."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import random_model, tree_bytes, write_ome, write_zarr_array
from quietscope_cli.main import cli


def run(*args: str):
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture()
def image(tmp_path):
    data = (100 + 20 * np.random.default_rng(0).standard_normal((40, 48))).astype(np.float32)
    return write_zarr_array(tmp_path / "in.zarr", data, (20, 24))


@pytest.fixture()
def model2d(tmp_path):
    return random_model(tmp_path / "m2.qs", 2, depth=1)


def assert_one_clear_line(code: int, output: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("quietscope: error:"), output
    assert "Traceback" not in output
    for n in needles:
        assert n in lines[0], (n, output)


def test_missing_input(tmp_path, model2d):
    code, out = run("predict", model2d, str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "o.ome.zarr"))
    assert_one_clear_line(code, out, "does not exist", "check the path")


def test_unknown_axes(image):
    code, out = run("info", image, "--axes", "qyx")
    assert_one_clear_line(code, out, "axes 'qyx'", "t, c, z, y, x")
    code, out = run("info", image, "--axes", "zyx")
    assert_one_clear_line(code, out, "3 axes", "2 dimensions")


@pytest.fixture()
def zyx_ome(tmp_path):
    data = (100 + 20 * np.random.default_rng(1).standard_normal((6, 24, 24))).astype(np.float32)
    return write_ome(tmp_path / "v.ome.zarr", data, "zyx", (6, 24, 24))


@pytest.mark.parametrize("command", ["info", "train", "predict", "filter", "inspect-noise", "evaluate", "simulate",
                                     "noise-model fit", "noise-model bootstrap"])
def test_axes_contradicting_the_metadata_are_refused_by_every_command(tmp_path, zyx_ome, command):
    model = str(random_model(tmp_path / "m3.qs", 3, depth=1))
    out = str(tmp_path / "out")
    args = {
        "info": [zyx_ome],
        "train": [zyx_ome, "-o", f"{out}.qs", "--steps", "1"],
        "predict": [model, zyx_ome, "-o", f"{out}.ome.zarr"],
        "filter": [zyx_ome, "-o", f"{out}.ome.zarr", "--kind", "box"],
        "inspect-noise": [zyx_ome, "-o", out],
        "evaluate": [zyx_ome, zyx_ome],
        "simulate": [zyx_ome, "-o", f"{out}.ome.zarr", "--poisson", "1"],
        "noise-model fit": ["--calibration", zyx_ome, "-o", f"{out}.json"],
        "noise-model bootstrap": [model, zyx_ome, "-o", f"{out}.json"],
    }[command]
    code, output = run(*command.split(), *args, "--axes", "tyx")
    assert code == 2
    assert_one_clear_line(code, output, "--axes tyx contradicts the axes zyx", "drop --axes (or pass --axes zyx)")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # refused before anything is written


def test_patch_larger_than_volume(tmp_path, image):
    code, out = run("train", image, "-o", str(tmp_path / "m.qs"), "--patch", "128", "--steps", "1", "--depth", "1", "--filters", "4")
    assert_one_clear_line(code, out, "larger than the volume", "smaller --patch")


def test_non_numeric_dtype(tmp_path):
    p = write_zarr_array(tmp_path / "b.zarr", np.zeros((8, 8), dtype=bool), (8, 8))
    code, out = run("info", p)
    assert_one_clear_line(code, out, "dtype bool", "convert")


def test_nan_in_data_is_refused_for_training_and_prediction(tmp_path, model2d):
    data = np.ones((32, 32), np.float32)
    data[5:7, 5:7] = np.nan
    p = write_zarr_array(tmp_path / "nan.zarr", data, (32, 32))
    code, out = run("predict", model2d, p, "-o", str(tmp_path / "o.ome.zarr"))
    assert_one_clear_line(code, out, "NaN/inf", "replace them")
    code, out = run("train", p, "-o", str(tmp_path / "m.qs"), "--patch", "16", "--steps", "1")
    assert_one_clear_line(code, out, "NaN/inf")


def test_model_data_mismatch(tmp_path, image):
    m3 = random_model(tmp_path / "m3.qs", 3, depth=1)
    code, out = run("predict", m3, image, "-o", str(tmp_path / "o.ome.zarr"))
    assert_one_clear_line(code, out, "model is 3D", "2 spatial axes")
    mc = random_model(tmp_path / "mc.qs", 2, in_channels=2, depth=1)
    code, out = run("predict", mc, image, "-o", str(tmp_path / "o.ome.zarr"))
    assert_one_clear_line(code, out, "expects 2 channel(s)", "has 1")


def test_output_exists_requires_overwrite(tmp_path, image, model2d):
    out = tmp_path / "o.ome.zarr"
    code, _ = run("predict", model2d, image, "-o", str(out), "--no-progress")
    assert code == 0
    code, msg = run("predict", model2d, image, "-o", str(out), "--no-progress")
    assert_one_clear_line(code, msg, "already exists", "--overwrite")
    code, _ = run("predict", model2d, image, "-o", str(out), "--no-progress", "--overwrite")
    assert code == 0


def test_output_inside_input(tmp_path, model2d):
    data = (100 + np.random.default_rng(0).standard_normal((32, 32))).astype(np.float32)
    src = write_ome(tmp_path / "in.ome.zarr", data, "yx", (16, 16))
    code, out = run("predict", model2d, src, "-o", str(tmp_path / "in.ome.zarr" / "denoised.ome.zarr"))
    assert_one_clear_line(code, out, "inside", "elsewhere")


def test_not_a_model_file(tmp_path, image):
    bogus = tmp_path / "bogus.qs"
    bogus.write_text("hello")
    code, out = run("predict", str(bogus), image, "-o", str(tmp_path / "o.ome.zarr"))
    assert_one_clear_line(code, out, "not a quietscope model file")


def test_bad_option_values(tmp_path, image, model2d):
    code, out = run("predict", model2d, image, "-o", str(tmp_path / "o.ome.zarr"), "--chunks", "16,16,16")
    assert_one_clear_line(code, out, "--chunks has 3 values", "2 spatial axes")
    code, out = run("predict", model2d, image, "-o", str(tmp_path / "o.ome.zarr"), "--chunks", "16,16", "--block", "20,16")
    assert_one_clear_line(code, out, "--block", "multiple")
    code, out = run("predict", model2d, image, "-o", str(tmp_path / "o.ome.zarr"), "--dtype", "complex64")
    assert_one_clear_line(code, out, "dtype")
    code, out = run("train", image, "-o", str(tmp_path / "m.qs"), "--method", "magic")
    assert_one_clear_line(code, out, "unknown method 'magic'", "n2v")


def test_inputs_are_never_modified(tmp_path, image, model2d):
    before = tree_bytes(tmp_path / "in.zarr")
    model_before = tree_bytes(tmp_path / "m2.qs")
    assert run("predict", model2d, image, "-o", str(tmp_path / "o.ome.zarr"), "--no-progress")[0] == 0
    assert run("train", image, "-o", str(tmp_path / "t.qs"), "--patch", "16", "--steps", "3", "--depth", "1",
               "--filters", "4", "--batch", "2", "--checkpoint-every", "2")[0] == 0
    assert run("info", image)[0] == 0
    assert tree_bytes(tmp_path / "in.zarr") == before
    assert tree_bytes(tmp_path / "m2.qs") == model_before
    # The input store was opened read-only: zarr refuses writes through our reader.
    from quietscope.io import open_image

    with pytest.raises(Exception):
        open_image(image).array[0, 0] = 1.0
