"""Inputs and outputs on object stores: a real S3 server on loopback (moto in server mode, a
separate process) and a loopback HTTP server (read-only). Nothing inside quietscope is mocked.

Skips with a message when moto[server] or s3fs is not installed (``pip install -e .[s3-test]``).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from box_job import run_box_job
from helpers import write_ome
from quietscope_cli.main import cli

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs); object-store tests skipped")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]'); S3 tests skipped")
import zarr  # noqa: E402

BOX_JOB = str(Path(__file__).with_name("box_job.py"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / d) for d in ("src", "cli", "tests")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process on 127.0.0.1 and the environment s3fs reads its endpoint and
    credentials from (as a facility sets AWS_* for MinIO/Ceph); yields an s3fs file system."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ENV.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("the moto S3 server did not start")
                time.sleep(0.2)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bucket")
        yield fs
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _levels(url: str) -> list[np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return [group[str(k)][...] for k in range(len(list(group.array_keys())))]


def _cli(*args: str) -> str:
    res = CliRunner().invoke(cli, ["-q", *args])
    assert res.exit_code == 0, res.output[-3000:]
    return res.output


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    clean = (100 + 50 * np.sin(np.arange(96)[:, None] / 7) * np.cos(np.arange(128)[None] / 9)).astype(np.float32)
    noisy = (clean + 10 * rng.standard_normal(clean.shape)).astype(np.float32)
    return d, write_ome(d / "noisy.ome.zarr", noisy, "yx", (32, 32)), write_ome(d / "clean.ome.zarr", clean, "yx", (32, 32))


@pytest.mark.parametrize("ngff, shards", [("0.4", None), ("0.5", "64,64")])
def test_train_predict_evaluate_on_s3_bit_identical_to_local(s3, noisy, tmp_path, ngff, shards):
    d, noisy_local, clean_local = noisy
    tag = f"rt{ngff.replace('.', '')}"
    s3.put(noisy_local, f"bucket/{tag}/noisy.ome.zarr", recursive=True)
    s3.put(clean_local, f"bucket/{tag}/clean.ome.zarr", recursive=True)
    noisy_url, clean_url = f"s3://bucket/{tag}/noisy.ome.zarr", f"s3://bucket/{tag}/clean.ome.zarr"
    info = json.loads(_cli("info", noisy_url, "--json"))
    assert info["shape"] == [96, 128]
    train = ("train", "--patch", "16", "--batch", "2", "--steps", "3", "--depth", "1", "--filters", "4",
             "--device", "cpu", "--val-every", "3", "--checkpoint-every", "3")
    _cli(*train, noisy_url, "-o", str(tmp_path / "s3.qs"))
    _cli(*train, noisy_local, "-o", str(tmp_path / "local.qs"))
    # Same data, same seed: the same weights whether the patches came from S3 or the disk.
    opts = ["--chunks", "32,32", "--ngff", ngff, "--no-progress", *(["--shards", shards] if shards else [])]
    out_url = f"s3://bucket/{tag}/denoised.ome.zarr"
    _cli("predict", str(tmp_path / "s3.qs"), noisy_url, "-o", out_url, *opts)
    _cli("predict", str(tmp_path / "local.qs"), noisy_local, "-o", str(tmp_path / "denoised.ome.zarr"), *opts)
    remote, local = _levels(out_url), _levels(str(tmp_path / "denoised.ome.zarr"))
    assert len(remote) == len(local) >= 2
    for k, (r, g) in enumerate(zip(remote, local)):
        np.testing.assert_array_equal(r, g, err_msg=f"level {k}")
    assert zarr.open_group(out_url, mode="r").attrs["quietscope_job"]["complete"] is True
    assert not s3.exists(f"bucket/{tag}/denoised.ome.zarr/.quietscope")
    ev_remote = _cli("evaluate", out_url, clean_url)
    ev_local = _cli("evaluate", str(tmp_path / "denoised.ome.zarr"), clean_local)
    assert ev_remote == ev_local and "psnr" in ev_remote.lower()


def test_resume_after_sigkill_on_s3_and_one_writer(s3, noisy, tmp_path):
    d, noisy_local, _ = noisy
    s3.put(noisy_local, "bucket/kill/noisy.ome.zarr", recursive=True)
    src, out = "s3://bucket/kill/noisy.ome.zarr", "s3://bucket/kill/out.ome.zarr"
    opts = {"chunks": (16, 16), "block": (32, 32), "progress": False}
    ref = tmp_path / "ref.ome.zarr"
    run_box_job(noisy_local, str(ref), opts)
    job = {"input_uri": src, "output": out, "options": {**opts, "threads": 1}, "processor": {"sleep": 0.3}}
    proc = subprocess.Popen([sys.executable, BOX_JOB, json.dumps(job)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists("bucket/kill/out.ome.zarr/.quietscope/done") and len(fs.ls("bucket/kill/out.ome.zarr/.quietscope/done")) >= 3:
                break
            time.sleep(0.3)  # the job sleeps 0.3 s a block; faster polling only loads the one-thread S3 server
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        with pytest.raises(Exception, match="being written by another quietscope job"):
            run_box_job(src, out, {**opts, "overwrite": True})
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    res = run_box_job(src, out, {**opts, "resume": True})
    assert 3 <= res.n_done_before < res.n_blocks == 12
    remote, local = _levels(out), _levels(str(ref))
    for k, (r, g) in enumerate(zip(remote, local)):
        np.testing.assert_array_equal(r, g, err_msg=f"level {k}")


@pytest.fixture(scope="module")
def http_root(noisy):
    d = noisy[0]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the CLI output under test shares stderr
            pass

    handler = functools.partial(Quiet, directory=str(d))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_https_inputs_read_only(http_root, noisy, tmp_path):
    url = f"{http_root}/noisy.ome.zarr"
    info = json.loads(_cli("info", url, "--json"))
    assert info["shape"] == [96, 128] and info["kind"] == "ome-zarr"
    _cli("filter", url, "-o", str(tmp_path / "f.ome.zarr"), "--kind", "box", "--size", "3", "--no-progress")
    _cli("filter", noisy[1], "-o", str(tmp_path / "g.ome.zarr"), "--kind", "box", "--size", "3", "--no-progress")
    for a, b in zip(_levels(str(tmp_path / "f.ome.zarr")), _levels(str(tmp_path / "g.ome.zarr"))):
        np.testing.assert_array_equal(a, b)
    res = CliRunner().invoke(cli, ["-q", "filter", noisy[1], "-o", f"{http_root}/x.ome.zarr", "--kind", "box", "--size", "3"])
    assert res.exit_code == 2 and "read-only" in res.output


def _when_blocks_done(fs, out: str, n: int, then) -> tuple[threading.Thread, list[float]]:
    """Call ``then()`` once ``n`` blocks of ``out`` are marked done; the list gets its time."""
    at: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(fs.ls(f"{out}/.quietscope/done", refresh=True)) >= n:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        at.append(time.monotonic())
        then()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, at


_GONE_OPTS = {"chunks": (16, 16), "block": (32, 32), "progress": False, "threads": 1}


def test_store_gone_mid_run_is_one_error_within_seconds(s3, noisy, tmp_path):
    """The S3 server dies under a running predict: one StorageError naming the endpoint, within
    10 s of the kill (it took 30-60 s while tasks were rerun through botocore's legacy retries)."""
    from quietscope.errors import StorageError

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem.clear_instance_cache()  # cached file systems would keep the other endpoint
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=f"http://127.0.0.1:{port}")
        fs.mkdir("gone")
        watcher, killed_at = _when_blocks_done(fs, "gone/out.ome.zarr", 2, proc.kill)
        with pytest.raises(StorageError) as err:
            run_box_job(noisy[1], "s3://gone/out.ome.zarr", _GONE_OPTS, {"sleep": 0.3})
        secs = time.monotonic() - killed_at[0]
        watcher.join()
        assert "\n" not in str(err.value) and "--resume" in str(err.value)
        assert f"stopped answering (cannot connect to http://127.0.0.1:{port})" in str(err.value)
        assert secs < 10, secs
    finally:
        proc.kill()
        proc.wait()
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old
        s3fs.S3FileSystem.clear_instance_cache()


def test_bucket_deleted_mid_run_is_one_error_at_once(s3, noisy):
    from quietscope.errors import StorageError

    s3.mkdir("vanishing")
    watcher, gone_at = _when_blocks_done(s3, "vanishing/out.ome.zarr", 2, lambda: s3.rm("vanishing", recursive=True))
    with pytest.raises(StorageError, match="vanished while being written") as err:
        run_box_job(noisy[1], "s3://vanishing/out.ome.zarr", _GONE_OPTS, {"sleep": 0.3})
    secs = time.monotonic() - gone_at[0]
    watcher.join()
    assert "\n" not in str(err.value) and "s3://vanishing/out.ome.zarr" in str(err.value)
    assert secs < 10, secs
