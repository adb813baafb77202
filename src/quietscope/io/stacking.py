"""Several single-structure images seen as one image with a channel axis (lazy).

Splitting methods train on one acquisition per structure; those usually live in separate files.
:class:`StackedImage` presents them as one :class:`~quietscope.io.reading.Image`-like object with
a ``c`` axis, reading each part region by region, so the patch sampler and the training loop
need not know.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quietscope.errors import InputError
from quietscope.io.reading import CANONICAL, SPATIAL, Image, ImageRef, open_image


def _with_c(axes: str) -> str:
    return "".join(a for a in CANONICAL if a in axes or a == "c")


@dataclass
class StackedImage:
    """Channel-stacked view of images with identical non-channel axes and shapes.

    The channels are the parts' channels in order (usually one each). Reads touch every part.
    """

    parts: list[Image]

    def __post_init__(self) -> None:
        if len(self.parts) < 2:
            raise InputError("stacking needs at least two images; pass one INPUT per channel")
        first = self.parts[0]
        base = first.axes.replace("c", "")
        for p in self.parts[1:]:
            if p.axes.replace("c", "") != base or p.spatial_shape != first.spatial_shape or p.n_timepoints != first.n_timepoints:
                raise InputError(
                    f"channel images differ: {first.ref.uri!r} has axes {first.axes} shape {first.shape} but "
                    f"{p.ref.uri!r} has axes {p.axes} shape {p.shape}; give images of the same field (crop them alike)"
                )

    # ---- description ------------------------------------------------------------------
    @property
    def axes(self) -> str:
        return _with_c(self.parts[0].axes)

    @property
    def ref(self) -> ImageRef:
        return ImageRef(" + ".join(p.ref.uri for p in self.parts), self.parts[0].ref.level, self.parts[0].ref.axes)

    @property
    def n_channels(self) -> int:
        return sum(p.n_channels for p in self.parts)

    @property
    def n_timepoints(self) -> int:
        return self.parts[0].n_timepoints

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPATIAL)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.parts[0].spatial_shape

    def _per_axis(self, values: dict[str, Any], c_value: Any) -> tuple[Any, ...]:
        return tuple(c_value if a == "c" else values[a] for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._per_axis(dict(zip(self.parts[0].axes, self.parts[0].shape)), self.n_channels)

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._per_axis(dict(zip(self.parts[0].axes, self.parts[0].chunks)), self.n_channels)

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*(p.dtype for p in self.parts))

    @property
    def scale(self) -> tuple[float, ...]:
        return self._per_axis(dict(zip(self.parts[0].axes, self.parts[0].scale)), 1.0)

    @property
    def units(self) -> tuple[str | None, ...]:
        return self._per_axis(dict(zip(self.parts[0].axes, self.parts[0].units)), None)

    @property
    def kind(self) -> str:
        return "stacked"

    @property
    def n_levels(self) -> int:
        return 1

    @property
    def channel_names(self) -> list[str]:
        return [os.path.basename(p.ref.uri.rstrip("/")) for p in self.parts]

    # ---- reading ----------------------------------------------------------------------
    def read_tc(self, t: int, spatial: tuple[slice, ...], channel: int | None = None) -> np.ndarray:
        """Read ``(C, *spatial)`` at time point ``t``: every part's channels, concatenated.

        With ``channel`` only that channel is read (C=1), from the one part that holds it.
        """
        if channel is None:
            return np.concatenate([p.read_tc(t, spatial).astype(self.dtype, copy=False) for p in self.parts], axis=0)
        if not 0 <= channel < self.n_channels:
            raise InputError(f"channel {channel} is out of range: the image has {self.n_channels} channel(s)")
        for part in self.parts:
            if channel < part.n_channels:
                return part.read_tc(t, spatial, channel).astype(self.dtype, copy=False)
            channel -= part.n_channels
        raise AssertionError("unreachable: channel was checked against n_channels")

    def read(self, slices: tuple[slice, ...]) -> np.ndarray:
        """Read a region given as canonical-order slices (one per axis of :attr:`axes`)."""
        by_axis = dict(zip(self.axes, slices))
        arrays = []
        for p in self.parts:
            sl = tuple(slice(None) if a == "c" else by_axis[a] for a in p.axes)
            arr = p.read(sl).astype(self.dtype, copy=False)
            if "c" not in p.axes:
                arr = np.expand_dims(arr, self.axes.index("c"))
            arrays.append(arr)
        ci = self.axes.index("c")
        return np.concatenate(arrays, axis=ci)[(slice(None),) * ci + (by_axis["c"],)]

    def describe(self) -> dict[str, Any]:
        """Axes, shape, dtype, scale and the stacked sources, as plain data (for ``info``)."""
        return {
            "uri": self.ref.uri,
            "kind": self.kind,
            "axes": self.axes,
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "dtype": str(self.dtype),
            "channel_names": self.channel_names,
            "parts": [p.describe() for p in self.parts],
        }


def stack_images(images: Sequence[Image]) -> StackedImage:
    """Stack opened images as channels (see :class:`StackedImage`)."""
    return StackedImage(list(images))


def open_stacked(
    uris: str | os.PathLike | Sequence[str | os.PathLike], level: int = 0, axes: str | None = None
) -> Image | StackedImage:
    """Open one image, or several as channels of one (one URI -> a plain :class:`Image`)."""
    if isinstance(uris, (str, os.PathLike)):
        return open_image(uris, level=level, axes=axes)
    uris = list(uris)
    if len(uris) == 1:
        return open_image(uris[0], level=level, axes=axes)
    return stack_images([open_image(u, level=level, axes=axes) for u in uris])
