"""Factorization methods: one file per method, each a config dataclass + a pure factorize function.

Importing this package registers the built-in methods.
"""

from . import svd, whiten  # noqa: F401  (registration)
from . import asvd, dictionary, lowrank_quant, lowrank_sparse  # noqa: F401  (registration)
from . import fisher_whiten, fwsvd  # noqa: F401  (registration)
from .registry import Method, get_method, method_names, register_method

__all__ = ["Method", "get_method", "method_names", "register_method"]
