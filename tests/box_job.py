"""Predict with a :class:`~quietscope.runner.testing.BoxProcessor` through the real engine.

Run as a script for the kill/resume tests: ``python tests/box_job.py '{"input_uri": ..., ...}'``.
"""

from __future__ import annotations

import json
import sys

from quietscope.chunked import PredictOptions, PredictResult, run_prediction
from quietscope.io.reading import open_image
from quietscope.runner.testing import BoxProcessor


def run_box_job(input_uri: str, output: str, options: dict, processor: dict | None = None) -> PredictResult:
    """Predict ``input_uri`` with a :class:`BoxProcessor` (halo 1, factor 1) into ``output``."""
    image = open_image(input_uri)
    proc = BoxProcessor(**(processor or {}))
    return run_prediction(image, output, proc, ["box"], (1,) * len(image.spatial_axes), 1,
                          PredictOptions(**options), {"test": "box"})


if __name__ == "__main__":
    run_box_job(**json.loads(sys.argv[1]))
