"""What the structured methods (``lowrank-sparse``, ``lowrank-quant``, ``dictionary``) share.

Each spends a plan's rank-r budget on a structure other than plain factors, and must never be worse
than the plain rank-r fit at the same budget: it starts from that fit as the best candidate, offers
every iterate, and returns whichever fits best (the plain fit as :class:`LowRankFactors`, which
:func:`build_with_fallback` builds into a plain ``LowRankLinear``).

Not a method: this module registers nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors
from ..linalg.fit import ResidualFit
from .svd import build_lowrank

log = logging.getLogger(__name__)


def residual_fit(
    weight: torch.Tensor, statistics: LayerStatistics | None, precision: str, use_statistics: bool, name: str = "", whitened_fit: bool = True
) -> ResidualFit:
    """``weight`` in the method's ``precision``, judged by the output error on the calibration data
    when ``use_statistics`` (the layer's cached whitening), else by the Frobenius error.

    Args:
        weight: (out, in) matrix.
        statistics: the layer's calibration statistics (required when ``use_statistics``).
        precision: ``"float64"`` or ``"float32"``.
        use_statistics: judge (and, with ``whitened_fit``, fit) by the whitened error.
        name: layer name for messages.
        whitened_fit: fit the low-rank part by whitened SVD, not only judge by it.

    Example:
        >>> fit = residual_fit(torch.randn(8, 6), None, "float64", use_statistics=False)
        >>> fit.target.dtype, fit.white is None
        (torch.float64, True)
    """
    dtype = getattr(torch, precision)
    target = weight.to(dtype)
    white = None
    if use_statistics:
        white = statistics.whitening(0.0, dtype, symmetric=True, name=name)  # entries are selected in whitened coordinates
    return ResidualFit(target, white, statistics.xtx if white is not None else None, whitened_fit=whitened_fit)


@dataclass
class BestFit:
    """The best candidate so far and its error; :meth:`plain` starts from the fit to beat.

    Example:
        >>> fit = residual_fit(torch.randn(8, 6), None, "float64", use_statistics=False)
        >>> best = BestFit.plain(fit, rank=2)
        >>> best.offer("a worse candidate", best.error + 1.0)
        >>> isinstance(best.result("example", "layer", 2, "split"), LowRankFactors)
        True
    """

    factors: Any
    error: float

    @classmethod
    def plain(cls, fit: ResidualFit, rank: int) -> BestFit:
        """The plain rank-``rank`` fit (whitened when ``fit`` is) of the target, with its error."""
        factors = fit.factors(fit.target, min(rank, *fit.target.shape))
        return cls(factors, fit.error(factors.dense()))

    def offer(self, candidate: Any, error: float) -> None:
        """Keep ``candidate`` if its error is smaller than the best so far."""
        if error < self.error:
            self.factors, self.error = candidate, error

    def result(self, method: str, name: str, rank: int, split: str) -> Any:
        """The best candidate; logs when no ``split`` (e.g. "sparse split") beat the plain fit."""
        if isinstance(self.factors, LowRankFactors):
            log.info("%s: %s keeps the plain rank-%d fit (the %s was not better)", method, name or "a layer", rank, split)
        return self.factors


def build_with_fallback(structure):
    """A ``build`` for structured methods: their own module, or ``LowRankLinear`` for layers whose
    factorizer fell back to the plain low-rank fit (it returns :class:`LowRankFactors` then)."""

    def build(factors, bias: torch.Tensor | None, dtype: torch.dtype):
        if isinstance(factors, LowRankFactors):
            return build_lowrank(factors, bias, dtype)
        return structure.from_factors(factors, bias, dtype=dtype)

    return build
