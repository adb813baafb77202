"""Getting a dask ``Client``: an in-process local cluster by default, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from quietscope.errors import ConfigError

log = logging.getLogger(__name__)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def dask_client(scheduler: str | None = None, threads: int | None = None) -> Iterator["object"]:
    """Yield a ``distributed.Client``.

    Without ``scheduler``: an in-process ``LocalCluster`` (one worker, ``threads`` threads,
    default 2 so reading/writing one block overlaps computing another), in-process comms
    HTTP endpoints on loopback only. With ``scheduler`` (``tcp://host:8786`` or ``tls://...``): connect to a
    running ``distributed`` scheduler.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler!r} ({exc}); check the address") from None
        log.info("connected to scheduler %s (%d workers)", scheduler, len(client.scheduler_info()["workers"]))
        try:
            yield client
        finally:
            client.close()
        return
    n_threads = threads or 2
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=n_threads,
        processes=False,
        # Loopback only: an in-process cluster needs no listener, but distributed always
        # starts HTTP servers; never expose them on a public interface.
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        silence_logs=logging.WARNING,
    )
    client = Client(cluster)
    log.info("local in-process dask cluster: 1 worker, %d threads (in-process; HTTP on 127.0.0.1 only)", n_threads)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
