"""Predict one large block window in sub-tiles, so the net's memory is bounded by the sub-tile.

A deep block pays its z halo (reads, writes, pyramid) once for many chunks of z, but a 3D net's
activations take hundreds of bytes per voxel: the block's window is streamed through the net in
sub-tiles and the results are pasted into one window-sized array. :func:`~quietscope.tiling.subtile_cuts`
explains why every voxel equals the whole-window prediction (so chunked == whole still holds).
Pure numpy over any tile function: the runner knows no method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quietscope.tiling import Shape, iter_subtiles

TileFunction = Callable[[np.ndarray], np.ndarray]


def predict_in_subtiles(fn: TileFunction, tile: np.ndarray, halo: Shape, subtile: Shape) -> np.ndarray:
    """``fn`` over ``tile`` (``(C, *window)``) in sub-tiles of output extent ``subtile``.

    Parameters
    ----------
    fn : callable
        Tile function ``(C, *spatial) -> (C_out, *spatial)``.
    tile : numpy.ndarray
        The block's read window; its spatial sizes, ``halo`` and ``subtile`` are multiples of
        the net's down-sampling factor.
    halo : tuple of int
        Halo per spatial axis.
    subtile : tuple of int
        Output extent of one sub-tile per spatial axis.

    Returns
    -------
    numpy.ndarray
        float32 ``(C_out, *window)``, equal to ``fn(tile)`` up to float rounding.

    Examples
    --------
    >>> out = predict_in_subtiles(lambda t: t * 2, np.ones((1, 40, 40), np.float32), (4, 4), (16, 16))
    >>> out.shape, float(out.min())
    ((1, 40, 40), 2.0)
    """
    window = tile.shape[1:]
    out: np.ndarray | None = None
    for read, dest, crop in iter_subtiles(window, halo, subtile):
        pred = fn(np.ascontiguousarray(tile[(slice(None),) + read]))
        if out is None:
            if all(s.start == 0 and s.stop == n for s, n in zip(read, window)):
                return np.asarray(pred, dtype=np.float32)  # one sub-tile: the window itself
            out = np.empty((pred.shape[0],) + tuple(window), np.float32)
        out[(slice(None),) + dest] = pred[(slice(None),) + crop]
    assert out is not None
    return out


@dataclass(frozen=True)
class SubtiledFactory:
    """Processor factory wrapping another one so each block window is predicted in sub-tiles.

    The token names the sub-tile: a resumed job must use the same sub-tiles to stay bit-identical.
    """

    inner: object  # a ProcessorFactory (picklable)
    halo: Shape
    subtile: Shape

    @property
    def token(self) -> str:
        return f"{self.inner.token}-sub{'x'.join(map(str, self.subtile))}"  # type: ignore[attr-defined]

    def build(self) -> TileFunction:
        fn = self.inner.build()  # type: ignore[attr-defined]
        halo, subtile = self.halo, self.subtile
        return lambda tile: predict_in_subtiles(fn, tile, halo, subtile)
