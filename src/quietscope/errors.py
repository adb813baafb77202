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
