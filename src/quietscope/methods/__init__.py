"""Methods behind one protocol (:class:`~quietscope.methods.base.Method`) and their registry.

Importing this package registers every method under its ``--method`` name.
"""

from quietscope.methods import (
    bayes,  # noqa: F401  (registers bayes-poisson, bayes-gauss)
    denoisplit,  # noqa: F401  (registers denoisplit, musplit)
    n2v,  # noqa: F401  (registers n2v, n2v2)
    n2v_deconv,  # noqa: F401  (registers n2v-deconv)
    pn2v,  # noqa: F401  (registers pn2v)
)
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
