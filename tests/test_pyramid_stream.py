"""The progressive pyramid: every level fills in while level 0 runs, bit for bit what the
post-hoc 2x2 mean pyramid gives, for any block and chunk shape, and exact after SIGKILLs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from box_job import run_box_job
from helpers import read_levels, write_zarr_array
from quietscope.chunked import (
    PredictOptions,
    _progressive_pyramid,
    close_job,
    job_record,
    open_job,
    output_spec,
    plan_layout,
    run_prediction,
)
from quietscope.io import open_image
from quietscope.io.writing import OutputSpec, block_local_levels, build_pyramid, create_ome_zarr, open_level
from quietscope.runner.cluster import client_for
from quietscope.runner.executor import JobSpec, iter_tasks, run_blocks
from quietscope.runner.ledger import Ledger
from quietscope.runner.pyramid import PyramidPlan, PyramidTracker
from quietscope.runner.testing import BoxProcessor


def _data(shape, seed=0, scale=1.0):
    return ((100 + 20 * np.random.default_rng(seed).standard_normal(shape)) * scale).astype(np.float32)


def _reference(got0: np.ndarray, axes: str, chunks, dtype: str, n_levels: int, tmp: Path) -> list[np.ndarray]:
    """The post-hoc pyramid of a level 0 (io.writing.build_pyramid, a dask 2x2 mean)."""
    spec = OutputSpec(path=str(tmp / "ref.ome.zarr"), axes=axes, shape=got0.shape, chunks=chunks, dtype=dtype,
                      n_levels=n_levels)
    create_ome_zarr(spec)
    open_level(spec.path, 0)[...] = got0
    build_pyramid(spec)
    return read_levels(Path(spec.path))


def _assert_equal_levels(got, ref):
    assert len(got) == len(ref) > 1
    for k, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_array_equal(g, r, err_msg=f"level {k}")


CASES = {
    # name: (shape, input chunks, output chunks, block, extra options)
    "2d-odd-unaligned-0.5": ((90, 122), (16, 16), (8, 8), (24, 40), {}),
    "2d-odd-unaligned-0.4": ((90, 122), (16, 16), (8, 8), (24, 40), {"ngff": "0.4"}),
    "2d-uint16-chunk-ne-block": ((77, 101), (16, 16), (16, 16), (48, 32), {"dtype": "uint16"}),
    "2d-sharded": ((96, 130), (32, 32), (16, 16), (32, 64), {"shards": (32, 32)}),
    "2d-aligned-local-levels-then-tiles": ((130, 97), (16, 16), (8, 8), (32, 32), {"n_levels": 6}),
    "3d-odd": ((5, 45, 67), (5, 16, 16), (2, 8, 8), (4, 16, 24), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_progressive_pyramid_equals_post_hoc_mean_pyramid(tmp_path, case):
    shape, in_chunks, chunks, block, extra = CASES[case]
    data = _data(shape, seed=len(case), scale=30 if extra.get("dtype") == "uint16" else 1)
    src = write_zarr_array(tmp_path / "in.zarr", data, in_chunks)
    out = tmp_path / "out.ome.zarr"
    res = run_box_job(src, str(out), dict(chunks=chunks, block=block, progress=False, **extra))
    got = read_levels(out)
    axes = "yx" if len(shape) == 2 else "zyx"
    _assert_equal_levels(got, _reference(got[0], axes, chunks, extra.get("dtype", "float32"), len(got), tmp_path))
    assert res.extra["tiles"] > 0  # coarse tiles were written by the lane, not by a post-hoc pass
    assert not (out / ".quietscope").exists()


def test_time_and_channels(tmp_path):
    """t + c: two channels, three time points, odd y/x, blocks not aligned to chunks."""
    data = _data((3, 2, 37, 51), seed=9)
    g = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    arr = g.create_array("raw", shape=data.shape, chunks=(1, 2, 16, 16), dtype="f4", dimension_names=list("tcyx"))
    arr[...] = data
    src = str(tmp_path / "in.zarr" / "raw")
    out = tmp_path / "out.ome.zarr"
    run_prediction(open_image(src), str(out), BoxProcessor(), ["a", "b"], (1, 1), 1,
                   PredictOptions(chunks=(8, 8), block=(24, 16), progress=False), {})
    got = read_levels(out)
    assert got[0].shape == (3, 2, 37, 51)
    _assert_equal_levels(got, _reference(got[0], "tcyx", (1, 2, 8, 8), "float32", len(got), tmp_path))
    labels = [c["label"] for c in zarr.open_group(str(out), mode="r").attrs["ome"]["omero"]["channels"]]
    assert labels == ["a", "b"]


def test_tracker_counts_every_source_once_and_emits_each_tile_once():
    shape, block = (50, 70), (12, 20)
    axes = "yx"
    shapes = [(50, 70), (25, 35), (13, 18), (7, 9)]
    plan = PyramidPlan.build(axes, shapes, block, [(8, 8), (8, 8), (8, 8), (7, 8)], 0)
    tracker = PyramidTracker(plan)
    emitted = []
    for t in iter_tasks(shape, block, 1):
        b = t.block
        emitted += tracker.closure(tracker.block_done(tuple(slice(a, z) for a, z in zip(b.start, b.stop))))
    keys = [t.key for t in emitted]
    assert len(keys) == len(set(keys))
    for k in range(1, 4):
        n = np.prod([-(-s // g) for s, g in zip(shapes[k], plan.grids[k])])
        assert sum(t.level == k for t in emitted) == n
    assert not tracker.counts  # nothing left half-counted
    # Sources first: a tile comes after every tile of the level below that it reads.
    pos = {t: i for i, t in enumerate(emitted)}
    for t in emitted:
        if t.level > 1:
            src = plan.source(t)
            for s in emitted:
                if s.level == t.level - 1 and all(r.start < q.stop and q.start < r.stop
                                                   for r, q in zip(plan.region(s.level, s.index), src)):
                    assert pos[s] < pos[t]


def _first_half(src: str, out: str, opts: dict) -> tuple[int, int]:
    """Run the real engine on the first half of the plan's blocks (plan order), as a run is halfway."""
    image, options, proc = open_image(src), PredictOptions(**opts), BoxProcessor()
    layout = plan_layout(image, 1, (1, 1), options, False)
    spec = output_spec(image, layout, out, options.output, False, ["box"], [(0.0, 1.0)], {"test": "box"})
    ledger, _, _ = open_job(spec, job_record(image, layout, spec, proc.token, (1, 1)), out, [src], options.output, False)
    local = block_local_levels(spec, layout.expand(layout.block))
    job = JobSpec(input=image.ref, output=out, out_axes=layout.out_axes, out_dtype=spec.dtype, halo=(1, 1), factor=1,
                  processor=proc.token, local_levels=local, level_shapes=tuple(spec.level_shapes()))
    tasks = list(iter_tasks(layout.spatial_shape, layout.block, 1))
    half = tasks[: len(tasks) // 2]
    pyramid = _progressive_pyramid(spec, layout, job, set(), ledger)
    with client_for(options.compute) as client:
        run_blocks(client, job, proc, iter(half), len(half), progress=False, pyramid=pyramid)
    close_job(ledger)  # as a run that stopped here: its lock goes with it (the ledger stays)
    return len(half), len(tasks)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_halfway_the_coarsest_level_is_mostly_filled_and_resume_is_exact(tmp_path, ngff):
    data = _data((256, 200), seed=3)
    src = write_zarr_array(tmp_path / "in.zarr", data, (32, 32))
    opts = dict(chunks=(32, 32), block=(32, 32), progress=False, ngff=ngff)  # 56 blocks, no block-local level
    out = tmp_path / "out.ome.zarr"
    n_half, n = _first_half(src, str(out), opts)
    assert (n_half, n) == (28, 56)
    levels = read_levels(out)
    assert len(levels) == 4 and levels[-1].shape == (32, 25)
    for k, lv in enumerate(levels):
        filled = float(np.mean(lv != 0))  # box output is > 0 everywhere: 0 is the fill value
        assert filled >= 0.4, f"level {k}: only {filled:.0%} of it shows finished data halfway"
    assert Ledger(out).tiles_done()  # the coarse tiles have their markers
    res = run_box_job(src, str(out), {**opts, "resume": True})
    assert res.n_done_before == 28
    ref_out = tmp_path / "ref.ome.zarr"
    run_box_job(src, str(ref_out), opts)
    _assert_equal_levels(read_levels(out), read_levels(ref_out))
    _assert_equal_levels(read_levels(ref_out), _reference(read_levels(ref_out)[0], "yx", (32, 32), "float32", 4, tmp_path))


SHAPE, CHUNKS, BLOCK = (96, 136), (8, 8), (24, 40)  # 4 x 4 blocks, none aligned: every coarse level is tiles


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    src = write_zarr_array(d / "in.zarr", _data(SHAPE, seed=11), (32, 32))
    ref = d / "ref.ome.zarr"
    run_box_job(src, str(ref), dict(chunks=CHUNKS, block=BLOCK, progress=False))
    return src, read_levels(ref)


def _kill_when(src: str, out: Path, ready, opts: dict) -> None:
    job = {"input_uri": src, "output": str(out), "options": {**opts, "threads": 2}, "processor": {"sleep": 0.15}}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("box_job.py")), json.dumps(job)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready(out):
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished (or failed) before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _n(path: Path) -> int:
    return sum(1 for p in path.iterdir() if not p.name.startswith(".")) if path.exists() else 0


@pytest.mark.parametrize("when", ["level0", "coarse"])
def test_sigkill_then_resume_is_bit_identical(source, tmp_path, when):
    src, ref = source
    out = tmp_path / "out.ome.zarr"
    opts = dict(chunks=CHUNKS, block=BLOCK, progress=False)
    if when == "level0":
        _kill_when(src, out, lambda o: _n(o / ".quietscope" / "done") >= 3, opts)
    else:  # coarse tiles partly written while blocks still run
        _kill_when(src, out, lambda o: _n(o / ".quietscope" / "levels") >= 3, opts)
        assert Ledger(out).tiles_done()
    n_done = len(Ledger(out).done())
    assert 0 < n_done < 16 and Ledger(out).job()["complete"] is False
    res = run_box_job(src, str(out), {**opts, "resume": True})
    assert res.n_done_before == n_done
    _assert_equal_levels(read_levels(out), ref)


def test_pyramid_plan_log_names_only_levels_that_exist():
    from quietscope.chunked import _pyramid_plan_text

    assert _pyramid_plan_text(0, 5) == "levels 1..4 tile by tile as soon as their sources are written"
    assert _pyramid_plan_text(4, 5) == "levels 1..4 written by each block as it finishes"
    assert _pyramid_plan_text(2, 5) == ("levels 1..2 written by each block as it finishes; "
                                        "levels 3..4 tile by tile as soon as their sources are written")


def test_block_wider_than_the_volume_writes_the_same_pyramid(tmp_path):
    """A block wider than the volume along y (3 chunks of 16 on 37 rows) made coarse tiles cover
    two write units while x stayed partial; their read-update-write broke (found with the
    memory planner, which can choose such blocks)."""
    from helpers import random_model
    from quietscope.chunked import PredictOptions
    from quietscope.workflows.predict import predict

    rng = np.random.default_rng(4)
    data = (100 + 20 * rng.standard_normal((45, 37, 29))).astype(np.float32)
    src = write_zarr_array(tmp_path / "in.zarr", data, (8, 16, 16))
    model = random_model(tmp_path / "m.qs", 3, depth=1, filters=4)
    levels = {}
    for block in [(16, 48, 16), (16, 32, 16)]:
        out = tmp_path / f"o{block[1]}.ome.zarr"
        res = predict(model, src, out, PredictOptions(chunks=(8, 16, 16), block=block, progress=False))
        assert res.block == block
        levels[block[1]] = read_levels(out)
    assert len(levels[48]) == len(levels[32]) >= 2
    for a, b in zip(levels[48], levels[32]):
        np.testing.assert_allclose(a, b, atol=1e-4)
