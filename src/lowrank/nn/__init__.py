"""Replacement modules (one per structure) and helpers to find and swap layers."""

from .dictionary_linear import DictionaryLinear
from .experts import UnfusedExperts, expert_projection_names, find_fused_experts, find_unfused_experts, fused_state_dict, unfuse_experts
from .lowrank_linear import LowRankLinear
from .lowrank_quant_linear import LowRankQuantLinear
from .lowrank_sparse_linear import LowRankPlusSparseLinear
from .replacement import ReplacementLinear
from .structures import STRUCTURES, register_structure
from .targets import find_blocks, find_targets, is_conv1d, is_linear, linear_bias, linear_shape, linear_weight, set_submodule

__all__ = [
    "STRUCTURES",
    "DictionaryLinear",
    "LowRankLinear",
    "LowRankPlusSparseLinear",
    "LowRankQuantLinear",
    "ReplacementLinear",
    "UnfusedExperts",
    "expert_projection_names",
    "find_blocks",
    "find_fused_experts",
    "find_targets",
    "find_unfused_experts",
    "fused_state_dict",
    "is_conv1d",
    "is_linear",
    "linear_bias",
    "linear_shape",
    "linear_weight",
    "register_structure",
    "set_submodule",
    "unfuse_experts",
]
