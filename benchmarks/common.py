"""The reporting half of the benchmark harness: machine description, JSON output, timing, tables,
the process pool. Import it through :mod:`benchmarks.harness`; it imports nothing of quietscope."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (reported next to every table)."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        torch_version = torch.__version__
    except Exception:  # a benchmark without torch still reports its machine
        gpu, torch_version = None, None
    return {
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch_version,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
    }


def command_line() -> str:
    """The command that started this process, as typed: ``python -m benchmarks.quality --quick``
    (``sys.argv[0]`` alone would give the module's file path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *script, *sys.argv[1:]])


def write_json(path: str | Path, data: Any) -> None:
    """JSON with NaN/inf as null and numpy scalars as plain numbers; written atomically."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, float)):
            return float(v) if np.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=2))
    tmp.replace(path)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0


def fmt_mean_sem(mean: float | None, sem: float | None, digits: int = 2) -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    if sem is None or not np.isfinite(sem):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_in_processes(fn: Any, tasks: list[dict[str, Any]], jobs: int, *, initializer: Any = None,
                     ordered: bool = False, echo: bool = True, on_rows: Any = None,
                     stop_at: float | None = None, on_stop: Any = None) -> list[dict[str, Any]]:
    """Run ``fn(task)`` (which returns a list of rows) for every task in ``jobs`` spawned
    processes; collect (and with ``echo`` print) the rows as they finish. A failed task is
    reported and skipped, so it does not lose the others' results.

    ``initializer``: run once in every worker. ``ordered``: rows in the order of ``tasks``
    (else as they finish). ``on_rows(k, rows)``: called after the k-th finished task.
    ``stop_at``: a ``time.perf_counter()`` time after which tasks not yet started are cancelled
    (``on_stop(n_cancelled)`` is told once); the finished ones keep their rows.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    rows: list[dict[str, Any]] = []
    stopped = False
    # spawn, not fork: a forked child inherits the parent's threads' locks (dask, torch).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, initializer=initializer, mp_context=ctx) as ex:
        futures = [ex.submit(fn, t) for t in tasks]
        for k, f in enumerate(futures if ordered else as_completed(futures), 1):
            if stop_at is not None and not stopped and time.perf_counter() > stop_at:
                stopped = True
                n_cancelled = sum(g.cancel() for g in futures)
                if on_stop is not None:
                    on_stop(n_cancelled)
            if f.cancelled():
                continue
            try:
                got = f.result()
            except Exception as exc:
                print(f"task failed: {exc!r}", flush=True)
                continue
            rows.extend(got)
            if echo:
                for r in got:
                    print(r, flush=True)
            if on_rows is not None:
                on_rows(k, got)
    return rows
