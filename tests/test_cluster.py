"""Clusters, TLS, GPU resources, lazy plans, streamed pyramid and sharding (in-process clusters only;
worker-process tests live in test_runner_faults.py, sharing one process cluster)."""

from __future__ import annotations

import logging
import subprocess
import sys
import tracemalloc
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import zarr

from box_job import run_box_job
from helpers import read_levels, write_zarr_array
from quietscope.errors import ConfigError
from quietscope.inference import predict_whole
from quietscope.io.writing import OutputSpec, block_local_levels, build_pyramid, create_ome_zarr, open_level
from quietscope.runner.cluster import dask_client, load_profile, slurm_cluster, thread_budget
from quietscope.runner.executor import count_blocks, iter_blocks, iter_tasks
from quietscope.runner.testing import BoxProcessor, start_environ
from quietscope.tiling import plan_blocks


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (100 + 20 * rng.standard_normal(shape)).astype(np.float32)


# ---- thread budget, plan -------------------------------------------------------------------
def test_thread_budget_never_oversubscribes():
    assert thread_budget(2, cores=2) == (1, 1)
    assert thread_budget(1, cores=16) == (16, 1)
    assert thread_budget(4, threads=1, cores=16) == (1, 4)
    assert thread_budget(3, threads=2, cores=16) == (2, 2)
    assert thread_budget(8, cores=2) == (1, 1)  # more workers than cores: still one each
    for n in (1, 2, 3, 5):
        for th in (None, 1, 2):
            tasks, intra = thread_budget(n, th, cores=16)
            assert n * tasks * intra <= max(16, n * tasks)
    assert thread_budget(1, threads=1, cores=2, torch_threads=1) == (1, 1)  # --torch-threads wins
    assert thread_budget(2, cores=16, torch_threads=3) == (8, 3)


def test_lazy_plan_matches_plan_blocks_and_scales_to_a_million_blocks():
    for shape, block in [((75, 93), (16, 32)), ((13, 37, 29), (8, 16, 16)), ((5,), (5,))]:
        assert list(iter_blocks(shape, block)) == plan_blocks(shape, block)
        assert count_blocks(shape, block) == len(plan_blocks(shape, block))
    shape, block = (1000, 1000, 1000), (10, 10, 10)
    assert count_blocks(shape, block) == 10**6
    tracemalloc.start()
    gen = iter_tasks(shape, block, 1, done={"t0_0_0_0"})
    first = list(islice(gen, 3))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [t.key for t in first] == ["t0_0_0_1", "t0_0_0_2", "t0_0_0_3"]  # the done block is skipped
    assert peak < 1_000_000  # a materialised 10^6-block plan would take hundreds of MB


# ---- SLURM profile and job script ----------------------------------------------------------
PROFILE = """\
slurm:
  queue: gpu
  account: imaging-lab
  walltime: "02:00:00"
  cores: 8
  memory: 48GB
  gpus: 1
  jobs: 4
  scheduler_host: 127.0.0.1
  job_extra_directives: ["--constraint=a100"]
  job_script_prologue: ["module load cuda/12.4"]
  python: /opt/quietscope/bin/python
"""


def test_slurm_profile_parsed_and_job_script(tmp_path, monkeypatch):
    for var in ("MALLOC_MMAP_THRESHOLD_", "QUIETSCOPE_MMAP_THRESHOLD"):
        monkeypatch.delenv(var, raising=False)
    p = tmp_path / "cluster.yaml"
    p.write_text(PROFILE)
    prof = load_profile(p)
    assert (prof.queue, prof.cores, prof.jobs, prof.gpus) == ("gpu", 8, 4, 1)
    cluster = slurm_cluster(prof)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    finally:
        cluster.close()
    lines = script.splitlines()
    for want in ("#SBATCH -p gpu", "#SBATCH -A imaging-lab", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:1",
                 "#SBATCH --constraint=a100", "#SBATCH --cpus-per-task=8", "module load cuda/12.4",
                 "export OMP_NUM_THREADS=1", "export MALLOC_MMAP_THRESHOLD_=4194304"):
        assert want in lines, (want, script)
    worker_cmd = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker_cmd.startswith("/opt/quietscope/bin/python")
    assert "--resources GPU=1" in worker_cmd and "--nthreads 8" in worker_cmd
    assert "--nworkers" not in worker_cmd  # one worker process per job (= per GPU)


def test_slurm_profile_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue: gpu\ngpus_per_node: 4\n")
    with pytest.raises(ConfigError, match="gpus_per_node"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")
    open_net = tmp_path / "noif.yaml"
    open_net.write_text("queue: gpu\n")
    with pytest.raises(ConfigError, match="interface"):
        slurm_cluster(load_profile(open_net))  # never guesses an interface
    with pytest.raises(ConfigError, match="--cluster-profile"):
        with dask_client(cluster="slurm"):
            pass


# ---- TLS -----------------------------------------------------------------------------------
def _certs(d: Path) -> tuple[str, str, str]:
    """A CA and a certificate signed by it (openssl CLI), as distributed's TLS needs."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "node.key", "-out", "node.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "node.pem")
    return str(d / "ca.pem"), str(d / "node.pem"), str(d / "node.key")


def test_tls_scheduler(tmp_path):
    from distributed import LocalCluster

    from quietscope.runner.cluster import make_security

    ca, cert, key = _certs(tmp_path)
    sec = make_security(ca, cert, key)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=sec, dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tls://127.0.0.1:")
        with dask_client(addr, tls_ca=ca, tls_cert=cert, tls_key=key) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
        with pytest.raises(ConfigError, match="--tls-ca"):
            with dask_client(addr):
                pass
        with pytest.raises(ConfigError, match="all of --tls-ca"):
            with dask_client(addr, tls_ca=ca):
                pass
        # End to end: a prediction through the TLS scheduler.
        data = _data((40, 48))
        src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
        out = tmp_path / "out.ome.zarr"
        run_box_job(src, str(out), dict(chunks=(16, 16), block=(16, 16), progress=False, scheduler=addr,
                                        tls_ca=ca, tls_cert=cert, tls_key=key))
        ref = predict_whole(BoxProcessor().apply, data[None], (1, 1), 1)[0]
        np.testing.assert_array_equal(zarr.open_array(store=str(out / "0"), mode="r")[...], ref)
    # A profile can carry the TLS files (relative to the profile).
    p = tmp_path / "tls.yaml"
    p.write_text("scheduler_host: 127.0.0.1\ntls_ca: ca.pem\ntls_cert: node.pem\ntls_key: node.key\n")
    prof = load_profile(p)
    assert prof.tls_ca == ca
    sc = slurm_cluster(prof)
    try:
        assert sc.scheduler_address.startswith("tls://127.0.0.1:")
        assert "--tls-ca-file" in sc.job_script() or "tls" in sc.job_script()
    finally:
        sc.close()


# ---- one task per GPU ----------------------------------------------------------------------
def _max_concurrency(log_dir: Path) -> int:
    events = []
    for f in log_dir.glob("call-*"):
        a, b = map(float, f.read_text().split())
        events += [(a, 1), (b, -1)]
    cur = best = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize("gpu", [True, False])
def test_gpu_resource_keeps_tasks_off_a_shared_device(tmp_path, gpu):
    """Workers declaring GPU=1 (a fake resource on CPU) run one block at a time even with 2 threads."""
    from distributed import LocalCluster

    data = _data((64, 64))
    src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    kw = {"resources": {"GPU": 1}} if gpu else {}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0",
                      silence_logs=logging.ERROR, **kw) as cluster:
        run_box_job(src, str(tmp_path / "out.ome.zarr"),
                    dict(chunks=(16, 16), block=(16, 16), progress=False, scheduler=cluster.scheduler_address),
                    dict(sleep=0.08, log_dir=str(log_dir)))
    assert len(list(log_dir.glob("call-*"))) == 16
    # With the resource: never two at once. Without it the same worker runs two (the test can fail).
    assert _max_concurrency(log_dir) == (1 if gpu else 2)


# ---- streamed pyramid, sharding, metadata ---------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_streamed_pyramid_equals_post_hoc_build(tmp_path, dtype):
    data = _data((90, 122), seed=3) * (30 if dtype == "uint16" else 1)
    src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
    out = tmp_path / "out.ome.zarr"
    # block 64 = 2^3 x chunk 8: levels 1..3 are written by the block tasks; level 4 afterwards.
    res = run_box_job(src, str(out), dict(chunks=(8, 8), block=(64, 64), dtype=dtype, progress=False))
    assert res.extra["local_levels"] == 3
    got = read_levels(out)
    assert len(got) == 5
    # Reference: level 0 alone, then build_pyramid after the fact.
    spec = OutputSpec(path=str(tmp_path / "ref.ome.zarr"), axes="yx", shape=(90, 122), chunks=(8, 8), dtype=dtype)
    create_ome_zarr(spec)
    open_level(spec.path, 0)[...] = got[0]
    build_pyramid(spec)
    ref = read_levels(Path(spec.path))
    for k, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype
        np.testing.assert_array_equal(g, r, err_msg=f"level {k}")
    # With only the streamed levels there is no post-hoc step at all: the tasks wrote them.
    out2 = tmp_path / "out2.ome.zarr"
    res2 = run_box_job(src, str(out2), dict(chunks=(8, 8), block=(64, 64), dtype=dtype, n_levels=4, progress=False))
    # (Counted, not timed: no coarse-tile task and no lane task ran after level 0.)
    assert res2.extra["tiles"] == 0 and res2.extra["lane_tasks"] == 0, res2.extra
    for k, g in enumerate(read_levels(out2)):
        np.testing.assert_array_equal(g, ref[k], err_msg=f"level {k}")


def test_block_local_levels_rule():
    spec = OutputSpec(path="x", axes="zyx", shape=(10, 1000, 1000), chunks=(5, 64, 64))
    assert block_local_levels(spec, (5, 64, 64)) == 0  # a 64-block cannot own a level-1 chunk
    assert block_local_levels(spec, (5, 256, 256)) == 2
    assert block_local_levels(spec, (5, 256, 1000)) == 2  # one block spans x
    sharded = OutputSpec(path="x", axes="zyx", shape=(10, 1000, 1000), chunks=(5, 64, 64), shards=(5, 128, 128))
    assert block_local_levels(sharded, (5, 256, 256)) == 1  # a task must own whole shards


def test_sharded_output_equals_unsharded(tmp_path):
    data = _data((96, 130), seed=4)
    src = write_zarr_array(tmp_path / "in.zarr", data, (32, 32))
    base = dict(chunks=(16, 16), block=(64, 64), progress=False)
    run_box_job(src, str(tmp_path / "plain.ome.zarr"), base)
    res = run_box_job(src, str(tmp_path / "sharded.ome.zarr"), {**base, "shards": (32, 32)})
    assert res.extra["local_levels"] == 1
    plain, sharded = read_levels(tmp_path / "plain.ome.zarr"), read_levels(tmp_path / "sharded.ome.zarr")
    assert len(plain) == len(sharded) == 5
    for k, (a, b) in enumerate(zip(plain, sharded)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {k}")
    z0 = zarr.open_array(store=str(tmp_path / "sharded.ome.zarr" / "0"), mode="r")
    assert z0.shards == (32, 32) and z0.chunks == (16, 16)
    assert len(list((tmp_path / "sharded.ome.zarr" / "0" / "c").rglob("*"))) < len(
        list((tmp_path / "plain.ome.zarr" / "0" / "c").rglob("*")))
    with pytest.raises(ConfigError, match="zarr v3"):
        run_box_job(src, str(tmp_path / "v2.ome.zarr"), {**base, "shards": (32, 32), "ngff": "0.4"})


def test_omero_windows_come_from_the_output(tmp_path):
    data = _data((64, 64), seed=5)
    src = write_zarr_array(tmp_path / "in.zarr", data, (16, 16))
    out = tmp_path / "out.ome.zarr"
    run_box_job(src, str(out), dict(chunks=(16, 16), progress=False))
    omero = zarr.open_group(str(out), mode="r").attrs["ome"]["omero"]
    w = omero["channels"][0]["window"]
    # The box output is 2 x mean3x3(N(100, 20)) + 1: mean 201, sigma ~13 (windows come from the output).
    assert 150 < w["start"] < 185 and 215 < w["end"] < 250


def test_patch_prefetch_is_deterministic_and_reads_ahead(tmp_path):
    from quietscope.io import open_image
    from quietscope.training.prefetch import PoolPrefetcher, sample_pool
    from quietscope.training.sampler import PatchSampler

    src = write_zarr_array(tmp_path / "in.zarr", _data((8, 64, 64), seed=6), (4, 16, 16))
    sampler = PatchSampler(open_image(src), (4, 16, 16))
    serial = [sample_pool(sampler, 10, seed=3, index=i, workers=3) for i in range(3)]
    with PoolPrefetcher(sampler, 10, seed=3, workers=3) as pf:
        got = [pf.get(i) for i in range(3)]
        assert 3 in pf._pending  # the next pool is already being read
    for a, b in zip(serial, got):
        assert a.shape == (10, 1, 4, 16, 16)
        np.testing.assert_array_equal(a, b)  # independent of thread timing
    assert not np.array_equal(serial[0], serial[1])
    with PoolPrefetcher(sampler, 10, seed=3, workers=2, count=2) as pf:
        pf.get(1)
        assert not pf._pending  # pool 2 does not exist: nothing is read ahead


def test_torch_threads_option_reaches_worker_processes():
    from quietscope.runner.testing import torch_threads

    with dask_client(workers=1, threads=1, torch_threads=1) as client:
        assert set(client.run(torch_threads).values()) == {1}  # default would give the lone worker 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap settings are Linux-only")
def test_worker_processes_start_with_the_heap_threshold(monkeypatch):
    for var in ("MALLOC_MMAP_THRESHOLD_", "QUIETSCOPE_MMAP_THRESHOLD"):
        monkeypatch.delenv(var, raising=False)
    with dask_client(workers=1, threads=1, torch_threads=1) as client:
        (env,) = client.run(start_environ).values()
    assert env.get("MALLOC_MMAP_THRESHOLD_") == str(4 * 2**20), sorted(k for k in env if k.startswith("MALLOC"))
