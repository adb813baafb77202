"""``train --z-pool auto``: the decision and the reason it logs."""

from __future__ import annotations

import pytest

from quietscope.errors import ConfigError
from quietscope.workflows.train import resolve_z_pool

UM = {"z": "micrometer", "y": "micrometer", "x": "micrometer"}


@pytest.mark.parametrize(
    "scale, units, expected, reason",
    [
        ({"z": 2.0, "y": 0.4, "x": 0.4}, UM, False, "anisotropic voxels (z step 5x"),
        ({"z": 0.5, "y": 0.4, "x": 0.4}, UM, True, "near isotropic"),
        ({"z": 1.0, "y": 1.0, "x": 1.0}, {"z": None, "y": None, "x": None}, True, "records no z spacing"),
    ],
)
def test_auto_decides_from_the_voxel_size(scale, units, expected, reason):
    pool, why = resolve_z_pool("auto", "n2v", "zyx", scale, units)
    assert pool is expected and reason in why


def test_methods_without_a_unet_always_pool_and_2d_ignores_auto():
    assert resolve_z_pool("auto", "bayes-poisson", "zyx", {"z": 3.0, "y": 0.3, "x": 0.3}, UM) == (True, "bayes-poisson always pools z")
    assert resolve_z_pool("auto", "n2v", "yx", {"y": 0.3, "x": 0.3})[0] is True
    with pytest.raises(ConfigError, match="3D data only"):
        resolve_z_pool(False, "n2v", "yx", {"y": 0.3, "x": 0.3})
    with pytest.raises(ConfigError, match="unknown"):
        resolve_z_pool("maybe", "n2v", "zyx", {})
