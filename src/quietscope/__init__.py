"""quietscope: self-supervised denoising and splitting of microscopy volumes larger than memory."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("quietscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from quietscope.errors import QuietscopeError  # noqa: E402

__all__ = ["QuietscopeError", "__version__"]
