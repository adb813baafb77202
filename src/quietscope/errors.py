"""The library's own exceptions.

Every error a user can cause (bad path, bad axes, mismatched model, ...) is raised as a
:class:`QuietscopeError` whose message names the problem *and* the fix, in one line. The CLI
prints that line and exits non-zero; anything else is a bug.
"""

import errno


class QuietscopeError(Exception):
    """Base class: a problem the user can act on."""


class InputError(QuietscopeError):
    """The input data cannot be used as given (missing, wrong axes, dtype, NaNs, ...)."""


class OutputError(QuietscopeError):
    """The output cannot be written (exists, inside the input, ...)."""


class StorageError(OutputError):
    """Storage failed under the job: read-only, permission denied, disk full, quota, gone, unreachable."""


class ModelError(QuietscopeError):
    """A model file is unreadable, unsafe, or does not match the data."""


class ConfigError(QuietscopeError):
    """An option or configuration value is invalid."""


_FIXES = {
    errno.EROFS: ("is on a read-only file system", "write the output to a writable location"),
    errno.EACCES: ("is not writable (permission denied)", "choose a folder you may write to, or fix its permissions"),
    errno.EPERM: ("may not be changed (operation not permitted: an immutable or protected folder?)",
                  "choose another output folder (or lift the attribute, chattr -i)"),
    errno.ENOSPC: ("ran out of space (disk full)", "free space (or choose a bigger volume), then rerun with --resume"),
    errno.EDQUOT: ("exceeded the disk quota", "free space within your quota, then rerun with --resume"),
    errno.ENOENT: ("vanished while being written (deleted or unmounted?)", "restore the location, then rerun with --resume"),
    errno.ESTALE: ("went away (stale network file handle)", "remount the file system, then rerun with --resume"),
    errno.EIO: ("gave an I/O error", "check the storage (dmesg, the server), then rerun with --resume"),
    errno.ENOTDIR: ("has a file where a folder is needed", "choose another output path"),
}


def storage_message(exc: OSError, path: object = None, role: str = "output") -> str:
    """One line naming the storage fault, the path and the fix (for an OSError from I/O).

    Examples
    --------
    >>> storage_message(OSError(errno.ENOSPC, "No space left on device"), "out.ome.zarr")
    "output 'out.ome.zarr' ran out of space (disk full); free space (or choose a bigger volume), then rerun with --resume"
    """
    where = path if path is not None else (exc.filename or "the output")
    code = exc.errno or (errno.ENOENT if isinstance(exc, FileNotFoundError) else -1)
    what, fix = _FIXES.get(code, (f"failed: {exc.strerror or exc}", "check the storage and rerun with --resume"))
    if code == errno.ENOENT and exc.errno is None and str(exc):
        # zarr and s3fs raise it without errno, naming what is gone ("The specified bucket does not exist")
        what = f"vanished while being written ({str(exc).splitlines()[0]})"
    return f"{role} {str(where)!r} {what}; {fix}"


def validation_message(exc: Exception) -> str:
    """A pydantic ValidationError (or any exception) reduced to one line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg')}")
        return "; ".join(parts)
    return str(exc).splitlines()[0]
