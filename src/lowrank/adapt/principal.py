"""Principal components (PiSSA): the top-r singular triplets become the adapter, the rest stays frozen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors
from ..nn import linear_weight
from .config import AdapterConfig, register_init
from .decompose import balance, singular_triplets
from .layer import LoraLinear, lora_from_factors


@dataclass
class PrincipalConfig(AdapterConfig):
    """W = U_r S_r V_rᵀ + W_res; the adapter starts as B = U_r√S_r, A = √S_r V_rᵀ; the base becomes W_res.

    The adapter holds the directions that matter most, so fine-tuning moves them directly
    (PiSSA, Meng et al. 2024). Supports ``svd="randomized"`` for big matrices.

    Example:
        >>> config = PrincipalConfig(rank=8, svd="randomized", power_iterations=4)
    """

    name = "principal"


def principal_factors(weight: torch.Tensor, rank: int, svd: str = "exact", power_iterations: int = 4, seed: int = 0) -> LowRankFactors:
    """The top-``rank`` singular triplets of ``weight`` as balanced factors (B (out, r), A (r, in)), float64.

    Example:
        >>> w = torch.randn(12, 8)
        >>> torch.allclose(principal_factors(w, 8).dense(), w.double())
        True
    """
    u, s, vh = singular_triplets(weight, rank, largest=True, svd=svd, power_iterations=power_iterations, seed=seed)
    return balance(u * s, vh)


@register_init(PrincipalConfig)
def build(layer: nn.Module, statistics: LayerStatistics | None, config: PrincipalConfig, name: str = "") -> LoraLinear:
    weight = linear_weight(layer)
    rank = min(config.rank, *weight.shape)
    return lora_from_factors(layer, principal_factors(weight, rank, config.svd, config.power_iterations, config.seed))
