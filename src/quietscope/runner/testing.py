"""Tiny deterministic processor factories for tests and benchmarks of the runner.

They are picklable and importable by worker processes (unlike classes in a test module), need
no model file and no torch (except :class:`UNetProcessor`), and can record what they did:

* ``log_dir``: one ``load-<pid>-<uuid>`` file per :meth:`build` (model loads) and one
  ``call-<pid>-<uuid>`` file per tile holding ``start end`` times (tasks that ran, overlaps).
* ``crash_dir``: the first tile call of the whole run (whichever worker gets it) creates
  ``crash_dir/crashed`` and kills its worker process with ``os._exit``.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quietscope.runner.heap import peak_rss_bytes


def _box3(tile: np.ndarray) -> np.ndarray:
    """3x3 mean over the last two axes (reflect border); needs a halo of 1.

    A fixed-order sum of shifted views, so each output voxel's arithmetic does not depend on
    the tile's extent (unlike running-sum filters): block and whole-image results are bit-equal.
    """
    x = tile.astype(np.float32)
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(x, pad, mode="reflect")
    h, w = x.shape[-2:]
    acc = np.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            acc += p[..., dy : dy + h, dx : dx + w]
    return acc / np.float32(9)


@dataclass(frozen=True)
class BoxProcessor:
    """``tile -> scale * box3(tile) + offset`` (float32), halo 1 voxel, factor 1."""

    scale: float = 2.0
    offset: float = 1.0
    sleep: float = 0.0
    log_dir: str | None = None
    crash_dir: str | None = None
    label: str = ""

    @property
    def token(self) -> str:
        return "box-" + hashlib.sha256(f"{self.scale}|{self.offset}|{self.label}".encode()).hexdigest()[:12]

    def apply(self, tile: np.ndarray) -> np.ndarray:
        return (np.float32(self.scale) * _box3(tile) + np.float32(self.offset)).astype(np.float32)

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        log_dir = Path(self.log_dir) if self.log_dir else None
        if log_dir is not None:
            (log_dir / f"load-{os.getpid()}-{uuid.uuid4().hex[:8]}").write_text("")
        crash = Path(self.crash_dir) / "crashed" if self.crash_dir else None

        def fn(tile: np.ndarray) -> np.ndarray:
            t0 = time.time()
            if crash is not None:
                try:
                    fd = os.open(crash, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os._exit(17)  # a worker dying mid-task (OOM killer, node failure, ...)
            if self.sleep:
                time.sleep(self.sleep)
            out = self.apply(tile)
            if log_dir is not None:
                (log_dir / f"call-{os.getpid()}-{uuid.uuid4().hex[:8]}").write_text(f"{t0} {time.time()}")
            return out

        return fn


@dataclass(frozen=True)
class UNetProcessor:
    """A randomly initialised (seeded) quietscope U-Net: real convolution work for benchmarks."""

    ndim: int = 2
    depth: int = 2
    filters: int = 16
    seed: int = 0

    @property
    def token(self) -> str:
        return f"unet-{self.ndim}-{self.depth}-{self.filters}-{self.seed}"

    @property
    def factor(self) -> int:
        return 2**self.depth

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        import torch

        from quietscope.nets.unet import UNet

        torch.manual_seed(self.seed)
        net = UNet(self.ndim, 1, 1, depth=self.depth, filters=self.filters).eval()

        def fn(tile: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32))[None]
                return net(x)[0].numpy()

        return fn


def noop(*args: object) -> int:
    """A task that does nothing (scheduling-overhead benchmark)."""
    return 0


def worker_peak_rss() -> int:
    """Peak resident memory of the calling process in bytes (:func:`quietscope.runner.heap.peak_rss_bytes`)."""
    return peak_rss_bytes()


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def start_environ() -> dict[str, str]:
    """The environment this process was started with (what glibc read at start; Linux only)."""
    raw = Path(f"/proc/{os.getpid()}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


@dataclass(frozen=True)
class DeviceProbeProcessor:
    """Fills each block with the number in its worker's ``CUDA_VISIBLE_DEVICES`` (halo 0).

    Shows which GPU worker computed each block without a GPU: the output is a map of devices.
    A block whose task did not request ``GPU=1`` is filled with ``-1`` instead.
    """

    sleep: float = 0.0

    @property
    def token(self) -> str:
        return f"device-probe-{self.sleep}"

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        device = float(os.environ.get("CUDA_VISIBLE_DEVICES", "-2").split(",")[0])

        def fn(tile: np.ndarray) -> np.ndarray:
            from distributed import get_worker
            from distributed.utils import thread_state

            time.sleep(self.sleep)
            restrictions = get_worker().state.tasks[thread_state.key].resource_restrictions
            value = device if restrictions == {"GPU": 1} else -1.0
            return np.full(tile.shape, value, dtype=np.float32)

        return fn
