"""``svd``: plain truncated SVD, the data-free Eckart–Young optimum in Frobenius norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors, truncated_svd
from ..nn import LowRankLinear
from .registry import Method, register_method


@dataclass
class SVDConfig:
    """Options of plain SVD.

    Attributes:
        precision: ``"float64"`` or ``"float32"``, the dtype the decomposition runs in.
    """

    version: int = 1
    precision: str = "float64"


def factorize(weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: SVDConfig, name: str = "") -> LowRankFactors:
    return truncated_svd(weight, rank, dtype=getattr(torch, config.precision))


def build_lowrank(factors: LowRankFactors, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankLinear:
    return LowRankLinear.from_factors(factors, bias, dtype=dtype, device=bias.device if bias is not None else None)


register_method(
    Method(
        name="svd",
        config_class=SVDConfig,
        factorize=factorize,
        build=build_lowrank,
        needs_statistics=False,
        reads_statistics=False,
        description="truncated SVD of W (data-free; minimizes ‖W − W′‖_F)",
    )
)
