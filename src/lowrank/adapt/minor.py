"""Minor components (MiLoRA): the bottom-r singular triplets become the adapter."""

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
class MinorConfig(AdapterConfig):
    """W = W_top + U_min S_min V_minᵀ; the adapter starts as the r smallest triplets, the base keeps the rest.

    Learning happens in directions the pretrained weight barely uses, which disturbs what it knows
    least (MiLoRA, Wang et al. 2024). Needs the exact SVD.

    Example:
        >>> config = MinorConfig(rank=8)
    """

    name = "minor"
    uses_top_components = False


def minor_factors(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """The bottom-``rank`` singular triplets of ``weight`` as balanced factors, float64.

    Example:
        >>> w = torch.randn(12, 8)
        >>> torch.allclose(minor_factors(w, 8).dense(), w.double())
        True
    """
    u, s, vh = singular_triplets(weight, rank, largest=False)
    return balance(u * s, vh)


@register_init(MinorConfig)
def build(layer: nn.Module, statistics: LayerStatistics | None, config: MinorConfig, name: str = "") -> LoraLinear:
    weight = linear_weight(layer)
    return lora_from_factors(layer, minor_factors(weight, min(config.rank, *weight.shape)))
