"""Rank allocation: how much rank each targeted layer gets under one global budget."""

from .allocate import allocate, register_strategy, strategy_names, strategy_needs_gradients
from .elastic import elastic_plan, resize_ranks
from .plan import Plan

__all__ = ["Plan", "allocate", "elastic_plan", "resize_ranks", "register_strategy", "strategy_names", "strategy_needs_gradients"]
