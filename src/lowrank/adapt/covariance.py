"""Covariance-oriented components (CorDA): singular vectors of W·C, with C the calibration covariance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors, whitening
from ..nn import linear_weight
from .config import AdapterConfig, register_init
from .decompose import balance, singular_triplets
from .layer import LoraLinear, lora_from_factors

MODES = ("instruction", "knowledge")


@dataclass
class CovarianceConfig(AdapterConfig):
    """SVD of W·C: W = U Σ (Vᵀ C⁻¹); the adapter takes r triplets of it, the base keeps W minus them.

    Weighting W by the covariance of its inputs ranks directions by how much they act on the data
    (CorDA, Yang et al. 2024). ``mode="instruction"`` (instruction-previewed) adapts the top-r
    triplets, those the calibration task uses most; ``mode="knowledge"`` (knowledge-preserving)
    adapts the bottom-r and freezes the directions the calibration data relies on, so it forgets
    less. Needs calibration statistics (``lowrank.calibrate``).

    Attributes:
        mode: ``"instruction"`` or ``"knowledge"``.
        damp: damping of C relative to its mean eigenvalue (C + δ·I keeps C⁻¹ stable).

    Example:
        >>> config = CovarianceConfig(rank=8, mode="knowledge")
    """

    mode: str = "knowledge"
    damp: float = 0.01

    name = "covariance"
    needs_statistics = True

    @property
    def uses_top_components(self) -> bool:
        return self.mode == "instruction"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LowrankError(f"unknown covariance mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        super().validate()


def damped_covariance(covariance: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + δI, (C + δI)⁻¹) in float64, damped as :func:`lowrank.linalg.whitening` damps."""
    white = whitening(covariance, damp=damp)
    return white.root @ white.root.T, white.inverse_root.T @ white.inverse_root


def covariance_factors(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, largest: bool = True, damp: float = 0.01, svd: str = "exact", power_iterations: int = 4, seed: int = 0
) -> LowRankFactors:
    """r triplets of W·C mapped back through C⁻¹: B = U_r Σ_r, A = V_rᵀ C⁻¹ (balanced), float64.

    Args:
        weight: (out, in) matrix.
        covariance: (in, in) input covariance (XᵀX or XᵀX / tokens), damped by ``damp``.
        rank: triplets to keep.
        largest: top triplets (instruction-previewed) or bottom ones (knowledge-preserving).
        damp: relative damping, as in :func:`lowrank.linalg.whitening`.

    Example:
        >>> w, x = torch.randn(12, 8), torch.randn(50, 8)
        >>> torch.allclose(covariance_factors(w, x.T @ x, 8).dense(), w.double())
        True
    """
    damped, inverse = damped_covariance(covariance, damp)
    u, s, vh = singular_triplets(weight.to(torch.float64) @ damped, rank, largest=largest, svd=svd, power_iterations=power_iterations, seed=seed)
    return balance(u * s, vh @ inverse)


@register_init(CovarianceConfig)
def build(layer: nn.Module, statistics: LayerStatistics | None, config: CovarianceConfig, name: str = "") -> LoraLinear:
    if statistics is None:
        raise LowrankError(f"the covariance init needs calibration statistics for {name}; pass stats=lowrank.calibrate(...) (CLI: --calib FILE)")
    weight = linear_weight(layer)
    rank = min(config.rank, *weight.shape)
    factors = covariance_factors(
        weight, statistics.covariance, rank, config.mode == "instruction", config.damp, config.svd, config.power_iterations, config.seed
    )
    return lora_from_factors(layer, factors)
