"""Rank allocation: how much rank each targeted layer gets under one global budget."""

from .allocate import allocate, register_strategy, strategy_names, strategy_needs_batches, strategy_needs_gradients
from .elastic import elastic_plan, resize_ranks
from .plan import Plan
from .sensitivity import SensitivityConfig, measured_sensitivities

__all__ = [
    "Plan",
    "SensitivityConfig",
    "allocate",
    "elastic_plan",
    "measured_sensitivities",
    "register_strategy",
    "resize_ranks",
    "strategy_names",
    "strategy_needs_batches",
    "strategy_needs_gradients",
]
