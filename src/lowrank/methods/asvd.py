"""``asvd``: activation-aware SVD — scale input channels by how large their activations are, then truncate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors, truncated_svd
from .registry import Method, register_method
from .svd import build_lowrank


@dataclass
class ASVDConfig:
    """Options of activation-aware SVD (ASVD, Yuan et al. 2023).

    Attributes:
        alpha: exponent of the channel scales s_j = E|x_j|^alpha. 0 is plain SVD; 1 weighs each
            input channel by its mean magnitude (exactly the whitened SVD when channels are
            independent); ASVD's default is 0.5.
        precision: ``"float64"`` or ``"float32"``, the dtype the decomposition runs in.

    Example:
        >>> ASVDConfig(alpha=0.5)
        ASVDConfig(version=1, alpha=0.5, precision='float64')
    """

    version: int = 1
    alpha: float = 0.5
    precision: str = "float64"


def channel_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = mean_abs_j^alpha; channels never seen active get the smallest positive scale (not 0, which B·diag(s)⁻¹ could not undo).

    Example:
        >>> channel_scales(torch.tensor([4.0, 0.0, 1.0]), 0.5).tolist()
        [2.0, 1.0, 1.0]
    """
    scales = mean_abs.clamp(min=0).pow(alpha)
    positive = scales[scales > 0]
    floor = positive.min() if positive.numel() else torch.ones((), dtype=scales.dtype, device=scales.device)
    return torch.where(scales > 0, scales, floor)


def factorize(weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: ASVDConfig, name: str = "") -> LowRankFactors:
    """Truncated SVD of W·diag(s), then B ← B·diag(s)⁻¹, so that A·B ≈ W with s_j = E|x_j|^alpha.

    Errors on input channels with large activations cost more in the layer's output, so the
    scaling makes the truncation keep them better. alpha = 0 gives exactly :func:`truncated_svd`.

    Args:
        weight: (out, in) matrix.
        statistics: calibration statistics of the layer's input (``mean_abs`` is used).
        rank: rank to keep.
        config: the method's options.
        name: layer name (unused; part of the method interface).

    Example:
        >>> from lowrank.calibration import LayerStatistics
        >>> stats = LayerStatistics.zeros(6); stats.inputs.update(torch.randn(100, 6))
        >>> factorize(torch.randn(8, 6), stats, 6, ASVDConfig()).rank
        6
    """
    assert statistics is not None, "asvd needs calibration statistics"
    dtype = getattr(torch, config.precision)
    scales = channel_scales(statistics.mean_abs.to(device=weight.device, dtype=dtype), config.alpha)
    factors = truncated_svd(weight.to(dtype) * scales, rank, dtype=dtype)
    return LowRankFactors(up=factors.up, down=factors.down / scales)


register_method(
    Method(
        name="asvd",
        config_class=ASVDConfig,
        factorize=factorize,
        build=build_lowrank,
        needs_statistics=True,
        description="SVD of W·diag(mean abs(x))^α (needs --calib; activation-aware SVD, α=0 is plain svd)",
    )
)
