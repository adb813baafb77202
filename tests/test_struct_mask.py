"""structN2V masks: kernel, parsing, loading and application to a batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile
import torch

from quietscope.errors import ConfigError, InputError
from quietscope.methods.struct_mask import (
    apply_struct_mask,
    load_struct_mask,
    parse_struct_mask,
    struct_mask,
)


@pytest.mark.parametrize("ndim, axis", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (2, -1)])
@pytest.mark.parametrize("length", [1, 5, 9])
def test_struct_mask_is_a_centred_line(ndim, axis, length):
    k = struct_mask(ndim, axis, length)
    assert k.dtype == bool and k.ndim == ndim
    expected_shape = [1] * ndim
    expected_shape[axis] = length
    assert k.shape == tuple(expected_shape)
    assert k.sum() == length
    centre = tuple(s // 2 for s in k.shape)
    assert k[centre]
    # Positions relative to the centre: exactly -h..h along the axis, 0 elsewhere.
    offsets = np.argwhere(k) - np.array(centre)
    h = length // 2
    ax = axis % ndim
    assert sorted(offsets[:, ax].tolist()) == list(range(-h, h + 1))
    assert not np.delete(offsets, ax, axis=1).any()


@pytest.mark.parametrize(
    "args, match",
    [((2, 1, 4), "even.*use 5"), ((2, 1, 0), "positive odd"), ((2, 1, -3), "positive odd"), ((4, 0, 3), "4D"), ((2, 2, 3), "axis 2")],
)
def test_struct_mask_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        struct_mask(*args)


@pytest.mark.parametrize(
    "text, axes, expected",
    [("x:5", "yx", (1, 5)), ("y:3", "yx", (0, 3)), (" Z : 7 ", "zyx", (0, 7)), ("X:1", "zyx", (2, 1))],
)
def test_parse_struct_mask(text, axes, expected):
    assert parse_struct_mask(text, axes) == expected


@pytest.mark.parametrize(
    "text, axes, match",
    [
        ("x5", "yx", "AXIS:LENGTH"),
        ("x:five", "yx", "AXIS:LENGTH"),
        ("q:5", "yx", "'q' is not an axis.*y, x"),
        ("z:3", "yx", "'z' is not an axis"),
        ("x:4", "yx", "even.*centred.*use 5"),
        ("x:0", "yx", "positive odd"),
        ("x:-3", "yx", "positive odd"),
    ],
)
def test_parse_struct_mask_errors(text, axes, match):
    with pytest.raises(ConfigError, match=match):
        parse_struct_mask(text, axes)


def test_load_struct_mask_npy_and_tif(tmp_path):
    cross = np.zeros((3, 5), dtype=np.uint8)
    cross[1, :] = 1
    cross[:, 2] = 1
    np.save(tmp_path / "m.npy", cross.astype(bool))
    tifffile.imwrite(tmp_path / "m.tif", cross)
    for name in ("m.npy", "m.tif"):
        k = load_struct_mask(tmp_path / name, ndim=2)
        assert k.dtype == bool
        np.testing.assert_array_equal(k, cross.astype(bool))


@pytest.mark.parametrize(
    "array, name, match",
    [
        (np.ones((1, 4), bool), "even.npy", "odd"),
        (np.array([[0, 2, 0]]), "two.npy", "other than 0 and 1"),
        (np.ones(5, bool), "line.npy", "1 dimensions"),
        (np.zeros((1, 5), bool), "empty.npy", "all zeros"),
        (np.ones((1, 1, 5), bool), "three.npy", "3D but the data is 2D"),
        (np.array([[{"a": 1}]], dtype=object), "obj.npy", "cannot read"),
    ],
)
def test_load_struct_mask_errors(tmp_path, array, name, match):
    path = tmp_path / name
    np.save(path, array, allow_pickle=True)
    with pytest.raises(InputError, match=match):
        load_struct_mask(path, ndim=2)


def test_load_struct_mask_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_struct_mask(tmp_path / "nope.npy")
    (tmp_path / "m.png").write_bytes(b"x")
    with pytest.raises(InputError, match="neither .npy nor .tif"):
        load_struct_mask(tmp_path / "m.png")


def _expected_changed(shape, coords, kernel, include_center=False):
    """Boolean (B, *spatial) map of the pixels the mask must replace, computed pixel by pixel."""
    out = np.zeros(shape, dtype=bool)
    centre = np.array(kernel.shape) // 2
    for c in coords:
        b, pos = c[0], np.array(c[1:])
        for off in np.argwhere(kernel) - centre:
            if not include_center and not off.any():
                continue
            p = pos + off
            if np.all(p >= 0) and np.all(p < np.array(shape[1:])):
                out[(b, *p)] = True
    return out


@pytest.mark.parametrize(
    "spatial, axis", [((12, 16), 0), ((12, 16), 1), ((6, 10, 12), 0), ((6, 10, 12), 1), ((6, 10, 12), 2)]
)
def test_apply_struct_mask_changes_exactly_the_masked_pixels(spatial, axis):
    ndim = len(spatial)
    g = torch.Generator().manual_seed(0)
    patch = torch.rand((3, 3, *spatial), generator=g) * 100 + 50
    original = patch.clone()
    kernel = struct_mask(ndim, axis, 5)
    # One blind spot in the middle, one on the low border and one next to the high border
    # of the masked axis (clipped there), each in its own sample.
    mid = [s // 2 for s in spatial]
    low, high = list(mid), list(mid)
    low[axis], high[axis] = 0, spatial[axis] - 2
    coords = torch.tensor([[0, *mid], [1, *low], [2, *high]])
    out = apply_struct_mask(patch, coords, kernel, generator=g)

    assert torch.equal(patch, original)  # input untouched
    changed = (out != patch).numpy()  # (B, C, *spatial)
    expected = _expected_changed((3, *spatial), coords.numpy(), kernel)
    # Every channel is replaced at the same positions.
    for c in range(3):
        np.testing.assert_array_equal(changed[:, c], expected)
    # 4 neighbours in the middle, 2 at the low border, 3 at the high border.
    assert [int(e.sum()) for e in expected] == [4, 2, 3]
    # Replacement values lie in each sample's and channel's own range.
    for b, c in itertools.product(range(3), range(3)):
        vals = out[b, c][torch.as_tensor(expected[b])]
        assert vals.min() >= original[b, c].min() and vals.max() <= original[b, c].max()


def test_apply_struct_mask_center_kernel_seed_and_empty():
    g = torch.Generator().manual_seed(1)
    patch = torch.rand((1, 1, 9, 9), generator=g)
    coords = torch.tensor([[0, 4, 4]])
    line = struct_mask(2, 1, 3)
    with_centre = apply_struct_mask(patch, coords, line, torch.Generator().manual_seed(2), include_center=True)
    np.testing.assert_array_equal(
        (with_centre != patch)[0, 0].numpy(), _expected_changed((1, 9, 9), coords.numpy(), line, True)[0]
    )
    # Same seed, same result; another seed, other values.
    a = apply_struct_mask(patch, coords, line, torch.Generator().manual_seed(3))
    b = apply_struct_mask(patch, coords, line, torch.Generator().manual_seed(3))
    c = apply_struct_mask(patch, coords, line, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A general (cross-shaped) kernel from a file works the same way.
    cross = np.zeros((3, 3), bool)
    cross[1, :] = cross[:, 1] = True
    out = apply_struct_mask(patch, coords, cross, torch.Generator().manual_seed(5))
    np.testing.assert_array_equal((out != patch)[0, 0].numpy(), _expected_changed((1, 9, 9), coords.numpy(), cross)[0])
    assert torch.equal(apply_struct_mask(patch, torch.zeros((0, 3), dtype=torch.long), line), patch)
    with pytest.raises(ConfigError, match="odd-sized 2D"):
        apply_struct_mask(patch, coords, np.ones((1, 4), bool))
