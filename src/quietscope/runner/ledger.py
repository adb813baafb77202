"""The resume ledger and the job lock, stored with the output's data (any store: local or URL).

One empty marker object per finished block, written *after* the block's pixels; a block either
has its marker or is redone. Marker objects need no locking and survive any crash.

While a job runs the ledger is the folder ``.quietscope/`` inside the output:

* ``lock.json``: the one writer's lock (owner, host, pid, heartbeat); taken before anything
  else is written, refreshed every :data:`HEARTBEAT_S` seconds, stale when its process is gone
  (same host) or its heartbeat is older than :data:`STALE_S` (any host).
* ``job.json``: the job record (input, processor, geometry), written before the output's
  metadata, so a job killed at any moment can be resumed.
* ``done/<block>``: the block markers (level 0); ``levels/<tile>``: the markers of coarse
  pyramid tiles written after level 0 (progressive pyramid, ``runner/pyramid.py``).

The folder is itself marked as a (child) zarr group of the output's zarr format, so listing
the output's members is clean while a job runs; it holds no arrays, so ``array_keys()``
names only the pyramid levels.

When the job is complete, its record moves into the output group's attributes
(``quietscope_job``) and the folder is removed: a finished output holds nothing but zarr nodes.

Every chunk is stored, fill value or not (``array.write_empty_chunks``), so chunk presence can
be checked against the plan: "complete" is only set when every block's marker and every chunk
of every level is there, and ``--resume`` redoes the blocks whose chunks went missing.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import zarr

from quietscope.errors import OutputError
from quietscope.io import stores

log = logging.getLogger(__name__)

# Chunks equal to the fill value are stored too: without this a deleted chunk cannot be told
# from an empty one, and a finished output could not be verified. Set at import so that every
# process that writes blocks (worker processes import this module through the executor) agrees.
zarr.config.set({"array.write_empty_chunks": True})

LEDGER_DIR = ".quietscope"
LOCK_NAME = "lock.json"
#: Group attribute holding the job record of a finished job.
JOB_ATTR = "quietscope_job"
#: Folder (inside the ledger) of the markers of finished coarse pyramid tiles.
LEVELS_DIR = "levels"
#: Seconds between heartbeats of a running job's lock.
HEARTBEAT_S = float(os.environ.get("QUIETSCOPE_LOCK_HEARTBEAT_S", "10"))
#: A lock whose heartbeat is older than this is stale (its job died on another host).
STALE_S = float(os.environ.get("QUIETSCOPE_LOCK_STALE_S", "120"))
#: Seconds an exiting job waits for its lock to be removed (a vanished store never answers).
RELEASE_S = 1.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _host_id() -> str:
    """This host and pid namespace: a pid is only meaningful within both."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        boot, ns = "", ""
    return f"{socket.gethostname()}|{boot}|{ns}"


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # containers without a passwd entry
        return str(os.getuid())


def lock_path(output: str) -> str:
    """Where the lock of ``output`` lives: inside an OME-Zarr's ledger, beside a TIFF file."""
    if output.lower().endswith((".tif", ".tiff")):
        head, _, name = output.rpartition("/")
        return f"{head}/.{name}.quietscope-lock.json" if head else f".{name}.quietscope-lock.json"
    return f"{output}/{LEDGER_DIR}/{LOCK_NAME}"


class JobLock:
    """The exclusive lock of one output: ``.quietscope/lock.json`` with owner, host and heartbeat.

    A TIFF output is one file, written whole at the end of its job: its lock is a hidden file
    beside it, ``.NAME.tif.quietscope-lock.json`` (:func:`lock_path`).

    Parameters
    ----------
    output : str
        The output (local path or URL).
    command : str
        What the owner runs (named in the refusal another run gets).
    """

    def __init__(self, output: str, command: str = "predict") -> None:
        self.output = str(output).rstrip("/")
        self.path = lock_path(self.output)
        self.command = command
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"token": self.token, "owner": _user(), "host": socket.gethostname(), "host_id": _host_id(),
                "pid": pid, "proc_start": _proc_start(pid), "command": self.command, "started": self._started,
                "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        text = stores.read_text(self.path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # half-written by a store without atomic puts: treat as foreign
            return {"token": "?", "heartbeat": 0.0}

    def acquire(self) -> None:
        """Take the lock (or a stale one over); refuse with one line when a live job holds it.

        Raises
        ------
        OutputError
            Another live job writes this output.
        StorageError
            The store cannot be written.
        """
        self._started = _now()
        for _ in range(5):
            if stores.create_exclusive(self.path, json.dumps(self._record())):
                self._start_heartbeat()
                return
            other = self.read()
            if other is None:
                continue  # released between our attempt and the read
            why = stale_reason(other)
            if why is None:
                raise OutputError(busy_message(self.output, other))
            log.warning("taking over the lock of %s: %s", self.output, why)
            self._break(other)
        raise OutputError(f"output {self.output!r}: could not take its lock (other jobs keep taking it); "
                          "make sure only one job writes it")

    def _break(self, other: dict[str, Any]) -> None:
        if stores.is_local(self.path):
            moved = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(stores.local_path(self.path), stores.local_path(moved))
            except FileNotFoundError:
                return
            text = stores.read_text(moved) or "{}"
            if json.loads(text).get("token") != other.get("token"):
                # Another run took the stale lock over between our read and our rename: put its
                # (fresh) lock back; link fails if a third run created one meanwhile.
                try:
                    os.link(stores.local_path(moved), stores.local_path(self.path))
                except FileExistsError:
                    pass
            stores.remove(moved)
        else:  # object stores have no rename; two runs breaking one stale lock at once is not excluded
            stores.remove(self.path)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="quietscope-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self.read()
                if current is None and not stores.exists(self.path.rpartition("/")[0] or "."):
                    self.lost = True  # the output went away with its lock: the failing writes say so
                    return
                if current is None or current.get("token") != self.token:
                    log.error("the lock of %s was taken by another job; this job's output may be overwritten", self.output)
                    self.lost = True
                    return
                stores.write_text(self.path, json.dumps(self._record()))
            except Exception as exc:  # a failing store is reported by the block writes themselves
                log.debug("lock heartbeat of %s failed: %s", self.output, exc)

    def stop(self) -> None:
        """Stop the heartbeat (the lock object stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def release(self, timeout: float | None = None) -> None:
        """Stop the heartbeat and remove the lock if it is still ours, waiting at most ``timeout``
        seconds (default :data:`RELEASE_S`); never raises.

        A store that stopped answering would otherwise hold the exit through its client's
        retries (tens of seconds); a lock left behind that way is stale, taken over at once by
        the next run on this host and after :data:`STALE_S` elsewhere.
        """
        worker = threading.Thread(target=self._release, name="quietscope-lock-release", daemon=True)
        worker.start()
        worker.join(RELEASE_S if timeout is None else timeout)
        if worker.is_alive():
            log.debug("the lock of %s was not removed within %.0f s (the store does not answer); it goes stale",
                      self.output, RELEASE_S if timeout is None else timeout)

    def _release(self) -> None:
        self.stop()
        try:
            current = self.read()
            if current is not None and current.get("token") == self.token:
                stores.remove(self.path)
        except Exception as exc:  # the store may be what failed; a stale lock is taken over later
            log.debug("could not remove the lock of %s: %s", self.output, exc)


def stale_reason(lock: dict[str, Any], now: float | None = None) -> str | None:
    """Why ``lock`` is stale (its job is dead), or None when its job may be running."""
    now = time.time() if now is None else now
    age = now - float(lock.get("heartbeat", 0.0))
    pid = int(lock.get("pid", 0) or 0)
    if lock.get("host_id") == _host_id() and pid:
        if not _pid_alive(pid) or (lock.get("proc_start") and _proc_start(pid) != lock.get("proc_start")):
            return f"its process {pid} on this host is gone"
        return None
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s)"
    return None


def busy_message(output: str, lock: dict[str, Any]) -> str:
    """The one line a second run on a locked output gets."""
    age = max(0.0, time.time() - float(lock.get("heartbeat", 0.0)))
    return (f"output {output!r} is being written by another quietscope job ({lock.get('command', '?')} by "
            f"{lock.get('owner', '?')}, pid {lock.get('pid', '?')} on host {lock.get('host', '?')}, started "
            f"{lock.get('started', '?')}, last heartbeat {age:.0f} s ago); wait for it to finish or stop it "
            f"(a dead job's lock is taken over after {STALE_S:.0f} s without heartbeat, at once on its own host)")


class Ledger:
    """The resume ledger of one output (local path or URL)."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = str(output).rstrip("/")
        self.root = f"{self.output}/{LEDGER_DIR}"
        self.done_dir = f"{self.root}/done"
        self.lock: JobLock | None = None

    def create(self, job: dict[str, Any]) -> None:
        """Write the job record (before the output's metadata: resumable from the first second)."""
        stores.write_text(f"{self.root}/job.json", json.dumps(job, indent=2, sort_keys=True, default=str))

    @property
    def levels_dir(self) -> str:
        return f"{self.root}/{LEVELS_DIR}"

    def mark_as_zarr_group(self) -> None:
        """Make the ledger folder a zarr group node of the output's format (clean listings).

        Written by hand (one small JSON file) after the output's metadata: ``zarr.open_group``
        would also accept the folder, but this must not depend on zarr's handling of the marker
        files inside it.
        """
        note = {"quietscope_ledger": "resume ledger of a running quietscope job; removed when the job completes"}
        if stores.exists(f"{self.output}/zarr.json"):
            doc = {"zarr_format": 3, "node_type": "group", "attributes": note}
            stores.write_text(f"{self.root}/zarr.json", json.dumps(doc))
        elif stores.exists(f"{self.output}/.zgroup"):
            stores.write_text(f"{self.root}/.zgroup", json.dumps({"zarr_format": 2}))
            stores.write_text(f"{self.root}/.zattrs", json.dumps(note))

    def mark_tile_done(self, key: str) -> None:
        """Marker of a finished coarse pyramid tile (written after its pixels, like a block's)."""
        stores.write_text(f"{self.levels_dir}/{key}", "")

    def tiles_done(self) -> set[str]:
        return {n for n in stores.list_names(self.levels_dir) if not n.startswith(".")}

    def unmark_levels(self, levels: set[int]) -> None:
        """Forget the finished tiles of ``levels`` (their chunks went missing): resume rebuilds them."""
        prefixes = tuple(f"k{k}_" for k in levels)
        for name in self.tiles_done():
            if name.startswith(prefixes):
                stores.remove(f"{self.levels_dir}/{name}")

    def has_record(self) -> bool:
        return stores.exists(f"{self.root}/job.json") or self._finished_record() is not None

    def job(self) -> dict[str, Any]:
        text = stores.read_text(f"{self.root}/job.json")
        if text is not None:
            return json.loads(text)
        record = self._finished_record()
        if record is None:
            raise OutputError(f"{self.output!r} has no quietscope job record; it cannot be resumed, use --overwrite")
        return record

    def _finished_record(self) -> dict[str, Any] | None:
        try:
            record = zarr.open_group(stores.zarr_store_url(self.output), mode="r").attrs.get(JOB_ATTR)
        except Exception:  # not a zarr group at all: no record
            return None
        return dict(record) if isinstance(record, dict) else None

    def check_same_job(self, job: dict[str, Any]) -> None:
        old = self.job()
        keys = [k for k in job if k not in ("started", "complete")]

        def norm(k: str, v: Any) -> Any:
            v = json.loads(json.dumps(v, default=str))
            return stores.canonical(v) if k == "input" and isinstance(v, str) else v

        diff = [k for k in keys if norm(k, old.get(k)) != norm(k, job[k])]
        if diff:
            raise OutputError(
                f"--resume: {self.output!r} was started with different settings ({', '.join(diff)}); "
                "use the same options or --overwrite"
            )

    def mark_done(self, key: str) -> None:
        stores.write_text(f"{self.done_dir}/{key}", "")

    def unmark(self, keys: set[str]) -> None:
        """Forget finished blocks (their chunks went missing): ``--resume`` redoes them."""
        for key in keys:
            stores.remove(f"{self.done_dir}/{key}")

    def done(self) -> set[str]:
        return {n for n in stores.list_names(self.done_dir) if not n.startswith(".")}

    def set_complete(self) -> None:
        """Move the job record into the group's attributes, remove the ledger folder (and the lock)."""
        job = self.job()
        job["complete"] = True
        if self.lock is not None:
            self.lock.stop()
        group = zarr.open_group(stores.zarr_store_url(self.output), mode="r+")
        group.attrs[JOB_ATTR] = json.loads(json.dumps(job, default=str))
        stores.remove(self.root, recursive=True)
        self.lock = None
