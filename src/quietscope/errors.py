"""The library's own exceptions.

Every error a user can cause (bad path, bad axes, mismatched model, ...) is raised as a
:class:`QuietscopeError` whose message names the problem *and* the fix, in one line. The CLI
prints that line and exits non-zero; anything else is a bug.
"""


class QuietscopeError(Exception):
    """Base class: a problem the user can act on."""


class InputError(QuietscopeError):
    """The input data cannot be used as given (missing, wrong axes, dtype, NaNs, ...)."""


class OutputError(QuietscopeError):
    """The output cannot be written (exists, inside the input, ...)."""


class ModelError(QuietscopeError):
    """A model file is unreadable, unsafe, or does not match the data."""


class ConfigError(QuietscopeError):
    """An option or configuration value is invalid."""


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
