"""Decisions the training takes from the data before it starts: patch shape and z pooling."""

from __future__ import annotations

from quietscope.errors import ConfigError
from quietscope.methods import get_method_class

#: ``train``'s default patch edge (``--patch 64``).
DEFAULT_PATCH = 64


def fitting_patch(spatial_shape: tuple[int, ...], edge: int = DEFAULT_PATCH, multiple: int = 4) -> tuple[int, ...]:
    """The patch ``edge`` clipped to the data: per axis at most its extent, a multiple of ``multiple``.

    ``multiple`` is the U-Net's pooling factor (``2**depth``). An axis shorter than
    ``multiple`` keeps its full extent (it can only be trained without pooling along it).

    >>> fitting_patch((17, 512, 30))
    (16, 64, 28)
    """
    out = []
    for s in spatial_shape:
        p = min(edge, s)
        out.append(p - p % multiple or s)
    return tuple(out)


def expand_patch(patch: tuple[int, ...], spatial_ndim: int) -> tuple[int, ...]:
    """``(64,)`` -> ``(64, 64)`` or ``(64, 64, 64)``; longer tuples must match the data."""
    if len(patch) == 1:
        return patch * spatial_ndim
    if len(patch) != spatial_ndim:
        raise ConfigError(f"--patch has {len(patch)} values but the data has {spatial_ndim} spatial axes; give 1 or {spatial_ndim}")
    return patch


#: z step / pixel size from which ``--z-pool auto`` keeps full z resolution. Pooling z by 2 on
#: such a stack merges planes lying further apart than the pixels it merges in y/x, and each
#: pooled level widens the z halo by as much as the y/x one (24 voxels at depth 2).
ANISOTROPY_NO_Z_POOL = 2.0


def resolve_z_pool(
    setting: bool | str, method: str, spatial_axes: str, scale: dict[str, float],
    units: dict[str, str | None] | None = None,
) -> tuple[bool, str]:
    """Decide whether a 3D U-Net pools along z.

    Parameters
    ----------
    setting : bool or "auto"
        The user's choice; ``"auto"`` decides from the voxel size.
    method : str
        Method name (only U-Net methods can keep full z resolution).
    spatial_axes : str
        The data's spatial axes, e.g. ``"zyx"``.
    scale : dict
        Physical voxel size per axis.
    units : dict, optional
        Unit per axis; a z scale of 1 without a unit is read as "not recorded".

    Returns
    -------
    (bool, str)
        Whether to pool z, and the reason (for the log).
    """

    if setting not in (True, False, "auto"):
        raise ConfigError(f"--z-pool {setting!r} is unknown; use auto, yes or no")
    is_3d = len(spatial_axes) == 3
    if not is_3d:
        if setting is False:
            raise ConfigError("--z-pool no applies to 3D data only; drop it for 2D images")
        return True, "2D data"
    if setting != "auto":
        return bool(setting), "as given (--z-pool)"
    if not get_method_class(method).supports_z_pool_off:
        return True, f"{method} always pools z"
    z, yx = scale.get("z", 1.0), 0.5 * (scale.get("y", 1.0) + scale.get("x", 1.0))
    if units is not None and units.get("z") is None and z == 1.0:
        return True, "the input records no z spacing, so voxels are taken as isotropic; pass --z-pool no for an anisotropic stack"
    ratio = z / yx if yx > 0 else 1.0
    if ratio >= ANISOTROPY_NO_Z_POOL:
        return False, f"anisotropic voxels (z step {ratio:.3g}x the pixel size >= {ANISOTROPY_NO_Z_POOL:g}): z kept at full resolution"
    return True, f"voxels near isotropic (z step {ratio:.3g}x the pixel size)"
