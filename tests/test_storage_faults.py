"""Storage that fails and writers that collide: one writer per output (the lock), "complete" only
when every block and chunk is stored, and each storage fault one line and a prompt exit.

Faults are real: read-only and tiny tmpfs mounts, immutable folders, dropped capabilities, a closed
port. Tests that need root (mount, chattr) skip with a message elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from box_job import run_box_job
from helpers import read_levels, write_zarr_array
from quietscope.errors import OutputError, StorageError
from quietscope.io.writing import OutputSpec, create_ome_zarr
from quietscope.runner.ledger import JOB_ATTR, Ledger
from quietscope.runner.ledger import _host_id as host_id
from quietscope_cli.main import cli

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


def test_second_writer_of_a_tiff_output_refused(source, tmp_path):
    """TIFF outputs (staged, written whole at the end) take the same lock, beside the file."""
    import tifffile

    src, ref = source
    out = tmp_path / "out.tif"
    lock = tmp_path / ".out.tif.quietscope-lock.json"
    first: list[object] = []
    a = threading.Thread(target=lambda: first.append(run_box_job(src, str(out), {**OPTS, "threads": 1}, {"sleep": 0.1})))
    a.start()
    deadline = time.monotonic() + 60
    while not lock.exists() and a.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    for extra in ({}, {"overwrite": True}):
        with pytest.raises(OutputError, match="being written by another quietscope job") as err:
            run_box_job(src, str(out), {**OPTS, **extra})
        assert str(out) in str(err.value) and "\n" not in str(err.value)
    a.join(120)
    assert len(first) == 1 and not lock.exists()
    np.testing.assert_array_equal(tifffile.imread(out), ref[0])


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


# ---- each storage fault: one line, exit 2, within seconds -------------------------------------
def _cli(*args: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, ["-q", *args])
    return res.exit_code, res.output, time.monotonic() - t0


def _one_error_line(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("quietscope: ")]
    assert len(lines) == 1 and lines[0].startswith("quietscope: error: "), text[-3000:]
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(name, size, ro=False)``: a real tmpfs (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, size: str, ro: bool = False) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    data = (100 + 20 * np.random.default_rng(3).standard_normal((256, 256))).astype(np.float32)
    return write_zarr_array(d / "in.zarr", data, (64, 64))


FILTER = ("filter", "--kind", "box", "--size", "3", "--chunks", "32,32", "--no-progress")


def test_read_only_file_system(image, mount_tmpfs):
    ro = mount_tmpfs("ro", "1m", ro=True)
    code, text, secs = _cli(*FILTER, image, "-o", str(ro / "out.ome.zarr"))
    assert code == 2 and secs < 20, (code, secs, text[-2000:])
    _one_error_line(text, "read-only file system", str(ro / "out.ome.zarr"))


def test_immutable_folder(image, tmp_path):
    d = tmp_path / "immutable"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (needs root and a file system with attributes)")
    try:
        code, text, secs = _cli(*FILTER, image, "-o", str(d / "out.ome.zarr"))
    finally:
        subprocess.run(["chattr", "-i", str(d)])
    assert code == 2 and secs < 20
    _one_error_line(text, "not permitted", "chattr -i")
    assert list(d.iterdir()) == []


def test_permission_denied(image, tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o555)
    cmd = [sys.executable, "-m", "quietscope_cli.main", "-q", *FILTER, image, "-o", str(d / "out.ome.zarr")]
    if os.geteuid() == 0:  # root ignores permission bits unless it drops CAP_DAC_OVERRIDE
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE to test permission denied")
        cmd = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    secs = time.monotonic() - t0  # includes starting Python and importing torch/dask (~30 s on a loaded 2-core box)
    assert r.returncode == 2, r.stderr[-2000:]
    _one_error_line(r.stderr, "permission denied")
    assert secs < 150 and list(d.iterdir()) == []


def test_disk_full_mid_run_then_resume_is_bit_identical(image, mount_tmpfs, tmp_path):
    ref = tmp_path / "ref.ome.zarr"
    assert _cli(*FILTER, "--block", "64,64", image, "-o", str(ref))[0] == 0  # same blocks: same arithmetic
    small = mount_tmpfs("small", "200k")  # ~350 KB of output: full after some blocks
    out = small / "out.ome.zarr"
    code, text, secs = _cli(*FILTER, "--block", "64,64", image, "-o", str(out))
    assert code == 2 and secs < 60, (code, secs, text[-3000:])
    _one_error_line(text, "ran out of space", "--resume")
    assert (out / ".quietscope" / "job.json").exists() and not (out / ".quietscope" / "lock.json").exists()
    n_done = len(Ledger(out).done())
    assert n_done < 16
    subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)  # space freed
    code, text, _ = _cli(*FILTER, "--block", "64,64", image, "-o", str(out), "--resume")
    assert code == 0, text[-3000:]
    _same(out, read_levels(ref))


def test_output_deleted_mid_run_is_one_line_at_once_and_resume_recreates_it(source, tmp_path):
    """The output folder removed under a running job: one StorageError within seconds of the
    deletion (storage faults are not rerun as tasks), then --resume rebuilds it bit-identically."""
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    gone_at: list[float] = []

    def delete_after_two_blocks() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not gone_at:
            if _n_done(out) >= 2:
                out.rename(tmp_path / "trash")  # atomic: rmtree would race with the writes
                gone_at.append(time.monotonic())
                shutil.rmtree(tmp_path / "trash", ignore_errors=True)
            time.sleep(0.005)

    t = threading.Thread(target=delete_after_two_blocks)
    t.start()
    with pytest.raises(StorageError, match="vanished while being written") as err:
        run_box_job(src, str(out), {**OPTS, "threads": 1}, {"sleep": 0.2})
    secs = time.monotonic() - gone_at[0]
    t.join()
    assert "\n" not in str(err.value) and str(out) in str(err.value) and "--resume" in str(err.value)
    assert secs < 10, secs
    run_box_job(src, str(out), {**OPTS, "resume": True})
    _same(out, ref)


def test_resume_over_the_stray_chunks_of_a_vanished_output_starts_afresh(source, tmp_path):
    """A write in flight when the folder vanished puts back its chunk folders (the store makes
    parents on write), without metadata or job record: --resume starts afresh. An output with
    array metadata but no record is still refused."""
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    for rel in ("0/c/1/2", "1/c/0/1", ".quietscope/done/t0_0_0"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"stray")
    run_box_job(src, str(out), {**OPTS, "resume": True})
    _same(out, ref)
    other = tmp_path / "other.ome.zarr"
    (other / "0").mkdir(parents=True)
    (other / "0" / "zarr.json").write_text("{}")
    with pytest.raises(OutputError, match="no quietscope job record"):
        run_box_job(src, str(other), {**OPTS, "resume": True})
    assert (other / "0" / "zarr.json").read_text() == "{}"


def test_a_storage_error_that_cannot_be_pickled_still_reaches_the_client_as_one():
    """Worker processes pickle a task's StoreFault; zarr's ArrayNotFoundError (an output level
    gone) cannot be rebuilt from its pickle, so it travels as the builtin FileNotFoundError."""
    import pickle

    from zarr.errors import ArrayNotFoundError

    from quietscope.errors import storage_message
    from quietscope.runner.executor import StoreFault, portable

    fault = pickle.loads(pickle.dumps(StoreFault(portable(ArrayNotFoundError("store", "1")))))
    assert type(fault.error) is FileNotFoundError
    assert "vanished while being written (No array found in store 'store'" in storage_message(fault.error, "o.ome.zarr")
    err = PermissionError(13, "Permission denied")
    assert portable(err) is err  # what pickles is passed as it is


def test_scheduler_address_errors_exit_at_once(image, tmp_path):
    code, text, secs = _cli(*FILTER, image, "-o", str(tmp_path / "a.ome.zarr"), "--scheduler", "not-a-url")
    assert code == 2 and secs < 15
    _one_error_line(text, "not a scheduler address", "tcp://")
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, text, secs = _cli(*FILTER, image, "-o", str(tmp_path / "b.ome.zarr"), "--scheduler", f"tcp://127.0.0.1:{port}")
    assert code == 2 and secs < 15
    _one_error_line(text, "cannot reach the dask scheduler", str(port))
    assert not (tmp_path / "a.ome.zarr").exists() and not (tmp_path / "b.ome.zarr").exists()


# ---- options and paths ------------------------------------------------------------------------
def test_overwrite_with_resume_and_bad_output_names_refused(image, tmp_path):
    code, text, _ = _cli(*FILTER, image, "-o", str(tmp_path / "a.ome.zarr"), "--overwrite", "--resume")
    assert code == 2
    _one_error_line(text, "--overwrite and --resume")
    code, text, _ = _cli(*FILTER, image, "-o", str(tmp_path / "out.png"))
    assert code == 2
    _one_error_line(text, "neither .ome.zarr", "out.ome.zarr")
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "a.ome.zarr").exists()


def test_saturating_dtype_is_warned_about(tmp_path, caplog):
    data = np.random.default_rng(0).integers(0, 4096, (128, 128)).astype(np.uint16)  # 12-bit
    src = write_zarr_array(tmp_path / "in12.zarr", data, (64, 64))
    with caplog.at_level("WARNING"):
        code, text, _ = _cli(*FILTER, src, "-o", str(tmp_path / "o.ome.zarr"), "--dtype", "uint8")
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if "saturate" in r.getMessage()]
    assert warned and "uint16" in warned[0], warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _cli(*FILTER, src, "-o", str(tmp_path / "p.ome.zarr"), "--dtype", "uint16")[0] == 0
    assert not [r for r in caplog.records if "saturate" in r.getMessage()]


def test_resume_matches_the_input_by_location_not_spelling(source, tmp_path, monkeypatch):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    a = _start(src, out, sleep=0.2)
    try:
        _wait_for(lambda: _n_done(out) >= 2, a)
        a.send_signal(signal.SIGKILL)
    finally:
        a.kill()
        a.wait()
    monkeypatch.chdir(Path(src).parent)
    run_box_job(os.path.relpath(src), str(out), {**OPTS, "resume": True})  # relative now, absolute before
    _same(out, ref)


# ---- training: checked before any step --------------------------------------------------------
TRAIN = ("train", "--patch", "16", "--batch", "2", "--steps", "2", "--depth", "1", "--filters", "4", "--device", "cpu")


def test_train_refuses_unwritable_output_before_training(image, mount_tmpfs):
    ro = mount_tmpfs("ro", "1m", ro=True)
    code, text, secs = _cli(*TRAIN, image, "-o", str(ro / "m.qs"))
    assert code == 2 and secs < 20
    _one_error_line(text, "read-only file system")


def test_train_checkpoint_is_not_discarded_and_a_bad_one_is_named(image, tmp_path):
    model = tmp_path / "m.qs"
    ckpt = tmp_path / "m.qs.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    code, text, _ = _cli(*TRAIN, image, "-o", str(model))
    assert code == 2
    _one_error_line(text, "checkpoint of an interrupted training", "--resume")
    assert ckpt.read_bytes() == b"not a checkpoint"
    code, text, _ = _cli(*TRAIN, image, "-o", str(model), "--resume")
    assert code == 2
    line = _one_error_line(text, "cannot be read")
    assert "weights_only" not in line
    code, text, _ = _cli(*TRAIN, image, "-o", str(model), "--resume", "--overwrite")
    assert code == 2
    _one_error_line(text, "--overwrite and --resume")


@pytest.mark.parametrize("values", [[7.0], [7.0, 8.0]])
def test_constant_image_refused_for_training(tmp_path, values):
    data = np.resize(np.array(values, np.float32), (64, 64))
    src = write_zarr_array(tmp_path / "c.zarr", data, (32, 32))
    code, text, _ = _cli(*TRAIN, src, "-o", str(tmp_path / "m.qs"))
    assert code == 2
    _one_error_line(text, "constant", "no signal or noise")
    assert not (tmp_path / "m.qs").exists()


# ---- inputs: truncated or corrupt TIFFs fail at open -------------------------------------------
def test_truncated_and_corrupt_tiff_fail_at_info(tmp_path):
    import tifffile

    data = np.random.default_rng(0).integers(0, 4096, (8, 64, 64)).astype(np.uint16)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, data)
    assert _cli("info", str(good))[0] == 0
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, text, _ = _cli("info", str(cut))
    assert code == 2
    _one_error_line(text, "truncated", "copy it again")
    packed = tmp_path / "packed.tif"
    tifffile.imwrite(packed, data, compression="zlib")
    raw = bytearray(packed.read_bytes())
    with tifffile.TiffFile(packed) as tf:
        off = tf.pages[-1].dataoffsets[0]
    raw[off:off + 64] = b"\xff" * 64  # garbage in the last page's compressed stream
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(raw))
    code, text, _ = _cli("info", str(bad))
    assert code == 2
    _one_error_line(text, "corrupt", "copy it again")
