"""``fwsvd``: Fisher-weighted SVD (Hsu et al. 2022): rows weighted by √(Σ (∂L/∂W)²)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..linalg.weighted import row_weights, weighted_svd
from .registry import Method, register_method
from .svd import build_lowrank


@dataclass
class FWSVDConfig:
    """Options of Fisher-weighted SVD.

    Attributes:
        damp: added to every row's Fisher information, relative to the mean, so rows that never
            received a gradient keep a small positive weight.
        precision: ``"float64"`` or ``"float32"``.
    """

    version: int = 1
    damp: float = 1e-6
    precision: str = "float64"


def factorize(weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: FWSVDConfig, name: str = "") -> LowRankFactors:
    if statistics is None or statistics.weight_grad_sq is None:
        raise LowrankError(f"fwsvd needs gradient statistics for {name or 'this layer'}; calibrate with gradients=True")
    weights = row_weights(statistics.weight_grad_sq, config.damp)
    return weighted_svd(weight, rank, output_weights=weights, dtype=getattr(torch, config.precision))


register_method(
    Method(
        name="fwsvd",
        config_class=FWSVDConfig,
        factorize=factorize,
        build=build_lowrank,
        needs_statistics=True,
        needs_gradients=True,
        needs_weight_gradients=True,
        description="SVD with output rows weighted by √Fisher of the weights (needs --calib; one backward pass per batch)",
    )
)
