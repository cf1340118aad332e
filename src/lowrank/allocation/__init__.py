"""Rank allocation: how much rank each targeted layer gets under one global budget."""

from .allocate import allocate, register_strategy, strategy_names, strategy_needs_gradients
from .plan import Plan

__all__ = ["Plan", "allocate", "register_strategy", "strategy_names", "strategy_needs_gradients"]
