"""Parallel, read-ahead patch pools for training on stores far larger than memory.

Reading patches from a compressed zarr store costs chunk reads and decompression (which release
the GIL), so a few threads read one pool several times faster than one, and the next pool can
be read while the network trains on the current one.

Pools are a pure function of ``(seed, pool index)``: pool ``i`` is split into ``workers`` parts,
part ``j`` drawn with ``numpy.random.default_rng([seed, i, j])``. The result therefore does not
depend on thread timing, and a resumed training run (which knows its pool index) reads exactly
the pools an uninterrupted one would.

``training/loop.py`` draws pool ``step // checkpoint_every`` from a :class:`PoolPrefetcher`, so
pool ``i + 1`` is read while the network trains on pool ``i``.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np


def _parts(n: int, k: int) -> list[int]:
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    return [base + (1 if j < extra else 0) for j in range(k)]


def sample_pool(sampler: Any, n: int, seed: int, index: int, workers: int = 4,
                executor: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Pool ``index`` of ``n`` patches, read by ``workers`` threads (deterministic in seed/index)."""
    sizes = _parts(n, workers)
    rngs = [np.random.default_rng([seed, index, j]) for j in range(len(sizes))]
    if executor is None or len(sizes) == 1:
        parts = [sampler.sample(s, r) for s, r in zip(sizes, rngs)]
    else:
        parts = list(executor.map(lambda sr: sampler.sample(*sr), zip(sizes, rngs)))
    return np.concatenate(parts, axis=0)


class PoolPrefetcher:
    """``get(i)`` returns pool ``i`` and starts reading pool ``i + 1`` in the background."""

    def __init__(self, sampler: Any, pool_size: int, seed: int = 0, workers: int = 4, ahead: int = 1,
                 count: int | None = None) -> None:
        self.sampler, self.pool_size, self.seed = sampler, int(pool_size), int(seed)
        self.count = count  # pools 0..count-1 exist; none beyond is read ahead
        self.workers = max(1, int(workers))
        self.ahead = max(0, int(ahead))
        # One thread per part plus the read-ahead coordinators.
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="qs-patches")
        self._outer = ThreadPoolExecutor(max_workers=max(1, self.ahead), thread_name_prefix="qs-prefetch")
        self._pending: dict[int, Future] = {}

    def _submit(self, i: int) -> None:
        if i not in self._pending and (self.count is None or i < self.count):
            self._pending[i] = self._outer.submit(sample_pool, self.sampler, self.pool_size, self.seed, i,
                                                  self.workers, self._pool)

    def get(self, i: int) -> np.ndarray:
        self._submit(i)
        for j in range(i + 1, i + 1 + self.ahead):
            self._submit(j)
        for j in [j for j in self._pending if j < i]:
            self._pending.pop(j).cancel()
        return self._pending.pop(i).result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._outer.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PoolPrefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def patches_per_second(sampler: Any, n: int, workers: int, seed: int = 0, repeats: int = 2) -> float:
    """Measured patch-reading rate with ``workers`` threads (best of ``repeats`` pools)."""
    import time

    best = math.inf
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for r in range(repeats):
            t0 = time.perf_counter()
            sample_pool(sampler, n, seed, r, workers, ex if workers > 1 else None)
            best = min(best, time.perf_counter() - t0)
    return n / best
