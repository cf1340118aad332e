"""The orders in which W ≈ B + L is fitted, B a compressed base and L a low-rank part: one home for them.

Both ``lowrank compensate`` (B first, EoRA; ``--lowrank-first``; ``--iterations``) and the
``lowrank-quant`` method's ``order`` option build their candidates from the two steps here, with two
callables each: ``fit(matrix)``, the best rank-r part of a matrix (a plain or whitened truncated
SVD, or EoRA's :func:`~lowrank.compensate.correction`), and ``compress(matrix)``, the base of a
matrix (a quantizer's or pruner's result: anything with an ``approximation``, the (out, in) matrix
it stands for).

- quantize first (EoRA): B = compress(W), then L = fit(W − B): one round of :func:`alternate` from
  ``compress(W)``;
- low rank first (SVDQuant): L = fit(W), then B = compress(W − L): :func:`lowrank_first`;
- alternation (LoftQ, LQ-LoRA): from either start, rounds of L = fit(W − B), B = compress(W − L):
  :func:`alternate`.

``lowrank-quant --option order=lowrank-first`` is :func:`lowrank_first` alone (SVDQuant keeps the
branch it fitted first); its ``alternate`` order is :func:`lowrank_first` followed by
:func:`alternate` (LoftQ). ``lowrank compensate --lowrank-first`` is that same LoftQ chain with
EoRA's correction as ``fit``, tried beside plain EoRA (:func:`alternate` from ``compress(W)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..linalg import LowRankFactors

Fit = Callable[[torch.Tensor], LowRankFactors]
Compress = Callable[[torch.Tensor], Any]  # returns a base with an ``approximation`` (out, in)


def lowrank_first(target: torch.Tensor, fit: Fit, compress: Compress) -> tuple[Any, LowRankFactors]:
    """SVDQuant's order: the low-rank part first, L = fit(W), then the base of what it leaves, B = compress(W − L).

    The large directions of W go to L, so the base compresses a matrix of smaller range (finer
    quantization steps) than W itself.

    Args:
        target: W, (out, in), in the precision to compute in.
        fit: the best rank-r part of a matrix.
        compress: the base of a matrix (has ``approximation``).

    Returns:
        (B, L).

    Example:
        >>> from lowrank.compensate import BaseSpec, compress_base
        >>> from lowrank.linalg.svd import truncated_svd
        >>> w = torch.randn(8, 32, dtype=torch.float64)
        >>> base, low = lowrank_first(w, lambda m: truncated_svd(m, 2), lambda m: compress_base(m, None, BaseSpec.parse("rtn:4"), 16))
        >>> torch.equal(base.approximation, compress_base(w - low.dense(), None, BaseSpec.parse("rtn:4"), 16).approximation)
        True
    """
    low = fit(target)
    return compress(target - low.dense()), low


def alternate(target: torch.Tensor, fit: Fit, compress: Compress, base: Any, rounds: int) -> Iterator[tuple[Any, LowRankFactors]]:
    """From a base B, ``rounds`` pairs: L = fit(W − B), then B = compress(W − L) for the next round (LoftQ, LQ-LoRA).

    Each pair is yielded after its refit, which is the best L for that B, so these are the pairs
    worth comparing. One round from B = compress(W) is EoRA's quantize-first pair.

    Args:
        target: W, (out, in).
        fit: the best rank-r part of a matrix.
        compress: the base of a matrix (has ``approximation``).
        base: the first B.
        rounds: pairs to yield (≥ 1).

    Example:
        >>> from lowrank.compensate import BaseSpec, compress_base
        >>> from lowrank.linalg.svd import truncated_svd
        >>> w = torch.randn(8, 32, dtype=torch.float64)
        >>> quantize = lambda m: compress_base(m, None, BaseSpec.parse("rtn:3"), 16)
        >>> pairs = list(alternate(w, lambda m: truncated_svd(m, 2), quantize, quantize(w), rounds=3))
        >>> len(pairs), pairs[0][0].approximation.shape
        (3, torch.Size([8, 32]))
    """
    low = fit(target - base.approximation)
    yield base, low
    for _ in range(rounds - 1):
        base = compress(target - low.dense())
        low = fit(target - base.approximation)
        yield base, low
