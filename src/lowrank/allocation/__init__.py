"""Rank allocation: how much rank each targeted layer gets under one global budget."""

from .allocate import allocate, register_strategy, strategy_names
from .plan import Plan

__all__ = ["Plan", "allocate", "register_strategy", "strategy_names"]
