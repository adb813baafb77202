"""Helpers shared by the benchmark scripts: machine description, JSON output, timing, tables."""

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
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


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


def run_in_processes(fn: Any, tasks: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Run ``fn(task)`` (which returns a list of rows) for every task in ``jobs`` spawned
    processes; print and collect the rows as they finish. A failed task is reported and
    skipped, so it does not lose the others' results."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    rows: list[dict[str, Any]] = []
    # spawn, not fork: a forked child inherits the parent's threads' locks (dask, torch).
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        for f in as_completed([ex.submit(fn, t) for t in tasks]):
            try:
                got = f.result()
            except Exception as exc:
                print(f"task failed: {exc!r}", flush=True)
                continue
            rows.extend(got)
            for r in got:
                print(r, flush=True)
    return rows
