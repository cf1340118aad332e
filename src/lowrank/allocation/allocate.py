"""The allocation stage: a model, a budget and (optionally) statistics in; a :class:`Plan` out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import rank_for_ratio
from ..nn import find_targets, linear_shape
from .plan import Plan

# A strategy maps (shapes, ratio, context) to ranks; context carries model, method, statistics.
Strategy = Callable[..., Plan]
_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str):
    def decorator(function: Strategy) -> Strategy:
        _STRATEGIES[name] = function
        return function

    return decorator


def strategy_names() -> list[str]:
    return list(_STRATEGIES)


@register_strategy("uniform")
def uniform(shapes: dict[str, tuple[int, int]], ratio: float, **_context) -> Plan:
    """The same ratio for every layer: r = floor((1 − ratio)·m·n/(m + n))."""
    ranks = {}
    for name, (out, inp) in shapes.items():
        rank = rank_for_ratio(out, inp, ratio)
        if rank is not None:
            ranks[name] = rank
    return Plan(ratio=ratio, strategy="uniform", shapes=shapes, ranks=ranks)


def allocate(
    model: nn.Module,
    ratio: float,
    method: str = "whiten",
    stats: dict[str, LayerStatistics] | None = None,
    strategy: str = "uniform",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Plan:
    """Decide the rank of every targeted linear layer so the targeted weights shrink by ``ratio``.

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' weight parameters to remove, in [0, 1).
        method: the factorization method the plan is for (data-aware strategies use it).
        stats: calibration statistics (needed by data-aware strategies).
        strategy: one of :func:`strategy_names` (``"uniform"``: the same ratio everywhere).
        include: regular expressions selecting layers (default: linears in the blocks).
        exclude: regular expressions removing layers.

    Returns:
        A :class:`Plan` (reads like ``{module name: rank}``).

    Example:
        >>> plan = allocate(model, ratio=0.3)  # doctest: +SKIP
        >>> plan["model.layers.0.mlp.up_proj"]  # doctest: +SKIP
        134
    """
    if not 0.0 <= ratio < 1.0:
        raise LowrankError(f"ratio must be in [0, 1), got {ratio}; e.g. 0.3 removes 30 % of the targeted parameters")
    if strategy not in _STRATEGIES:
        raise LowrankError(f"unknown allocation strategy {strategy!r}; choose one of: {', '.join(strategy_names())}")
    names = find_targets(model, include=include, exclude=exclude)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    return _STRATEGIES[strategy](shapes, ratio, model=model, method=method, stats=stats)
