"""Keeping a CPU worker's heap within its memory plan (glibc's mmap threshold).

The planner bounds the bytes a task allocates (:class:`quietscope.tiling.MemoryProfile`), but
glibc's allocator raises its mmap threshold each time a large block is freed, up to 32 MB. After
that, the many 1–32 MB tensors of a streamed pass come from the heap, and a freed hole there is not
returned to the system. Measured on a 32-filter 3D U-Net over 64×256² blocks, the peak RSS then
varied from 1.78 to 2.11 GB between identical runs, with 1.32 GB predicted per task. With the
threshold fixed at 4 MB it was 1.42–1.46 GB, at about 7 % more time (docs/benchmarks.md §9c).
Why hand-written: torch does not set this. distributed's nanny starts worker processes with
``MALLOC_TRIM_THRESHOLD_``; any such variable also turns glibc's dynamic threshold off, which
leaves it at 128 KB there. Local workers get this module's threshold through the same pre-spawn
environment (``runner/cluster.py``), so they behave as the single process that was measured.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["DEFAULT_MMAP_THRESHOLD", "ENV_VAR", "bound_heap", "heap_env", "peak_rss_bytes"]

log = logging.getLogger(__name__)

#: Allocations at least this large are mapped and unmapped on their own (returned when freed).
DEFAULT_MMAP_THRESHOLD = 4 * 2**20
#: Bytes, or 0 to leave the allocator's own (dynamic) threshold.
ENV_VAR = "QUIETSCOPE_MMAP_THRESHOLD"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def mmap_threshold() -> int:
    """The threshold to apply: ``$QUIETSCOPE_MMAP_THRESHOLD`` if set, else :data:`DEFAULT_MMAP_THRESHOLD`."""
    value = os.environ.get(ENV_VAR, "").strip()
    return int(value) if value else DEFAULT_MMAP_THRESHOLD


def bound_heap(threshold: int | None = None) -> int:
    """Fix glibc's mmap threshold in this process (Linux only; elsewhere a no-op).

    Parameters
    ----------
    threshold : int, optional
        Bytes; default :func:`mmap_threshold`. 0 leaves the allocator as it is.

    Returns
    -------
    int
        The threshold applied, 0 when none was (disabled, not glibc, or refused).
    """
    threshold = mmap_threshold() if threshold is None else int(threshold)
    if threshold <= 0 or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return 0
    try:
        ok = ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # musl or another libc: nothing to set
        return 0
    return threshold if ok == 1 else 0


def heap_env(threshold: int | None = None) -> dict[str, str]:
    """Environment for worker processes with the same threshold, which glibc reads at start."""
    threshold = mmap_threshold() if threshold is None else int(threshold)
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(threshold)}


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident memory of this process's own address space so far, in bytes.

    ``pid`` asks the same of another process (a benchmark polling its child): 0 once it has
    gone, or where there is no ``/proc``.

    On Linux this is ``VmHWM`` of ``/proc/self/status``. Not ``getrusage``'s ``ru_maxrss``: the
    kernel carries that across ``fork`` and ``exec``, so a process started by a large parent
    (a benchmark that has just held a volume, a scheduler) reports at least the parent's peak.
    A CLI child of a 2 GB benchmark process reported 2065 MB while its own peak was 1376 MB
    (docs/benchmarks.md §9f). Elsewhere (macOS) ``ru_maxrss``, which is bytes there.
    """
    try:
        with open(f"/proc/{'self' if pid is None else int(pid)}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid is not None:
        return 0
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
