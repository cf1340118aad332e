"""Replacement modules (one per structure) and helpers to find and swap layers."""

from .lowrank_linear import LowRankLinear
from .structures import STRUCTURES, register_structure
from .targets import find_blocks, find_targets, is_conv1d, is_linear, linear_bias, linear_shape, linear_weight, set_submodule

__all__ = [
    "STRUCTURES",
    "LowRankLinear",
    "find_blocks",
    "find_targets",
    "is_conv1d",
    "is_linear",
    "linear_bias",
    "linear_shape",
    "linear_weight",
    "register_structure",
    "set_submodule",
]
