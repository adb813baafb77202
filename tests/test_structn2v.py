"""structN2V through n2v_mask and the CLI; quality without ground truth (validation, curves, early stop)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from quietscope.methods.masking import n2v_mask
from quietscope.methods.modelfile import read_manifest
from quietscope.methods.struct_mask import struct_mask
from quietscope_cli.main import cli


def _expected_changed(shape: tuple[int, ...], spots: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Every blind spot plus every in-bounds pixel under the kernel centred on it."""
    out = np.zeros(shape, bool)
    centre = np.array(kernel.shape) // 2
    for off in np.argwhere(kernel) - centre:
        pos = spots + off
        inside = np.all((pos >= 0) & (pos < np.array(shape)), axis=1)
        out[tuple(pos[inside].T)] = True
    out[tuple(spots.T)] = True
    return out


@pytest.mark.parametrize(
    "spatial, axis, length",
    [((32, 40), 0, 5), ((32, 40), 1, 9), ((8, 24, 20), 0, 3), ((8, 24, 20), 1, 5), ((8, 24, 20), 2, 7)],
)
@pytest.mark.parametrize("strategy", ["uniform", "median"])
def test_masked_input_differs_exactly_under_the_struct_mask(spatial, axis, length, strategy):
    g = torch.Generator().manual_seed(3)
    # Continuous values: a replaced pixel equals its original with probability zero.
    batch = torch.rand((3, 2, *spatial), generator=g, dtype=torch.float64)
    kernel = struct_mask(len(spatial), axis, length)
    masked, mask = n2v_mask(batch, percentage=2.0, strategy=strategy, generator=g, struct_mask=kernel)
    assert masked.shape == batch.shape and mask.dtype == torch.bool
    for b in range(batch.shape[0]):
        spots = np.argwhere(mask[b, 0].numpy())
        assert len(spots) > 1
        assert torch.equal(mask[b, 0], mask[b, 1])  # channels share the blind spots
        expected = _expected_changed(spatial, spots, kernel)
        for c in range(batch.shape[1]):
            changed = (masked[b, c] != batch[b, c]).numpy()
            np.testing.assert_array_equal(changed, expected)
            # Hidden pixels get values within the patch's own range (structN2V replacement).
            lo, hi = batch[b, c].min(), batch[b, c].max()
            assert lo <= masked[b, c].min() and masked[b, c].max() <= hi


def test_without_struct_mask_only_the_blind_spots_change():
    g = torch.Generator().manual_seed(0)
    batch = torch.rand((2, 1, 32, 32), generator=g, dtype=torch.float64)
    masked, mask = n2v_mask(batch, percentage=2.0, generator=g)
    np.testing.assert_array_equal((masked != batch).numpy(), mask.numpy())


def test_blind_spot_replacement_avoids_the_hidden_neighbours():
    """A hidden neighbour carries noise correlated with the blind spot's: never copy it in."""
    g = torch.Generator().manual_seed(1)
    # Each pixel's value encodes its x position, so a copied value tells where it came from.
    x = torch.arange(64, dtype=torch.float64).repeat(64, 1)
    batch = (x + 1000 * torch.arange(64, dtype=torch.float64)[:, None])[None, None]
    kernel = struct_mask(2, 1, 5)  # hides x-2..x+2
    masked, mask = n2v_mask(batch, percentage=5.0, roi=5, generator=g, struct_mask=kernel)
    spots = np.argwhere(mask[0, 0].numpy())
    src = masked[0, 0].numpy()[tuple(spots.T)]
    src_y, src_x = np.round(src // 1000).astype(int), np.round(src % 1000).astype(int)
    inner = (spots[:, 1] >= 2) & (spots[:, 1] < 62) & (spots[:, 0] >= 2) & (spots[:, 0] < 62)
    # Copied from another row (never a same-row neighbour inside the mask).
    assert np.all(src_y[inner] != spots[inner, 0])
    assert np.all(np.abs(src_x[inner] - spots[inner, 1]) <= 2)


def test_struct_mask_of_the_wrong_dimensionality_is_refused():
    from quietscope.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit 3D"):
        n2v_mask(torch.rand(1, 1, 8, 16, 16), struct_mask=struct_mask(2, 1, 5))


# ---- end to end from the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_2d(tmp_path_factory):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    clean = ndimage.gaussian_filter(rng.uniform(0, 400, (96, 96)), 3)
    noise = ndimage.uniform_filter1d(rng.normal(0, 20, clean.shape), 5, axis=1)
    path = tmp_path_factory.mktemp("sn2v") / "noisy.tif"
    tifffile.imwrite(path, (clean + 100 + rng.normal(0, 5, clean.shape) + noise).astype(np.float32))
    return path


def _train(args):
    return CliRunner().invoke(cli, ["-q", "train", *map(str, args)])


_TINY = ["--patch", "16", "--batch", "2", "--depth", "1", "--filters", "4", "--device", "cpu"]


def test_structn2v_trains_end_to_end_2d(noisy_2d, tmp_path):
    model = tmp_path / "s.qs"
    r = _train([noisy_2d, "-o", model, "--struct-mask", "x:5", "--steps", "4", *_TINY])
    assert r.exit_code == 0, r.output
    m = read_manifest(model)
    assert m["method"]["struct_mask"] == [[1, 1, 1, 1, 1]]
    assert len(m["history"]) == 4 and all(np.isfinite(h["loss"]) for h in m["history"])


def test_structn2v_trains_end_to_end_3d_along_z_and_from_a_file(tmp_path):
    rng = np.random.default_rng(1)
    vol = tmp_path / "vol.tif"
    tifffile.imwrite(vol, rng.normal(100, 5, (16, 32, 32)).astype(np.float32))
    for spec, expected_shape in (("z:3", (3, 1, 1)), ("y:5", (1, 5, 1))):
        model = tmp_path / f"m_{spec[0]}.qs"
        r = _train([vol, "-o", model, "--struct-mask", spec, "--steps", "2", "--axes", "zyx", *_TINY])
        assert r.exit_code == 0, r.output
        assert np.asarray(read_manifest(model)["method"]["struct_mask"]).shape == expected_shape
    kernel = np.zeros((3, 3, 3), np.uint8)
    kernel[1, 1, :] = 1
    np.save(tmp_path / "k.npy", kernel)
    model = tmp_path / "m_file.qs"
    r = _train([vol, "-o", model, "--struct-mask", tmp_path / "k.npy", "--steps", "2", *_TINY])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(read_manifest(model)["method"]["struct_mask"], kernel)


@pytest.mark.parametrize("spec, match", [("x:4", "even"), ("z:5", "not an axis of the data"), ("x5", "AXIS:LENGTH")])
def test_bad_struct_mask_is_one_line(noisy_2d, tmp_path, spec, match):
    r = _train([noisy_2d, "-o", tmp_path / "m.qs", "--struct-mask", spec, "--steps", "1", *_TINY])
    assert r.exit_code == 2 and match in r.output
    assert len(r.output.strip().splitlines()) == 1


# ---- quality without ground truth ---------------------------------------------------------


def test_validation_loss_learning_curve_and_early_stop(noisy_2d, tmp_path):
    model = tmp_path / "es.qs"
    # A learning rate this small leaves the weights (and so the fixed-mask validation loss)
    # unchanged: the second validation cannot improve, and --early-stop 1 must stop there.
    r = _train([noisy_2d, "-o", model, "--steps", "1000", "--lr", "1e-12", "--early-stop", "1",
                "--struct-mask", "x:5", *_TINY])
    assert r.exit_code == 0, r.output
    m = read_manifest(model)
    steps_run = len(m["history"])
    assert steps_run < 1000
    vals = [h["val_loss"] for h in m["history"] if "val_loss" in h]
    assert len(vals) >= 2 and steps_run == 100 * len(vals)  # validation every 100 steps
    assert m["best_val_loss"] == pytest.approx(min(vals))
    assert m["best_step"] in [h["step"] for h in m["history"] if "val_loss" in h]
    curve = model.with_suffix(".learning_curve.png")
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best validation loss" in r.output
    assert f"keeps the weights of step {m['best_step']}" in r.output and m["kept_step"] == m["best_step"]
