"""Model files written before the workflows restructure (2026-12-01) still load and predict the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quietscope.inference import load_for_inference, predict_whole
from quietscope.methods.modelfile import read_manifest
from quietscope.workflows.info import describe

DATA = Path(__file__).with_name("data")
LEGACY = DATA / "legacy_n2v_2026-12-01.qs"


def test_legacy_model_file_predicts_what_it_predicted_when_written():
    # The input and output were computed by the code of commit 07bab1f (quietscope.chunked).
    x = np.load(DATA / "legacy_n2v_2026-12-01_input.npy")
    expected = np.load(DATA / "legacy_n2v_2026-12-01_output.npy")
    model = load_for_inference(LEGACY, "cpu", spatial_axes="yx", n_channels=1)
    assert model.name == "n2v" and model.halo == (10, 10)
    got = predict_whole(model.tile_function(), x, model.halo, model.factor)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_legacy_model_file_describes_itself():
    manifest = read_manifest(LEGACY)
    assert manifest["quietscope_version"] == "0.1.0"
    desc = describe(str(LEGACY))
    assert desc["method"]["method"] == "n2v" and desc["data_stats"] == {"min": 0.0, "max": 255.0}
