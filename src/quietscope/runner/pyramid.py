"""The progressive pyramid: which coarse tiles can be written once which blocks are done.

Every level is cut into a regular grid of *producers*: level 0 into the blocks; levels
``1..local`` into the blocks' down-sampled footprints (the block task writes them itself, when
its blocks own whole chunks/shards there, see ``io.writing.block_local_levels``); every level
above into *tiles*. A tile of level k reads a region of level k-1 (twice its extent along y and
x); it can be written as soon as every level-(k-1) producer that region intersects is done.
That count is pure geometry of the plan, so the only state is a counter per tile that has
some but not all of its sources done (the frontier of the plan, never the whole pyramid) and
the ledger's markers.

Tiles are as small as a block's footprint at their level (so that the coarsest level fills in
as the run goes, not at its end), but never straddle a write unit (chunk or shard): a tile
smaller than its unit is written by reading, updating and rewriting that unit. Two such
writes to one unit must never overlap, so all coarse tiles are written by one task at a time
(the *lane*, see ``runner.executor``), each task taking every tile that became ready meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product

PYRAMID = "yx"


@dataclass(frozen=True, order=True)
class Tile:
    """One coarse tile: its level and its index in that level's tile grid (over the output axes)."""

    level: int
    index: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"k{self.level}_" + "_".join(map(str, self.index))


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    for d in range(1, int(n**0.5) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


def tile_size(footprint: float, unit: int, extent: int) -> int:
    """Tile size along a pyramid axis: whole units when a block's footprint covers one or more,
    else the largest divisor of the unit not above the footprint (tiles nest in units)."""
    if footprint >= extent:
        return unit * -(-extent // unit)
    if footprint >= unit:
        return unit * max(1, int(footprint // unit))
    return _largest_divisor_at_most(unit, max(1, int(footprint)))


@dataclass(frozen=True)
class PyramidPlan:
    """Producer grids of every level (plain data: cheap to pickle into each lane task).

    ``grids[k]`` is the producer cell shape of level k over ``axes``; ``units[k]`` the write
    unit (chunk or shard) of level k; ``local`` the levels the block tasks write themselves.
    """

    axes: str
    level_shapes: tuple[tuple[int, ...], ...]
    grids: tuple[tuple[int, ...], ...]
    units: tuple[tuple[int, ...], ...]
    local: int

    @classmethod
    def build(cls, axes: str, level_shapes: Sequence[Sequence[int]], block: Sequence[int],
              units: Sequence[Sequence[int]], local: int) -> PyramidPlan:
        """``block``: the level-0 block over ``axes`` (t: 1, c: all)."""
        shapes = tuple(tuple(int(s) for s in sh) for sh in level_shapes)
        grids: list[tuple[int, ...]] = []
        for k, shape in enumerate(shapes):
            cell = []
            for i, a in enumerate(axes):
                spans = block[i] >= shapes[0][i]  # one block spans the axis
                if a not in PYRAMID:
                    cell.append(int(block[i]) if k <= local else int(units[k][i]))
                elif k <= local:
                    cell.append(max(1, shape[i]) if spans else int(block[i]) // 2**k)
                else:
                    footprint = float("inf") if spans else block[i] / 2**k
                    cell.append(tile_size(footprint, int(units[k][i]), shape[i]))
            grids.append(tuple(cell))
        return cls(axes, shapes, tuple(grids), tuple(tuple(int(u) for u in un) for un in units), int(local))

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    def region(self, level: int, index: Sequence[int]) -> tuple[slice, ...]:
        g, shape = self.grids[level], self.level_shapes[level]
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, g, shape))

    def source(self, tile: Tile) -> tuple[slice, ...]:
        """The level-(k-1) region a tile reads (twice its extent along the pyramid axes)."""
        prev = self.level_shapes[tile.level - 1]
        out = []
        for r, a, p in zip(self.region(tile.level, tile.index), self.axes, prev):
            out.append(slice(2 * r.start, min(2 * r.stop, p)) if a in PYRAMID else r)
        return tuple(out)

    def unit_of(self, tile: Tile) -> tuple[tuple[int, int], ...]:
        """The write units holding ``tile``: ``(first, stop)`` unit indices per axis.

        A tile either nests in one unit along an axis or covers whole units (a block wider than
        a unit, or one block spanning the axis), so two tiles of a level hold either the same
        units or none in common: the units are one read-update-write group.
        """
        u = self.units[tile.level]
        return tuple((r.start // c, -(-r.stop // c)) for r, c in zip(self.region(tile.level, tile.index), u))

    def unit_region(self, level: int, units: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
        """The region of the write units ``units`` (as :meth:`unit_of` gives them) at ``level``."""
        u, shape = self.units[level], self.level_shapes[level]
        return tuple(slice(a * c, min(b * c, s)) for (a, b), c, s in zip(units, u, shape))

    def partial(self, level: int) -> bool:
        """Whether tiles of ``level`` are smaller than its write unit (written by read-update-write)."""
        return any(g % u for g, u in zip(self.grids[level], self.units[level]))

    def required(self, tile: Tile) -> int:
        """How many level-(k-1) producers the tile's source intersects."""
        n = 1
        for s, c in zip(self.source(tile), self.grids[tile.level - 1]):
            n *= -(-s.stop // c) - s.start // c
        return n

    def parents(self, level: int, region: Sequence[slice]) -> Iterator[Tile]:
        """Tiles of ``level + 1`` whose source intersects ``region`` (of ``level``)."""
        g, shape = self.grids[level + 1], self.level_shapes[level + 1]
        ranges = []
        for r, c, a, s in zip(region, g, self.axes, shape):
            n_tiles = -(-s // c)
            if a in PYRAMID:
                lo, hi = r.start // (2 * c), -(-r.stop // (2 * c))
            else:
                lo, hi = r.start // c, -(-r.stop // c)
            ranges.append(range(lo, min(hi, n_tiles)))
        for idx in product(*ranges):
            yield Tile(level + 1, tuple(idx))

    def local_region(self, level0: Sequence[slice]) -> tuple[slice, ...]:
        """A block's region at level ``local`` (its top block-local level)."""
        out = []
        for r, a, s in zip(level0, self.axes, self.level_shapes[self.local]):
            f = 2**self.local if a in PYRAMID else 1
            out.append(slice(r.start // f, min(-(-r.stop // f), s)))
        return tuple(out)


class PyramidTracker:
    """Counts, per tile, its finished sources; says which tiles became ready.

    Seeded with the ledger's finished tiles on ``--resume``: replaying the finished blocks
    then walks through finished tiles (without re-emitting them) to those still to write.
    """

    def __init__(self, plan: PyramidPlan, tiles_done: Iterable[str] = ()) -> None:
        self.plan = plan
        self.tiles_done = set(tiles_done)
        self.counts: dict[Tile, int] = {}

    def producer_done(self, level: int, region: Sequence[slice]) -> list[Tile]:
        """A producer of ``level`` covering ``region`` is done: the tiles that became ready."""
        ready: list[Tile] = []
        stack = [(level, tuple(region))]
        while stack:
            lv, reg = stack.pop()
            if lv + 1 >= self.plan.n_levels:
                continue
            for tile in self.plan.parents(lv, reg):
                c = self.counts.get(tile, 0) + 1
                if c < self.plan.required(tile):
                    self.counts[tile] = c
                    continue
                self.counts.pop(tile, None)
                if tile.key in self.tiles_done:
                    stack.append((tile.level, self.plan.region(tile.level, tile.index)))
                else:
                    ready.append(tile)
        return ready

    def block_done(self, level0: Sequence[slice]) -> list[Tile]:
        """A block (its level-0 region over the output axes) and its block-local levels are done."""
        return self.producer_done(self.plan.local, self.plan.local_region(level0))

    def closure(self, tiles: Iterable[Tile]) -> list[Tile]:
        """``tiles`` plus every tile they make ready, in an order that writes sources first.

        Called when a lane task is submitted: the task writes them in this order, so tiles
        further up the pyramid can go into the same task (a failed task fails the run, and
        ``--resume`` redoes whatever has no marker).
        """
        out: list[Tile] = []
        todo = deque(tiles)
        while todo:
            tile = todo.popleft()
            out.append(tile)
            todo.extend(self.producer_done(tile.level, self.plan.region(tile.level, tile.index)))
        return out
