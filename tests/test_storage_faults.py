"""Storage that fails and writers that collide: one writer per output (the lock), "complete" only
when every block and chunk is stored, and each storage fault one line and a prompt exit.

Faults are real: read-only and tiny tmpfs mounts, immutable folders, dropped capabilities, a closed
port. Tests that need root (mount, chattr) skip with a message elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from box_job import run_box_job
from helpers import read_levels, write_zarr_array
from quietscope.errors import OutputError, StorageError
from quietscope.io.writing import OutputSpec, create_ome_zarr
from quietscope.runner.ledger import JOB_ATTR, Ledger
from quietscope.runner.ledger import _host_id as host_id

SHAPE, CHUNKS, BLOCK = (96, 128), (16, 16), (32, 32)  # 12 blocks, 4 levels (1 streamed)
OPTS = dict(chunks=CHUNKS, block=BLOCK, progress=False)
BOX_JOB = str(Path(__file__).with_name("box_job.py"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / d) for d in ("src", "cli", "tests")])}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    data = (100 + 20 * np.random.default_rng(7).standard_normal(SHAPE)).astype(np.float32)
    src = write_zarr_array(d / "in.zarr", data, (32, 32))
    ref_out = d / "reference.ome.zarr"
    run_box_job(src, str(ref_out), OPTS)
    return src, read_levels(ref_out)


def _same(path: Path, ref: list[np.ndarray]) -> None:
    got = read_levels(path)
    assert len(got) == len(ref)
    for k, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(g, r, err_msg=f"level {k}")


def _start(src: str, out: Path, sleep: float, **opts) -> subprocess.Popen:
    job = {"input_uri": src, "output": str(out), "options": {**OPTS, "threads": 1, **opts}, "processor": {"sleep": sleep}}
    return subprocess.Popen([sys.executable, BOX_JOB, json.dumps(job)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("timed out")


def _n_done(out: Path) -> int:
    d = out / ".quietscope" / "done"
    return sum(1 for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else 0


# ---- one writer per output -------------------------------------------------------------------
def test_second_writer_refused_first_completes_bit_identical(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    a = _start(src, out, sleep=0.3)
    try:
        _wait_for(lambda: _n_done(out) >= 1, a)
        for extra in ({}, {"overwrite": True}, {"resume": True}):
            t0 = time.monotonic()
            with pytest.raises(OutputError) as err:
                run_box_job(src, str(out), {**OPTS, **extra})
            msg = str(err.value)
            assert "being written by another quietscope job" in msg and f"pid {a.pid}" in msg and "\n" not in msg, extra
            assert time.monotonic() - t0 < 10
        assert a.wait(timeout=120) == 0, a.stderr.read().decode()[-2000:]
    finally:
        a.kill()
        a.wait()
    assert Ledger(out).job()["complete"] is True and not (out / ".quietscope").exists()
    _same(out, ref)


def test_two_plain_runs_started_together_one_wins(source, tmp_path):
    """The lock is taken atomically: of two runs racing for a new output exactly one proceeds."""
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    results: dict[int, object] = {}

    def go(i: int) -> None:
        try:
            results[i] = run_box_job(src, str(out), {**OPTS, "threads": 1}, {"sleep": 0.02})
        except OutputError as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results.values() if isinstance(r, OutputError)]
    assert len(results) == 2 and len(errors) == 1, results
    assert "being written by another quietscope job" in str(errors[0]) or "already exists" in str(errors[0])
    _same(out, ref)


def test_lock_of_a_killed_job_is_taken_over_at_once_on_its_host(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    a = _start(src, out, sleep=0.2)
    try:
        _wait_for(lambda: _n_done(out) >= 2, a)
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        a.kill()
        a.wait()
    assert (out / ".quietscope" / "lock.json").exists()  # no cleanup on SIGKILL
    t0 = time.monotonic()
    res = run_box_job(src, str(out), {**OPTS, "resume": True})
    assert res.n_done_before >= 2 and time.monotonic() - t0 < 60
    _same(out, ref)


def test_chunk_deleted_during_the_run_is_found_and_resume_restores_it(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    victim = out / "0" / "c" / "0" / "0"  # level 0, first chunk: written by the first block

    def delete_when_done() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / ".quietscope" / "done" / "t0_0_0").exists() and victim.exists():
                victim.unlink()
                return
            time.sleep(0.002)

    t = threading.Thread(target=delete_when_done)
    t.start()
    with pytest.raises(StorageError, match="incomplete after the run") as err:
        run_box_job(src, str(out), {**OPTS, "threads": 1}, {"sleep": 0.05})
    t.join()
    assert "\n" not in str(err.value) and "--resume" in str(err.value)
    assert not victim.exists() and Ledger(out).job()["complete"] is False  # never marked complete
    assert "t0_0_0" not in Ledger(out).done()
    res = run_box_job(src, str(out), {**OPTS, "resume": True})
    assert res.n_done_before == 11
    _same(out, ref)
    assert Ledger(out).job()["complete"] is True


def test_chunk_deleted_from_a_killed_job_is_redone_on_resume(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    a = _start(src, out, sleep=0.2)
    try:
        _wait_for(lambda: _n_done(out) >= 3, a)
        a.send_signal(signal.SIGKILL)
    finally:
        a.kill()
        a.wait()
    done = Ledger(out).done()
    assert "t0_0_0" in done
    (out / "0" / "c" / "0" / "0").unlink()  # a finished block's level-0 chunk
    (out / "1" / "c" / "0" / "0").unlink()  # and its streamed level-1 chunk
    res = run_box_job(src, str(out), {**OPTS, "resume": True})
    assert res.n_done_before == len(done) - 1
    _same(out, ref)


def test_chunk_deleted_from_a_complete_output_is_repaired_by_resume(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    run_box_job(src, str(out), OPTS)
    (out / "0" / "c" / "2" / "3").unlink()  # block (1, 1)
    (out / "3" / "c" / "0" / "0").unlink()  # the coarsest level, built after level 0
    res = run_box_job(src, str(out), {**OPTS, "resume": True})
    assert res.n_done_before == 11
    _same(out, ref)
    assert zarr.open_group(str(out), mode="r").attrs[JOB_ATTR]["complete"] is True


def test_every_chunk_is_stored_even_when_empty(tmp_path):
    """Verification counts chunks: an all-fill chunk must be stored, or it would look deleted."""
    src = write_zarr_array(tmp_path / "zeros.zarr", np.zeros((64, 64), np.float32), (32, 32))
    out = tmp_path / "z.ome.zarr"
    run_box_job(src, str(out), {**OPTS, "block": (32, 32)}, {"scale": 0.0, "offset": 0.0})
    assert len([p for p in (out / "0" / "c").rglob("*") if p.is_file()]) == 16  # 64x64 in 16x16 chunks, all zero
    assert zarr.open_group(str(out), mode="r").attrs[JOB_ATTR]["complete"] is True


# ---- resumable from the first second ----------------------------------------------------------
def test_output_with_only_a_dead_lock_is_resumed_from_scratch(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    (out / ".quietscope").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"token": "x", "pid": int(dead.stdout), "host_id": host_id(), "heartbeat": time.time(), "owner": "someone"}
    (out / ".quietscope" / "lock.json").write_text(json.dumps(lock))
    run_box_job(src, str(out), {**OPTS, "resume": True})
    _same(out, ref)


def test_metadata_without_ledger_from_an_older_run_is_resumed(source, tmp_path):
    """Killed after the metadata, before the ledger (what quietscope did before the job record
    came first): no block can have run, so --resume starts it afresh instead of refusing."""
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    create_ome_zarr(OutputSpec(path=str(out), axes="yx", shape=SHAPE, chunks=CHUNKS, provenance={"test": "box"}))
    run_box_job(src, str(out), {**OPTS, "resume": True})
    _same(out, ref)


def test_killed_in_its_first_moments_is_resumable(source, tmp_path):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    a = _start(src, out, sleep=0.2)
    try:
        _wait_for(lambda: out.exists(), a)  # whatever exists at that moment
        a.send_signal(signal.SIGKILL)
    finally:
        a.kill()
        a.wait()
    run_box_job(src, str(out), {**OPTS, "resume": True})
    _same(out, ref)
