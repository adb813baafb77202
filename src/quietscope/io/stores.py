"""Where data lives: local paths and URLs (``s3://``, ``gs://``, ``https://``, ``file://``) through fsspec.

Everything that touches an output's *files* rather than its arrays goes through here: the
writability probe run before any work starts, exclusive creation of small objects (the job
lock), listing what is stored, and clearing an output for ``--overwrite``. Pixels themselves
go through zarr, which uses the same fsspec file systems for URLs.

Credentials are never taken from the command line: s3fs/gcsfs read the usual environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...) and profile files.
"""

from __future__ import annotations

import configparser
import errno
import itertools
import logging
import os
import shutil
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import fsspec
import fsspec.config
import zarr
from fsspec.implementations.local import LocalFileSystem

from quietscope.errors import OutputError, StorageError, storage_message

log = logging.getLogger(__name__)

#: Schemes accepted for inputs; outputs additionally need a writable one.
URL_SCHEMES = ("s3", "gs", "gcs", "http", "https", "file", "memory")
READ_ONLY_SCHEMES = ("http", "https")
OUTPUT_SUFFIXES = (".zarr", ".zarr/", ".tif", ".tiff")


#: botocore retries for S3 unless the user chose them: the "standard" mode with 3 attempts (the
#: AWS SDKs' default) instead of botocore's "legacy" 5 attempts, whose backoff (up to 1+2+4+8 s
#: per request) made a vanished store take 30-60 s to report. Transient errors (503 SlowDown,
#: throttling, a dropped connection) are still retried, with a bounded backoff.
S3_RETRIES = {"mode": "standard", "max_attempts": 3}


def user_sets_s3_retries(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether the user chose botocore's retries: ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS``, or
    ``retry_mode`` / ``max_attempts`` in the profile of ``AWS_CONFIG_FILE`` (``~/.aws/config``).
    """
    if "AWS_RETRY_MODE" in env or "AWS_MAX_ATTEMPTS" in env:
        return True
    profile = env.get("AWS_PROFILE", "default")
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.expanduser(env.get("AWS_CONFIG_FILE", "~/.aws/config")))
    except configparser.Error:
        return False
    section = profile if profile == "default" else f"profile {profile}"
    return parser.has_section(section) and any(parser.has_option(section, k) for k in ("retry_mode", "max_attempts"))


def configure_s3_retries(conf: dict[str, Any] | None = None) -> None:
    """Give s3fs file systems :data:`S3_RETRIES` through fsspec's per-protocol defaults (what
    zarr's stores are built with, in this process and in worker processes, which import this
    module), unless the user chose retries (environment, AWS profile, fsspec config).
    """
    conf = fsspec.config.conf if conf is None else conf
    if user_sets_s3_retries():
        return
    config_kwargs = conf.setdefault("s3", {}).setdefault("config_kwargs", {})
    config_kwargs.setdefault("retries", dict(S3_RETRIES))


configure_s3_retries()


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a URL (``scheme://...``) rather than a local path."""
    text = str(path)
    return "://" in text and text.split("://", 1)[0].lower() in URL_SCHEMES


def scheme(path: str | os.PathLike) -> str:
    """``s3``, ``https``, ... or ``file`` for local paths (``file://`` URLs included)."""
    return str(path).split("://", 1)[0].lower() if is_url(path) else "file"


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on the local file system (a plain path or ``file://``)."""
    return scheme(path) == "file"


def local_path(path: str | os.PathLike) -> Path:
    """The local path of a plain path or a ``file://`` URL."""
    text = str(path)
    return Path(text[len("file://"):] if text.lower().startswith("file://") else text)


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """``(fsspec file system, path inside it)`` for a local path or URL.

    Raises
    ------
    ConfigError
        The scheme needs a package that is not installed (s3fs, gcsfs, aiohttp).
    """
    text = str(path)
    if is_local(text):
        return LocalFileSystem(), str(local_path(text).absolute())
    try:
        fs, inner = fsspec.core.url_to_fs(text)
        # Other processes (workers) write ledger markers: never answer from a stale listing.
        fs.invalidate_cache()
    except ImportError as exc:
        raise StorageError(f"{text!r} needs an optional package ({exc}); install it, e.g. pip install s3fs") from None
    return fs, inner.rstrip("/")


def canonical(path: str | os.PathLike) -> str:
    """One spelling per location: resolved absolute local paths, URLs without trailing slash.

    ``--resume`` compares inputs by this, so ``in.zarr`` and ``/data/in.zarr`` are the same input.
    """
    if is_local(path):
        return str(local_path(path).resolve())
    text = str(path).rstrip("/")
    head, rest = text.split("://", 1)
    return f"{head.lower()}://{rest}"


def zarr_store_url(path: str | os.PathLike) -> str:
    """What zarr should open: local paths as plain paths, URLs as they are."""
    return str(local_path(path)) if is_local(path) else str(path).rstrip("/")


def check_output_name(output: str | os.PathLike) -> None:
    """Refuse outputs that are neither an OME-Zarr nor a TIFF by name, and read-only schemes.

    Raises
    ------
    OutputError
        ``-o out.png`` (it would be a zarr folder named ``out.png``), or an ``https://`` output.
    """
    text = str(output).rstrip("/")
    if scheme(text) in READ_ONLY_SCHEMES:
        raise OutputError(f"output {text!r}: {scheme(text)}:// is read-only; write to a local path, s3:// or gs://")
    if not is_local(text) and text.lower().endswith((".tif", ".tiff")):
        raise OutputError(f"output {text!r}: TIFF outputs must be local files; write an .ome.zarr to {scheme(text)}://")
    if not text.lower().endswith(OUTPUT_SUFFIXES):
        raise OutputError(f"output {text!r} is neither .ome.zarr/.zarr nor .tif/.tiff; name it e.g. "
                          f"{Path(text).stem}.ome.zarr")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(output: str | os.PathLike, needed_bytes: int | None = None) -> None:
    """Check that ``output`` can be created and written, before any work starts.

    Locally: the nearest existing folder on the way to ``output`` must accept a new file (a
    probe file is written and removed, so read-only mounts, immutable folders and missing
    permissions are found even for root). Free space smaller than ``needed_bytes`` (the
    uncompressed size) is only warned about: compression usually makes outputs smaller.
    Remote: a probe object is written next to the output and removed.

    Raises
    ------
    StorageError
        The location is read-only, not permitted, full, or unreachable.
    """
    text = str(output).rstrip("/")
    if not is_local(text):
        _probe_remote(text)
        return
    target = local_path(text)
    base = target if target.is_dir() else _existing_ancestor(target.parent)
    if not base.is_dir():
        raise OutputError(f"output {text!r}: {str(base)!r} is a file, not a folder; choose another output path")
    probe = base / f".quietscope-probe-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"quietscope write probe")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(storage_message(exc, text)) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            log.warning("output %s needs up to %.3g GB uncompressed but only %.3g GB are free on %s; "
                        "a full disk stops the run (finish it with --resume once space is freed)",
                        text, needed_bytes / 1e9, free / 1e9, base)


def _probe_remote(url: str) -> None:
    fs, inner = filesystem(url)
    probe = f"{inner}.quietscope-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"quietscope write probe")
        fs.rm_file(probe)
    except OSError as exc:
        raise StorageError(storage_message(exc, url)) from None
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        raise StorageError(f"cannot write to {url!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "check the bucket, the endpoint (AWS_ENDPOINT_URL) and the credentials") from None


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists on its store (local or fsspec URL)."""
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def read_text(path: str | os.PathLike) -> str | None:
    """The text of a small object, or None when it does not exist."""
    fs, inner = filesystem(path)
    try:
        return fs.cat_file(inner).decode()
    except FileNotFoundError:
        return None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small object whole (locally via a temporary file and rename: never half-written)."""
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        p = Path(inner)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")
        tmp.write_text(text)
        tmp.replace(p)
    else:
        fs.pipe_file(inner, text.encode())


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create a small object only if it does not exist; False when it does (atomic: one winner).

    Locally ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+); on S3 a conditional
    put (``If-None-Match: *``, honoured by AWS, MinIO and Ceph RGW recent releases).
    """
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        p = Path(inner)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.new{os.getpid()}-{uuid.uuid4().hex[:6]}")
        tmp.write_text(text)
        try:
            os.link(tmp, p)  # fails if p exists: the content appears whole, never half-written
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True
    try:
        fs.pipe_file(inner, text.encode(), mode="create")
    except FileExistsError:
        return False
    except Exception as exc:  # PreconditionFailed from stores that report it differently
        if "precondition" in str(exc).lower() or "412" in str(exc):
            return False
        raise
    return True


def remove(path: str | os.PathLike, recursive: bool = False) -> None:
    """Remove an object (or a folder with ``recursive``); missing is fine."""
    fs, inner = filesystem(path)
    try:
        if isinstance(fs, LocalFileSystem):
            p = Path(inner)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        elif fs.exists(inner):
            fs.rm(inner, recursive=recursive)
    except FileNotFoundError:
        pass


def list_names(path: str | os.PathLike) -> list[str]:
    """Names directly below ``path`` (empty when it does not exist)."""
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        p = Path(inner)
        return sorted(e.name for e in os.scandir(p)) if p.is_dir() else []
    try:
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(inner, detail=False))
    except FileNotFoundError:
        return []


def list_keys(path: str | os.PathLike) -> set[str]:
    """Every stored object below ``path``, as keys relative to it (``c/0/1``)."""
    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        root = Path(inner)
        out: set[str] = set()
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for f in files:
                out.add(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        return out
    try:
        return {k[len(inner) + 1:] for k in fs.find(inner)}
    except FileNotFoundError:
        return set()


def clear_except(path: str | os.PathLike, keep: str) -> None:
    """Remove everything below ``path`` except the object ``keep`` (a relative key such as
    ``.quietscope/lock.json``): ``--overwrite`` clears an output without dropping its lock.
    """
    head, _, tail = keep.partition("/")
    for name in list_names(path):
        child = f"{str(path).rstrip('/')}/{name}"
        if name != head:
            remove(child, recursive=True)
        elif tail:
            clear_except(child, tail)


#: Object-store client libraries whose errors are not OSErrors (a store gone away mid-run).
STORE_CLIENTS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")


def is_store_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the storage failing (an OSError, or an object-store client's error)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in STORE_CLIENTS


def store_failure_message(exc: BaseException, output: str) -> str:
    """One line for an object-store client's error under a running job (not an OSError).

    A store that stopped answering is named by its endpoint (not by the request URL, which
    carries query strings); anything else by the client's first line.

    Examples
    --------
    >>> from botocore.exceptions import EndpointConnectionError      # doctest: +SKIP
    >>> store_failure_message(EndpointConnectionError(endpoint_url="http://s3.lab:9000/b/x?list-type=2"),
    ...                       "s3://b/out.ome.zarr")                   # doctest: +SKIP
    "output 's3://b/out.ome.zarr': the store stopped answering (cannot connect to http://s3.lab:9000); ..."
    """
    url = (getattr(exc, "kwargs", None) or {}).get("endpoint_url")
    if url and type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        parts = urllib.parse.urlsplit(url)
        return (f"output {output!r}: the store stopped answering (cannot connect to {parts.scheme}://{parts.netloc}); "
                "check that it is up and reachable (AWS_ENDPOINT_URL), then rerun with --resume")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"output {output!r}: the store failed ({type(exc).__name__}: {first}); check the endpoint, "
            "the credentials and the network, then rerun with --resume")


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a disk-full or quota-exceeded error."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def missing_chunks(path: str | os.PathLike, n_levels: int) -> dict[int, list[tuple[int, ...]]]:
    """Per level ``0..n_levels-1``, the grid indices of chunks (shards when sharded) not stored.

    Needs outputs written with ``array.write_empty_chunks`` (every chunk stored, empty or not).
    One listing per level: cheap next to the data, also on object stores (1000 keys a request).
    """
    out: dict[int, list[tuple[int, ...]]] = {}
    root = str(path).rstrip("/")
    for k in range(n_levels):
        arr = zarr.open_array(store=zarr_store_url(f"{root}/{k}"), mode="r")
        unit = getattr(arr, "shards", None) or arr.chunks
        counts = [-(-s // u) for s, u in zip(arr.shape, unit)]
        stored = list_keys(f"{root}/{k}")
        gone = [idx for idx in itertools.product(*(range(c) for c in counts))
                if arr.metadata.encode_chunk_key(idx) not in stored]
        if gone:
            out[k] = gone
    return out
