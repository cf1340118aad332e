"""Factorization methods: one file per method, each a config dataclass + a pure factorize function.

A method's file calls :func:`register_method`; :data:`METHODS` imports every module of this package
the first time it is asked, so a new method is its file and nothing else.
"""

from .registry import METHODS, Method, get_method, method_names, register_method

__all__ = ["METHODS", "Method", "get_method", "method_names", "register_method"]
