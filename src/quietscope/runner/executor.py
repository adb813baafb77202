"""Run a block plan on a dask cluster: bounded in-flight, one processor per worker, ledger, progress.

The runner never knows which method it runs: it gets a *processor factory* (picklable,
holding e.g. a model path) that each worker turns into a function ``tile -> prediction`` once,
through a worker plugin. Tasks carry only block coordinates, never pixels or weights.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby, islice
from typing import Any, Protocol

import numpy as np
from distributed import WorkerPlugin

from quietscope.io import stores
from quietscope.io.reading import ImageRef, open_image
from quietscope.io.validation import check_finite
from quietscope.io.writing import PYRAMID_AXES, cast_to, downsample2, open_level
from quietscope.runner.cluster import gpu_resources, worker_info
from quietscope.runner.ledger import Ledger
from quietscope.runner.pyramid import PyramidPlan, PyramidTracker, Tile
from quietscope.tiling import Block, count_blocks, iter_blocks, read_window, reflect_indices, trim_slices  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

TileFunction = Callable[[np.ndarray], np.ndarray]


class ProcessorFactory(Protocol):
    """Picklable recipe for a tile function; ``token`` identifies it (one load per worker)."""

    token: str

    def build(self) -> TileFunction: ...


@dataclass(frozen=True)
class JobSpec:
    """Everything a block task needs besides its block (plain data, pickled once per task).

    ``local_levels`` pyramid levels (1..local_levels) are written by each block task from its own
    output (its blocks are aligned so that it owns whole chunks/shards there); ``level_shapes``
    are the output's level shapes (in ``out_axes``).
    """

    input: ImageRef
    output: str
    out_axes: str
    out_dtype: str
    halo: tuple[int, ...]
    factor: int | tuple[int, ...]  # one per spatial axis, or one for all
    processor: str  # the factory's token
    local_levels: int = 0
    level_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def id(self) -> str:
        """Short id of this job (task keys differ between jobs sharing one scheduler)."""
        return hashlib.sha256(f"{self.output}|{self.processor}".encode()).hexdigest()[:10]


@dataclass(frozen=True)
class BlockTask:
    t: int
    block: Block

    @property
    def key(self) -> str:
        return f"t{self.t}_{self.block.key}"


# ---- the plan, lazily ----------------------------------------------------------------------
def iter_tasks(shape: tuple[int, ...], block: tuple[int, ...], n_t: int, done: set[str] | frozenset[str] = frozenset()) -> Iterator[BlockTask]:
    """Tasks not yet in the ledger, generated lazily (a 10^6-block plan never sits in a list)."""
    for t in range(n_t):
        for b in iter_blocks(shape, block):
            task = BlockTask(t, b)
            if task.key not in done:
                yield task


@lru_cache(maxsize=8)
def _open_cached(ref: ImageRef):
    return open_image(ref.uri, ref.level, ref.axes)


def read_padded(image: Any, t: int, rstart: tuple[int, ...], rstop: tuple[int, ...]) -> np.ndarray:
    """Read ``(C, *window)`` for a window that may extend beyond the volume, filling the
    outside by reflection exactly as ``numpy.pad(mode='reflect')`` would."""
    shape = image.spatial_shape
    idx = [reflect_indices(a, b, n) for a, b, n in zip(rstart, rstop, shape)]
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    raw = image.read_tc(t, tuple(slice(a, b) for a, b in zip(lo, hi)))
    if all(np.array_equal(i, np.arange(a, b)) for i, a, b in zip(idx, lo, hi)):
        return raw
    return raw[np.ix_(range(raw.shape[0]), *[i - a for i, a in zip(idx, lo)])]


def _out_region(job: JobSpec, task: BlockTask, start: tuple[int, ...], stop: tuple[int, ...]) -> tuple[slice, ...]:
    sp = [a for a in job.out_axes if a in "zyx"]
    sl: list[slice] = []
    for a in job.out_axes:
        if a == "t":
            sl.append(slice(task.t, task.t + 1))
        elif a == "c":
            sl.append(slice(None))
        else:
            i = sp.index(a)
            sl.append(slice(start[i], stop[i]))
    return tuple(sl)


#: Values per channel a block task returns for the display windows (a strided subsample).
SAMPLE_PER_BLOCK = 4096


def block_sample(out: np.ndarray, n: int = SAMPLE_PER_BLOCK) -> np.ndarray:
    """``(C, <= n)`` float32 values of a ``(C, ...)`` prediction, strided over the block."""
    flat = out.reshape(out.shape[0], -1)
    step = max(1, flat.shape[1] // n)
    return np.ascontiguousarray(flat[:, ::step][:, :n], dtype=np.float32)


def process_block(job: JobSpec, task: BlockTask, tile_fn: TileFunction, samples: list[np.ndarray] | None = None) -> int:
    """Read block + halo, predict, trim, write exactly the block (and the coarse regions it
    owns), mark it done. Returns voxels written at level 0; appends a value sample of the
    written block to ``samples`` when given."""
    image = _open_cached(job.input)
    b = task.block
    rstart, rstop = read_window(b.start, b.stop, job.halo, job.factor)
    tile = read_padded(image, task.t, rstart, rstop).astype(np.float32, copy=False)
    check_finite(tile, f"input {job.input.uri!r}")
    pred = tile_fn(tile)
    out = pred[(slice(None),) + trim_slices(b.start, b.stop, rstart)]
    out = cast_to(out, job.out_dtype)
    if samples is not None:
        samples.append(block_sample(out))
    data = out if "c" in job.out_axes else out[0]
    if "t" in job.out_axes:
        data = data[None]
    open_level(job.output, 0)[_out_region(job, task, b.start, b.stop)] = data
    sp_axes = [a for a in job.out_axes if a in "zyx"]
    pyr = {job.out_axes.index(a) for a in PYRAMID_AXES if a in job.out_axes}
    start, stop = b.start, b.stop
    for k in range(1, job.local_levels + 1):
        # Same arithmetic as io.writing.build_pyramid on the same (already cast) values.
        data = downsample2(data, pyr, job.level_shapes[k - 1], _out_region(job, task, start, stop), job.out_dtype)
        start = tuple(-(-a // 2) if a_ in PYRAMID_AXES else a for a, a_ in zip(start, sp_axes))
        stop = tuple(-(-a // 2) if a_ in PYRAMID_AXES else a for a, a_ in zip(stop, sp_axes))
        open_level(job.output, k)[_out_region(job, task, start, stop)] = data
    Ledger(job.output).mark_done(task.key)
    return b.size


class ProcessorPlugin(WorkerPlugin):
    """Worker plugin building the tile function once per worker (model loaded once).

    distributed re-runs it on every worker that joins later (e.g. one restarted after a crash).
    """

    def __init__(self, factory: ProcessorFactory) -> None:
        self.factory = factory
        self.name = factory.token
        self.fn: TileFunction | None = None
        #: The storage error a task of this run met on this worker (see ``_faults_returned``).
        self.fault: BaseException | None = None

    def setup(self, worker: Any) -> None:
        self.fn = self.factory.build()

    def teardown(self, worker: Any) -> None:
        self.fn = None


@dataclass(frozen=True)
class StoreFault:
    """A task's storage error, *returned* rather than raised, so that distributed does not rerun
    the task: the store client has already retried each request (botocore, s3fs), and every task
    rerun would wait through those retries again (a vanished store took ~40 s to report). The
    client raises ``error`` as soon as it gathers this."""

    error: BaseException


def _faults_returned(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run the task ``fn(job, ...)``; a storage error (:func:`quietscope.io.stores.is_store_fault`)
    becomes a :class:`StoreFault` result, any other error is raised (and retried by distributed).

    After a fault, the worker's later tasks of the same run return it at once instead of
    touching the store: tasks already queued there would each wait through the client's
    retries, and closing the cluster waits for the running one.
    """

    @functools.wraps(fn)
    def task(job: JobSpec, *args: Any) -> Any:
        plugin = _plugin(job)
        if plugin is not None and plugin.fault is not None:
            return StoreFault(plugin.fault)
        try:
            return fn(job, *args)
        except Exception as exc:
            if not stores.is_store_fault(exc):
                raise
            fault = portable(exc)
            if plugin is not None:
                plugin.fault = fault
            return StoreFault(fault)

    return task


def portable(exc: BaseException) -> BaseException:
    """``exc``, or a plain builtin OSError with its message when ``exc`` does not survive pickling.

    Results of worker processes are pickled; some errors cannot be rebuilt from their pickle
    (zarr's ``ArrayNotFoundError`` formats its arguments again), and the client would get a
    deserialisation failure instead of the storage error.
    """
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError):  # the nearest builtin class keeps its meaning (FileNotFoundError)
            base = next(c for c in type(exc).__mro__ if c.__module__ == "builtins" and issubclass(c, OSError))
            return base(exc.errno, text) if exc.errno else base(text)
        return OSError(f"{type(exc).__name__}: {text}")


def _plugin(job: JobSpec) -> ProcessorPlugin | None:
    """This run's plugin on the worker running the task (None outside a worker, or in a
    lane-only resume, which registers none)."""
    from distributed import get_worker

    try:
        return get_worker().plugins.get(job.processor)
    except ValueError:  # not in a worker
        return None


def raise_fault(result: Any) -> Any:
    """``result``, or its storage error raised when a task returned a :class:`StoreFault`."""
    if isinstance(result, StoreFault):
        raise result.error
    return result


@_faults_returned
def _run_task(job: JobSpec, group: tuple[BlockTask, ...]) -> tuple[int, int, np.ndarray]:
    from distributed import get_worker

    plugin = get_worker().plugins[job.processor]
    if plugin.fn is None:  # plugin registered before this worker finished setup
        plugin.fn = plugin.factory.build()
    # Each block is marked done on its own, so a group cut short by a crash resumes per block.
    samples: list[np.ndarray] = []
    voxels = sum(process_block(job, task, plugin.fn, samples if i < 4 else None) for i, task in enumerate(group))
    return len(group), voxels, np.concatenate(samples, axis=1)


def block_region(job: JobSpec, task: BlockTask, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A block's level-0 region over the output axes, every slice concrete."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(_out_region(job, task, task.block.start, task.block.stop), shape))


def _tile_data(src: Any, plan: PyramidPlan, tile: Tile, dtype: str) -> np.ndarray:
    pyr = {i for i, a in enumerate(plan.axes) if a in PYRAMID_AXES}
    region = plan.source(tile)
    return downsample2(np.asarray(src[region]), pyr, plan.level_shapes[tile.level - 1], region, dtype)


@_faults_returned
def process_tiles(job: JobSpec, plan: PyramidPlan, tiles: tuple[Tile, ...]) -> int:
    """Write coarse pyramid tiles (sources first) from the level below, each marked done after
    its pixels. Tiles smaller than their write unit are gathered per unit: the unit is read
    once, updated and written back once (only this task writes these levels meanwhile)."""
    ledger = Ledger(job.output)
    for level, group in groupby(sorted(tiles, key=lambda t: t.level), key=lambda t: t.level):
        src, dst = open_level(job.output, level - 1, "r"), open_level(job.output, level)
        if not plan.partial(level):
            for tile in group:
                dst[plan.region(level, tile.index)] = _tile_data(src, plan, tile, job.out_dtype)
                ledger.mark_tile_done(tile.key)
            continue
        per_unit: dict[tuple[int, ...], list[Tile]] = {}
        for tile in group:
            per_unit.setdefault(plan.unit_of(tile), []).append(tile)
        for unit, members in per_unit.items():
            ureg = plan.unit_region(level, unit)
            buf = np.asarray(dst[ureg])
            for tile in members:
                reg = plan.region(level, tile.index)
                buf[tuple(slice(r.start - u.start, r.stop - u.start) for r, u in zip(reg, ureg))] = \
                    _tile_data(src, plan, tile, job.out_dtype)
            dst[ureg] = buf
            for tile in members:
                ledger.mark_tile_done(tile.key)
    return len(tiles)


# A distributed task costs about 2-3 ms of scheduler and client time whatever it does
# (measured: benchmarks/scaling.py); beyond this many tasks, blocks are grouped.
MAX_TASKS = 4096


def blocks_per_task(n_blocks: int, slots: int, max_tasks: int = MAX_TASKS, min_tasks_per_slot: int = 4) -> int:
    """How many blocks one distributed task should process.

    One block per task unless the plan has more than ``max_tasks`` blocks; then just enough
    per task to stay under ``max_tasks`` tasks, so a 10^5-block plan does not spend minutes on
    scheduling, but never so many that a worker slot gets fewer than ``min_tasks_per_slot``
    tasks (load balance and a short tail).

    Parameters
    ----------
    n_blocks : int
        Blocks still to do.
    slots : int
        Tasks that can run at once (worker threads, or GPUs).
    """
    if n_blocks <= max_tasks:
        return 1
    k = -(-n_blocks // max_tasks)
    return max(1, min(k, n_blocks // max(1, slots * min_tasks_per_slot)))


def group_tasks(tasks: Iterable[BlockTask], size: int) -> Iterator[tuple[BlockTask, ...]]:
    """Consecutive blocks in groups of ``size`` (the last may be shorter), lazily."""
    it = iter(tasks)
    while group := tuple(islice(it, size)):
        yield group


def stream_tasks(
    client: Any,
    fn: Callable[..., Any],
    args: Iterable[tuple[Any, ...]],
    n_tasks: int,
    key: Callable[[tuple[Any, ...]], str],
    max_in_flight: int,
    resources: dict[str, float] | None = None,
    retries: int = 2,
    on_result: Callable[[Any], None] | None = None,
    progress: bool = False,
    desc: str = "tasks",
    progress_units: Callable[[Any], int] | None = None,
    progress_total: int | None = None,
) -> tuple[int, float]:
    """Run ``fn(*a)`` for each ``a`` of the (lazy) iterable, at most ``max_in_flight`` at once.

    The client holds only the futures in flight (small results, never pixels); each
    completion releases its future and submits the next task. Returns ``(tasks, seconds)``.
    The progress bar counts tasks, or ``progress_units(result)`` per task out of
    ``progress_total`` (e.g. blocks when a task processes several).
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    it = iter(args)
    ac = as_completed(with_results=False)
    submitted = 0

    def submit(n: int) -> None:
        # One client.map call per refill: a batch is one message to the scheduler, not n.
        nonlocal submitted
        batch = list(islice(it, n))
        if not batch:
            return
        cols = list(zip(*batch))
        futs = client.map(fn, *cols, key=[key(a) for a in batch], retries=retries, pure=False, resources=resources)
        ac.update(futs)
        submitted += len(futs)

    t0 = time.perf_counter()
    submit(max_in_flight)
    bar = tqdm(total=progress_total or n_tasks, disable=not progress, desc=desc, unit="block")
    for batch in ac.batches():
        results = client.gather(batch)  # small numbers, never pixels
        for f in batch:
            f.release()
        if on_result is not None:
            for res in results:
                on_result(res)
        bar.update(sum(map(progress_units, results)) if progress_units else len(batch))
        submit(len(batch))
    bar.close()
    return submitted, time.perf_counter() - t0


@dataclass
class Pyramid:
    """The progressive pyramid of a run: its plan, its tracker, the tiles ready to write now."""

    plan: PyramidPlan
    tracker: PyramidTracker
    pending: list[Tile]

    @classmethod
    def start(cls, plan: PyramidPlan, level0_done: Iterable[tuple[slice, ...]], tiles_done: Iterable[str]) -> Pyramid:
        """Replay the ledger (finished blocks, finished tiles) into a tracker (``--resume``)."""
        tracker = PyramidTracker(plan, tiles_done)
        pending = [t for region in level0_done for t in tracker.block_done(region)]
        return cls(plan, tracker, pending)


@dataclass
class RunState:
    """What the client knows while the run streams (read by ``on_progress``)."""

    blocks_done: int = 0
    tiles_done: int = 0
    voxels: int = 0
    samples: list[np.ndarray] | None = None
    t_level0: float = 0.0


class _Stream:
    """Block tasks (bounded in flight) and one lane of coarse-tile tasks on one ``as_completed``."""

    def __init__(self, client: Any, job: JobSpec, groups: Iterator[tuple[BlockTask, ...]], limit: int,
                 resources: dict[str, float] | None, retries: int, pyramid: Pyramid | None) -> None:
        from distributed import as_completed

        self.client, self.job, self.groups, self.limit = client, job, groups, limit
        self.resources, self.retries, self.pyramid = resources, retries, pyramid
        self.ac = as_completed(with_results=False)
        self.meta: dict[str, tuple[str, Any]] = {}
        self.lane: Any = None
        self.n_lane = 0
        self.submitted = 0

    def submit_blocks(self, n: int) -> None:
        # One client.map call per refill: a batch is one message to the scheduler, not n.
        batch = list(islice(self.groups, n))
        if not batch:
            return
        keys = [f"block-{self.job.id}-{g[0].key}-{len(g)}" for g in batch]
        futs = self.client.map(_run_task, [self.job] * len(batch), batch, key=keys, retries=self.retries,
                               pure=False, resources=self.resources)
        for f, g in zip(futs, batch):
            self.meta[f.key] = ("blocks", g)
        self.ac.update(futs)
        self.submitted += len(futs)

    def submit_lane(self) -> None:
        if self.pyramid is None or self.lane is not None or not self.pyramid.pending:
            return
        tiles = tuple(self.pyramid.tracker.closure(self.pyramid.pending))
        self.pyramid.pending = []
        self.n_lane += 1
        # Priority over blocks: the coarse levels keep up with level 0 instead of waiting for its end.
        self.lane = self.client.submit(process_tiles, self.job, self.pyramid.plan, tiles, key=f"tiles-{self.job.id}-{self.n_lane}",
                                       retries=self.retries, pure=False, priority=10)
        self.meta[self.lane.key] = ("tiles", tiles)
        self.ac.add(self.lane)


def run_blocks(
    client: Any,
    job: JobSpec,
    factory: ProcessorFactory,
    tasks: Iterable[BlockTask],
    n_tasks: int,
    max_in_flight: int | None = None,
    progress: bool = True,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    group: int | None = None,
    pyramid: Pyramid | None = None,
    on_progress: Callable[[RunState], None] | None = None,
) -> dict[str, float]:
    """Submit tasks in a bounded stream and wait for all; returns throughput figures.

    When the cluster's workers declare a ``GPU`` resource, each task requests ``GPU=1`` so two
    tasks never share a device (pass ``resources`` to override). ``group`` blocks go into one
    distributed task (default: :func:`blocks_per_task`). With ``pyramid``, every coarse tile is
    written as soon as its sources are (one lane task at a time, see ``runner.pyramid``);
    ``on_progress`` is called after every batch of results (rate-limit it there).
    """
    if n_tasks > 0:  # a resume with only coarse tiles left loads no model
        client.register_plugin(ProcessorPlugin(factory), name=factory.token)
    if resources is None and gpu_resources(client):
        resources = {"GPU": 1}
    workers = worker_info(client)
    nthreads = sum(w.get("nthreads", 1) for w in workers.values()) or 1
    if resources and "GPU" in resources:
        nthreads = max(1, sum(int((w.get("resources") or {}).get("GPU", 0)) for w in workers.values()))
    size = group or blocks_per_task(n_tasks, nthreads)
    limit = max_in_flight or max(4, 2 * nthreads)
    if size > 1:
        log.info("%d blocks in %d tasks of %d blocks (caps scheduling overhead at ~%d tasks)", n_tasks, -(-n_tasks // size), size, MAX_TASKS)
    state = RunState(samples=[])
    t0 = time.perf_counter()
    stream = _Stream(client, job, group_tasks(tasks, size), limit, resources, retries, pyramid)
    _drain(stream, state, n_tasks, progress, on_progress, t0)
    elapsed = time.perf_counter() - t0
    if n_tasks > 0:
        client.unregister_worker_plugin(factory.token)
    log.debug("%d tasks streamed with at most %d in flight in %.2f s", stream.submitted, limit, elapsed)
    level0 = state.t_level0 if state.t_level0 else elapsed
    return {"seconds": level0, "seconds_pyramid": max(0.0, elapsed - level0), "voxels": float(state.voxels),
            "voxels_per_s": state.voxels / max(level0, 1e-9), "blocks": n_tasks, "tasks": stream.submitted,
            "blocks_per_task": size, "tiles": state.tiles_done, "lane_tasks": stream.n_lane}


def _drain(stream: _Stream, state: RunState, n_tasks: int, progress: bool,
           on_progress: Callable[[RunState], None] | None, t0: float) -> None:
    from tqdm.auto import tqdm

    stream.submit_blocks(stream.limit)
    stream.submit_lane()
    if n_tasks == 0:
        state.t_level0 = 1e-9
    bar = tqdm(total=n_tasks, disable=not progress, desc="predict", unit="block")
    shape0 = stream.pyramid.plan.level_shapes[0] if stream.pyramid else ()
    for batch in stream.ac.batches():
        results = [raise_fault(r) for r in stream.client.gather(batch)]  # small numbers and value samples, never pixels
        freed = 0
        for f, res in zip(batch, results):
            kind, payload = stream.meta.pop(f.key)
            f.release()
            if kind == "tiles":
                stream.lane = None
                state.tiles_done += res
                continue
            freed += 1
            state.blocks_done += res[0]
            state.voxels += res[1]
            bar.update(res[0])
            if state.samples is not None:
                state.samples.append(res[2])
            if stream.pyramid is not None:
                for task in payload:
                    stream.pyramid.pending.extend(stream.pyramid.tracker.block_done(block_region(stream.job, task, shape0)))
        stream.submit_blocks(freed)
        if state.blocks_done >= n_tasks and not state.t_level0:
            state.t_level0 = time.perf_counter() - t0
        stream.submit_lane()
        if on_progress is not None:
            on_progress(state)
    bar.close()
