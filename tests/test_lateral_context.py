"""Lateral context (μSplit LC): shapes, centring, reflect borders, and exact chunked prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quietscope.methods import build_method
from quietscope.nets.lateral_context import (
    centre_crop,
    context_margins,
    contexts_by_reflection,
    contexts_from_field,
    field_size,
    reflect_pad,
)


def test_margins_and_field():
    assert context_margins(64, 2) == [32, 96]
    assert field_size(64, 2) == 256
    with pytest.raises(ValueError, match="multiple of 8"):
        context_margins(36, 2)


def test_contexts_of_a_training_field_have_patch_size_and_are_centred():
    p, k = 16, 2
    f = field_size(p, k)
    yy, xx = torch.meshgrid(torch.arange(f, dtype=torch.float64), torch.arange(f, dtype=torch.float64), indexing="ij")
    field = torch.stack([yy, xx])[None]  # coordinates as values: pooled value = region centre
    ctx = contexts_from_field(field, (p, p), p, k)
    assert [tuple(c.shape) for c in ctx] == [(1, 2, p, p), (1, 2, p, p)]
    centre = (f - 1) / 2
    for c in ctx:
        # The mean coordinate of every context is the field's centre, like the patch's own.
        assert float(c[0, 0].mean()) == pytest.approx(centre)
        assert float(c[0, 1].mean()) == pytest.approx(centre)
    # Context 1 covers the central 2P at half resolution: its first pixel averages rows P/2..P/2+1.
    assert float(ctx[0][0, 0, 0, 0]) == pytest.approx((f - 2 * p) / 2 + 0.5)
    assert float(centre_crop(field, (p, p))[0, 0].mean()) == pytest.approx(centre)


def test_reflect_pad_equals_numpy_reflect_for_any_width():
    x = torch.arange(5 * 3, dtype=torch.float64).reshape(1, 1, 5, 3)
    for pad in (1, 2, 4, 11):
        np.testing.assert_array_equal(reflect_pad(x, pad)[0, 0].numpy(), np.pad(x[0, 0].numpy(), pad, mode="reflect"))


def test_contexts_by_reflection_equal_contexts_of_the_reflected_field():
    p, k = 16, 2
    x = torch.rand(1, 1, 32, 48, dtype=torch.float64)
    m = context_margins(p, k)[-1]
    padded = torch.from_numpy(np.pad(x[0, 0].numpy(), m, mode="reflect"))[None, None]
    for a, b in zip(contexts_by_reflection(x, p, k), contexts_from_field(padded, (32, 48), p, k)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    # A tile of the training patch size gets contexts of the patch size.
    assert [c.shape[2:] for c in contexts_by_reflection(torch.rand(1, 1, p, p), p, k)] == [(p, p), (p, p)]


def _lc_method(levels: int = 1):
    m = build_method({"method": "musplit", "spatial_ndim": 2, "in_channels": 2, "net": {"depth": 2, "filters": 8},
                      "latent_channels": 4, "context_levels": levels, "gaussian_logvar": 0.0})
    m.set_normalization([60.0, 40.0], [30.0, 20.0])
    assert m.prepare_training((16, 16)) == (16 * 2**levels,) * 2
    return m.eval()


def test_training_loss_on_a_context_field():
    m = _lc_method(2).train()
    loss = m.training_loss(torch.rand(2, 2, 64, 64) * 100, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.net.lc_stem.parameters())


def test_chunked_prediction_with_context_equals_whole_image_with_the_measured_halo():
    from quietscope.inference import method_halo, predict_whole

    m = _lc_method(1)
    m.set_inference(n_samples=0)
    halo = method_halo(m)
    # Measured, not declared: the context path's convolutions reach no further in image
    # coordinates than the patch path's (44 px here, as without context); the equality below
    # is what shows the measured halo suffices.
    plain = build_method({"method": "musplit", "spatial_ndim": 2, "in_channels": 2, "net": {"depth": 2, "filters": 8},
                          "latent_channels": 4, "gaussian_logvar": 0.0})
    assert halo[0] >= method_halo(plain)[0]
    rng = np.random.default_rng(0)
    img = (rng.random((1, 64, 96)) * 100).astype(np.float32)

    def fn(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return m.predict(torch.from_numpy(a)[None])[0].numpy()

    whole = predict_whole(fn, img, halo, m.downsampling_factor)
    padded = np.pad(img, [(0, 0)] + [(h, h) for h in halo], mode="reflect")
    tiled = np.zeros_like(whole)
    b = 32
    for y in range(0, 64, b):
        for x in range(0, 96, b):
            win = padded[:, y : y + b + 2 * halo[0], x : x + b + 2 * halo[1]]
            tiled[:, y : y + b, x : x + b] = fn(win)[:, halo[0] : halo[0] + b, halo[1] : halo[1] + b]
    assert np.abs(tiled - whole).max() <= 1e-4 * np.abs(whole).max()
