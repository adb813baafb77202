"""How much memory a method needs per voxel, measured once on a small probe tile.

``--max-tile-voxels`` bounds voxels, but a 3D U-Net with 32 filters keeps several hundred bytes
of activations per voxel alive, so a voxel bound does not bound memory. :func:`probe_memory`
runs the method once on a tiny tile under a torch function mode that counts the bytes of every tensor
storage alive at once (exact and allocator-independent, on any device; the probe takes about
a second, 1.4 s on the loaded test machine). :func:`memory_profile` turns that into the
:class:`~quietscope.tiling.MemoryProfile` the planner sizes blocks and sub-tiles with.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from quietscope.nets.unet import UNet, inference_slabs
from quietscope.tiling import SLAB_MIN_PLANES, MemoryProfile, per_axis

#: Allocator slack over the counted tensors (heap fragmentation, oneDNN scratch, the input's
#: copies): the measured peak RSS of a 3D U-Net (32 filters, CPU) is 1.1-1.3x the counted bytes
#: on tiles of 0.1-0.4 M voxels (benchmarks/throughput.py --cases 3D-lightsheet reports both).
SLACK = 1.25


class _PeakBytes(TorchFunctionMode):
    """Counts the bytes of tensor storages created under it that are alive at the same time.

    Why hand-written: torch has peak-memory statistics for CUDA only; CPU RSS cannot be reset
    portably and glibc keeps freed memory, so the count follows storages instead. A function
    mode rather than a dispatch mode or meta tensors: those import ``torch._dynamo`` on first
    use (10-20 s on a loaded machine, measured).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key in self._seen:
                    continue
                n = st.nbytes()
                self._seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)
        return out


def _peak_bytes(method: Any, shape: tuple[int, ...]) -> int:
    """Peak bytes of tensor storages alive at once during ``method.predict`` of one ``shape`` tile."""
    device = next((p.device for p in method.parameters()), torch.device("cpu"))
    x = torch.zeros((1, method.predict_in_channels) + tuple(shape), device=device)
    mode = _PeakBytes()
    with torch.inference_mode(), mode:
        method.predict(x)
    return mode.peak


def probe_memory(method: Any, steps: int = 4) -> float:
    """Peak bytes of activations per voxel of ``method.predict`` on a whole small tile (counted, without slack).

    Parameters
    ----------
    method : Method
        A loaded method in eval mode (on any device).
    steps : int
        Probe extent per axis in down-sampling factors (4: a 16^3 tile for a depth-2 U-Net; a
        tile this small is never cut in slabs).

    Returns
    -------
    float
        Bytes per voxel of the tile.

    Examples
    --------
    >>> probe_memory(load_model("m.qs")[0])     # doctest: +SKIP
    804.0
    """
    f = per_axis(method.downsampling_factor, method.config.spatial_ndim)
    shape = tuple(steps * k for k in f)
    with inference_slabs(method, 0):
        return _peak_bytes(method, shape) / math.prod(shape)


def probe_streamed_memory(method: Any, steps: int = 2) -> tuple[float, float] | None:
    """Bytes of the streamed U-Net pass (:mod:`quietscope.nets.streamed`), counted without slack:
    ``(whole, slab)``.

    ``whole`` is per voxel of the tile (its input and output, held whole); ``slab`` per voxel of
    one slab of :data:`~quietscope.tiling.SLAB_MIN_PLANES` planes
    (:class:`~quietscope.tiling.MemoryProfile`): the rolling buffers of every level and a slab's
    working set, a fixed number of planes whatever the tile's depth. Two probes on a small plane,
    12 and 24 slabs deep (deep enough for the buffers to reach their steady span), separate the
    terms: their difference is whole planes only.

    Returns
    -------
    (float, float) or None
        None when the method has no U-Net that runs in slabs.

    Notes
    -----
    The count scales with the plane's area (same-padded convolutions), so a small plane predicts
    a large one; measured against the counted peak of real tiles in tests/test_streamed.py.
    """
    nets = [m for m in method.modules() if isinstance(m, UNet)]
    if not nets:
        return None
    f = per_axis(method.downsampling_factor, method.config.spatial_ndim)
    rest = tuple(steps * k for k in f[1:])
    plane = math.prod(rest)
    z1, z2 = (math.ceil(z / f[0]) * f[0] for z in (12 * SLAB_MIN_PLANES, 24 * SLAB_MIN_PLANES))
    with inference_slabs(method, SLAB_MIN_PLANES):
        p1 = _peak_bytes(method, (z1,) + rest)
        p2 = _peak_bytes(method, (z2,) + rest)
    whole = max(0.0, (p2 - p1) / ((z2 - z1) * plane))
    slab = max(0.0, (p1 - whole * z1 * plane) / (SLAB_MIN_PLANES * plane))
    return whole, slab


def memory_profile(method: Any, n_out: int) -> MemoryProfile:
    """The planner's memory model of ``method``: probed activations with slack, weights, buffers.

    Parameters
    ----------
    method : Method
        A loaded method.
    n_out : int
        Output channels (the assembled prediction of a block window).

    Returns
    -------
    MemoryProfile
    """
    weights = sum(p.numel() * p.element_size() for p in method.parameters())
    cin = method.predict_in_channels
    # Block buffers per read-window voxel: the raw read, its float32 copy, a reflected copy
    # at the border, the assembled float32 prediction and the cast output.
    io = 4.0 * (3 * cin + 2 * n_out)
    whole = SLACK * probe_memory(method)
    fixed = 4 * weights + 64e6
    streamed = probe_streamed_memory(method)
    if streamed is None:
        return MemoryProfile(net_bytes_per_voxel=whole, io_bytes_per_voxel=io, fixed_bytes=fixed)
    return MemoryProfile(net_bytes_per_voxel=SLACK * streamed[0], io_bytes_per_voxel=io, fixed_bytes=fixed,
                         slab_bytes_per_voxel=SLACK * streamed[1], whole_bytes_per_voxel=whole)
