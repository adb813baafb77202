"""Methods behind one protocol (:class:`~quietscope.methods.base.Method`) and their registry.

Importing this package registers every method under its ``--method`` name.
"""

from quietscope.methods import bayes  # noqa: F401  (registers bayes-poisson, bayes-gauss)
from quietscope.methods import n2v  # noqa: F401  (registers n2v, n2v2)
from quietscope.methods.base import (
    Method,
    MethodConfig,
    NetConfig,
    available_methods,
    build_method,
    get_method_class,
    register,
)

__all__ = [
    "Method",
    "MethodConfig",
    "NetConfig",
    "available_methods",
    "build_method",
    "get_method_class",
    "register",
]
