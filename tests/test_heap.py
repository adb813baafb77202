"""The CPU worker's allocator setting (runner/heap.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from quietscope.runner.heap import DEFAULT_MMAP_THRESHOLD, ENV_VAR, bound_heap, heap_env, mmap_threshold, peak_rss_bytes

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")


def test_threshold_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert mmap_threshold() == DEFAULT_MMAP_THRESHOLD == 4 * 2**20
    assert heap_env() == {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    monkeypatch.setenv(ENV_VAR, "0")
    assert bound_heap() == 0 and heap_env() == {}  # 0: leave the allocator as it is
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own glibc setting wins
    assert bound_heap() == 0 and heap_env() == {}


@linux
def test_freed_blocks_return_to_the_system():
    # A 2 MB block freed below the threshold stays in the heap; mapped on its own it goes back.
    code = """
import ctypes, re, sys
from quietscope.runner.heap import bound_heap
applied = bound_heap(1 << 20) if sys.argv[1] == "bound" else 0
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # freeing a mapped block below 32 MB raises glibc's threshold to its size
blocks = [libc.malloc(2 << 20) for _ in range(200)]
for i, b in enumerate(blocks):
    ctypes.memset(b, 1, 2 << 20)
keep = [b for i, b in enumerate(blocks) if i % 2]  # every other block stays: holes the heap cannot trim
for i, b in enumerate(blocks):
    if not i % 2:
        libc.free(b)
rss = int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
print(applied, rss)
"""
    # Any MALLOC_*_ variable turns glibc's dynamic threshold off; distributed's nanny puts
    # MALLOC_TRIM_THRESHOLD_ into its parent's environment, so this test starts clean.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = {}
    for mode in ("bound", "free"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, env=env)
        out[mode] = [int(v) for v in res.stdout.split()]
    assert out["bound"][0] == 1 << 20
    assert out["free"][1] - out["bound"][1] >= 150  # 100 freed 2 MB holes: ~200 MB kept without the bound


def test_predict_bounds_the_heap_before_the_model_loads(monkeypatch, tmp_path):
    # The model load and the memory probe free large tensors: bound after them, the heap is
    # already fragmented when the first block starts (benchmarks §9c/9d).
    import quietscope.workflows.predict as wp

    calls = []
    monkeypatch.setattr(wp, "bound_heap", lambda: calls.append("bound") or 0)

    def loaded(*args, **kwargs):
        calls.append("load")
        raise RuntimeError("stop here")

    monkeypatch.setattr(wp, "load_for_inference", loaded)
    monkeypatch.setattr(wp, "open_image", lambda *a, **k: SimpleNamespace(spatial_axes="yx", n_channels=1))
    with pytest.raises(RuntimeError, match="stop here"):
        wp.predict(str(tmp_path / "m.qs"), str(tmp_path / "in.tif"), str(tmp_path / "out.ome.zarr"))
    assert calls == ["bound", "load"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is a Linux getrusage behaviour")
def test_peak_rss_of_a_child_is_its_own_not_its_large_parents():
    # getrusage's ru_maxrss survives fork and exec: a child of a parent that once held 300 MB
    # reports >= 300 MB whatever it uses itself. peak_rss_bytes must report the child's own.
    import numpy as np

    hog = np.ones(300 * 2**20 // 8)  # touched, so resident
    code = ("import resource; from quietscope.runner.heap import peak_rss_bytes; "
            "print(peak_rss_bytes() >> 20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)")
    own, inherited = (int(v) for v in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                     check=True).stdout.split())
    del hog
    assert inherited >= 300  # the kernel's carried-over figure: what the benchmarks used to report
    assert own < 200, own


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_of_another_process_by_pid_and_zero_once_it_has_gone():
    # How benchmarks/lightsheet_rss.py polls its predict child.
    child = subprocess.Popen([sys.executable, "-c", "import numpy as np, sys; a = np.ones(200 * 2**20 // 8); "
                              "print('ok', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "ok"
    peak = peak_rss_bytes(child.pid) >> 20
    child.communicate("")
    assert 200 <= peak < 400, peak
    assert peak_rss_bytes(os.getpid()) == peak_rss_bytes()
    assert peak_rss_bytes(child.pid) == 0  # reaped: no /proc entry
