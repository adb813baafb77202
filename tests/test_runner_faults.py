"""Real worker processes: one model load per worker, a worker dying mid-run, the client killed
mid-run and resumed, and a resumed finished job writing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from box_job import run_box_job
from helpers import read_levels, write_zarr_array
from quietscope.inference import predict_whole
from quietscope.runner.cluster import dask_client, worker_info
from quietscope.runner.executor import BlockTask, blocks_per_task, group_tasks, iter_tasks
from quietscope.runner.ledger import Ledger
from quietscope.runner.testing import BoxProcessor, torch_threads

SHAPE, CHUNKS, BLOCK = (96, 128), (16, 16), (32, 32)  # 12 blocks; levels 1 streamed, 2..3 after
OPTS = dict(chunks=CHUNKS, block=BLOCK, progress=False)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes on 127.0.0.1, as ``--workers 2`` makes them."""
    with dask_client(workers=2) as client:
        yield client


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    data = (100 + 20 * np.random.default_rng(7).standard_normal(SHAPE)).astype(np.float32)
    src = write_zarr_array(d / "in.zarr", data, (32, 32))
    ref_out = d / "reference.ome.zarr"
    run_box_job(src, str(ref_out), OPTS)  # in-process, uninterrupted
    ref = read_levels(ref_out)
    np.testing.assert_array_equal(ref[0], predict_whole(BoxProcessor().apply, data[None], (1, 1), 1)[0])
    return src, ref


def _assert_same(path: Path, ref: list[np.ndarray]) -> None:
    got = read_levels(path)
    assert len(got) == len(ref) == 4
    for k, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(g, r, err_msg=f"level {k}")


def test_blocks_grouped_only_for_large_plans_and_never_starving_workers():
    assert blocks_per_task(4096, 2) == 1
    assert blocks_per_task(100_000, 2) == 25  # 4000 tasks
    assert -(-100_000 // blocks_per_task(100_000, 2)) <= 4096
    assert blocks_per_task(10_000, 2, max_tasks=8) == 10_000 // 8  # >= 4 tasks per slot wins
    assert blocks_per_task(10, 100, max_tasks=2) == 1
    groups = list(group_tasks(iter_tasks((10, 10), (3, 3), 2), 5))
    assert [len(g) for g in groups] == [5, 5, 5, 5, 5, 5, 2]
    flat = [t for g in groups for t in g]
    assert flat == list(iter_tasks((10, 10), (3, 3), 2)) and isinstance(flat[0], BlockTask)


def test_worker_processes_on_loopback_with_one_torch_thread(cluster):
    workers = worker_info(cluster)
    assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())  # 2 cores // 2 workers
    assert cluster.scheduler.address.startswith("tcp://127.0.0.1:")
    assert all(a.startswith("tcp://127.0.0.1:") for a in workers)
    assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    assert len({w["pid"] if "pid" in w else a for a, w in workers.items()}) == 2
    assert set(cluster.run(torch_threads).values()) == {1}
    assert set(cluster.run(os.getpid).values()) != {os.getpid()}  # real processes


def test_model_loaded_once_per_worker(cluster, source, tmp_path):
    src, ref = source
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    out = tmp_path / "out.ome.zarr"
    run_box_job(src, str(out), {**OPTS, "scheduler": cluster.scheduler.address}, dict(sleep=0.05, log_dir=str(log_dir)))
    loads = Counter(f.name.split("-")[1] for f in log_dir.glob("load-*"))
    calls = Counter(f.name.split("-")[1] for f in log_dir.glob("call-*"))
    worker_pids = {str(p) for p in cluster.run(os.getpid).values()}
    assert set(loads) == worker_pids and set(loads.values()) == {1}  # one load per worker, not per block
    assert sum(calls.values()) == 12 and set(calls) <= set(loads)
    _assert_same(out, ref)


@pytest.mark.parametrize("group", [1, 5])
def test_worker_killed_mid_run_completes_identically(cluster, source, tmp_path, group):
    src, ref = source
    crash = tmp_path / "crash"
    crash.mkdir()
    pids_before = set(cluster.run(os.getpid).values())
    out = tmp_path / "out.ome.zarr"
    opts = {**OPTS, "scheduler": cluster.scheduler.address, "blocks_per_task": group}
    res = run_box_job(src, str(out), opts, dict(sleep=0.05, crash_dir=str(crash)))
    dead = int((crash / "crashed").read_text())
    assert dead in pids_before  # a real worker process died with os._exit mid-task
    assert res.n_blocks == 12 and Ledger(out).job()["complete"] is True
    _assert_same(out, ref)
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarted it
    assert dead not in set(cluster.run(os.getpid).values())


@pytest.mark.parametrize("k, group", [(1, 1), (7, 1), (4, 5)])
def test_client_killed_after_k_blocks_then_resume_is_bit_identical(source, tmp_path, k, group):
    """With ``group`` > 1 the kill lands inside multi-block tasks; the resume runs ungrouped."""
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    job = {"input_uri": src, "output": str(out), "options": {**OPTS, "threads": 2, "blocks_per_task": group},
           "processor": {"sleep": 0.15}}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("box_job.py")), json.dumps(job)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = out / ".quietscope" / "done"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.exists() and sum(1 for p in done_dir.iterdir() if not p.name.startswith(".")) >= k:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished (or failed) before it could be killed"
        proc.send_signal(signal.SIGKILL)  # no cleanup, no finally: like a lost node or kill -9
    finally:
        proc.kill()
        proc.wait()
    n_done = len(Ledger(out).done())
    assert k <= n_done < 12
    # Everything a viewer needs existed before the first block: all levels and omero windows.
    group = zarr.open_group(str(out), mode="r")
    assert sorted(group.array_keys()) == ["0", "1", "2", "3"]
    assert group.attrs["ome"]["omero"]["channels"][0]["window"]["end"] > 100
    assert Ledger(out).job()["complete"] is False
    res = run_box_job(src, str(out), {**OPTS, "resume": True})
    assert res.n_done_before == n_done
    _assert_same(out, ref)
    assert Ledger(out).job()["complete"] is True
    # Finished: the ledger folder is gone, its record is in the group's attributes, and zarr
    # lists the output without "not recognized as a component of a Zarr hierarchy" warnings.
    assert not (out / ".quietscope").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(zarr.open_group(str(out), mode="r").array_keys()) == ["0", "1", "2", "3"]


def test_resume_of_a_finished_job_writes_nothing_and_runs_no_task(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    run_box_job(src, str(out), OPTS)
    before = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    assert len(before) > 12
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    time.sleep(0.01)
    res = run_box_job(src, str(out), {**OPTS, "resume": True}, dict(log_dir=str(log_dir)))
    after = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # not a byte, not a timestamp
    assert list(log_dir.iterdir()) == []  # no model load, no tile predicted
    assert res.n_done_before == res.n_blocks == 12
