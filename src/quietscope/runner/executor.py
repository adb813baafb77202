"""Run a block plan on a dask cluster: bounded in-flight, one processor per worker, ledger, progress.

The runner never knows which method it runs: it gets a *processor factory* (picklable,
holding e.g. a model path) that each worker turns into a function ``tile -> prediction`` once,
through a worker plugin. Tasks carry only block coordinates, never pixels or weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from quietscope.io.reading import ImageRef, open_image
from quietscope.io.validation import check_finite
from quietscope.io.writing import cast_to, open_level
from quietscope.runner.ledger import Ledger
from quietscope.tiling import Block, read_window, reflect_indices, trim_slices

log = logging.getLogger(__name__)

TileFunction = Callable[[np.ndarray], np.ndarray]


class ProcessorFactory(Protocol):
    """Picklable recipe for a tile function; ``token`` identifies it (one load per worker)."""

    token: str

    def build(self) -> TileFunction: ...


@dataclass(frozen=True)
class JobSpec:
    """Everything a block task needs besides its block (plain data, pickled once per task)."""

    input: ImageRef
    output: str
    out_axes: str
    out_dtype: str
    halo: tuple[int, ...]
    factor: int
    processor: str  # the factory's token


@dataclass(frozen=True)
class BlockTask:
    t: int
    block: Block

    @property
    def key(self) -> str:
        return f"t{self.t}_{self.block.key}"


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


def process_block(job: JobSpec, task: BlockTask, tile_fn: TileFunction) -> int:
    """Read block + halo, predict, trim, write exactly the block, mark it done. Returns voxels written."""
    image = _open_cached(job.input)
    b = task.block
    rstart, rstop = read_window(b.start, b.stop, job.halo, job.factor)
    tile = read_padded(image, task.t, rstart, rstop).astype(np.float32, copy=False)
    check_finite(tile, f"input {job.input.uri!r}")
    pred = tile_fn(tile)
    out = pred[(slice(None),) + trim_slices(b.start, b.stop, rstart)]
    out = cast_to(out, job.out_dtype)
    dst = open_level(job.output, 0)
    sl: list[Any] = []
    for a in job.out_axes:
        if a == "t":
            sl.append(slice(task.t, task.t + 1))
        elif a == "c":
            sl.append(slice(None))
        else:
            sl.append(b.slices()[[x for x in job.out_axes if x in "zyx"].index(a)])
    data = out if "c" in job.out_axes else out[0]
    if "t" in job.out_axes:
        data = data[None]
    dst[tuple(sl)] = data
    Ledger(job.output).mark_done(task.key)
    return b.size


class ProcessorPlugin:
    """Worker plugin building the tile function once per worker (model loaded once)."""

    def __init__(self, factory: ProcessorFactory) -> None:
        self.factory = factory
        self.name = factory.token
        self.fn: TileFunction | None = None

    def setup(self, worker: Any) -> None:
        self.fn = self.factory.build()

    def teardown(self, worker: Any) -> None:
        self.fn = None


def _run_task(job: JobSpec, task: BlockTask) -> int:
    from distributed import get_worker

    plugin = get_worker().plugins[job.processor]
    if plugin.fn is None:  # plugin registered before this worker finished setup
        plugin.fn = plugin.factory.build()
    return process_block(job, task, plugin.fn)


def run_blocks(
    client: Any,
    job: JobSpec,
    factory: ProcessorFactory,
    tasks: Iterable[BlockTask],
    n_tasks: int,
    max_in_flight: int | None = None,
    progress: bool = True,
    retries: int = 2,
) -> dict[str, float]:
    """Submit tasks in a bounded stream and wait for all; returns throughput figures."""
    from distributed import WorkerPlugin, as_completed
    from tqdm.auto import tqdm

    # Subclassing at call time keeps the plugin importable without distributed installed.
    plugin_cls = type("QuietscopeProcessorPlugin", (ProcessorPlugin, WorkerPlugin), {})
    client.register_plugin(plugin_cls(factory), name=factory.token)
    n_workers = max(1, len(client.scheduler_info()["workers"]))
    nthreads = sum(client.nthreads().values()) or n_workers
    limit = max_in_flight or max(4, 2 * nthreads)
    it = iter(tasks)
    ac = as_completed()
    submitted = 0

    def submit_next() -> bool:
        nonlocal submitted
        task = next(it, None)
        if task is None:
            return False
        ac.add(client.submit(_run_task, job, task, key=f"block-{job.processor[:8]}-{task.key}", retries=retries, pure=False))
        submitted += 1
        return True

    for _ in range(limit):
        if not submit_next():
            break
    t0 = time.perf_counter()
    voxels = 0
    bar = tqdm(total=n_tasks, disable=not progress, desc="predict", unit="block")
    for fut in ac:
        voxels += fut.result()
        fut.release()
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{voxels / max(elapsed, 1e-9):.3g} voxel/s")
        bar.update(1)
        submit_next()
    bar.close()
    elapsed = time.perf_counter() - t0
    client.unregister_worker_plugin(factory.token)
    return {"seconds": elapsed, "voxels": float(voxels), "voxels_per_s": voxels / max(elapsed, 1e-9), "blocks": submitted}


def tasks_for(blocks: list[Block], n_t: int, done: set[str]) -> Iterator[BlockTask]:
    """Tasks not yet in the ledger, generated lazily (a huge plan never sits in a list)."""
    for t in range(n_t):
        for b in blocks:
            task = BlockTask(t, b)
            if task.key not in done:
                yield task
