"""Replacement modules (one per structure) and helpers to find and swap layers."""

from .dictionary_linear import DictionaryLinear
from .lowrank_linear import LowRankLinear
from .lowrank_quant_linear import LowRankQuantLinear
from .lowrank_sparse_linear import LowRankPlusSparseLinear
from .structures import STRUCTURES, register_structure
from .targets import find_blocks, find_targets, is_conv1d, is_linear, linear_bias, linear_shape, linear_weight, set_submodule

__all__ = [
    "STRUCTURES",
    "DictionaryLinear",
    "LowRankLinear",
    "LowRankPlusSparseLinear",
    "LowRankQuantLinear",
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
