"""``whiten``: SVD of W·C^{1/2}, the exact minimizer of the layer's calibration output error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors, precision_dtypes, whitened_svd
from ..linalg.weighted import output_side_svd
from .registry import Method, register_method
from .svd import build_lowrank


@dataclass
class WhitenConfig:
    """Options of whitened SVD (SVD-LLM's truncation-aware whitening).

    Attributes:
        damp: damping added to the input covariance, relative to its mean eigenvalue. 0 damps only
            when the covariance is singular (and logs it); larger values trade calibration fit for
            robustness on other text.
        precision: ``"mixed"`` (the default): the covariance's root and the unwhitening in
            float64, the SVD of the whitened weight in float32 (0.78–0.82× float64's time, the
            same perplexity: ``benchmarks/results/precision.md``); or ``"float64"`` /
            ``"float32"``, the dtype the whole decomposition runs in.
            A layer with no more outputs than inputs whose XᵀX has fewer calibration tokens than
            columns (singular by construction) is factored on the output side instead, in the
            root's precision (:func:`~lowrank.linalg.weighted.output_side_svd`: the same optimum,
            no damping search).
    """

    mixed_precision: ClassVar[bool] = True
    version: int = 1
    damp: float = 0.0
    precision: str = "mixed"


def factorize(weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: WhitenConfig, name: str = "") -> LowRankFactors:
    assert statistics is not None, "whiten needs calibration statistics"
    whitening_dtype, dtype = precision_dtypes(config.precision, weight.dtype)
    if statistics.output_side(weight.shape[0]):  # XᵀX singular by construction: no root, no damping search
        factors = output_side_svd(weight, statistics.xtx, rank, damping=statistics.output_damping(config.damp), dtype=whitening_dtype)
        return LowRankFactors(up=factors.up.to(dtype), down=factors.down.to(dtype))
    white = statistics.whitening(config.damp, whitening_dtype, name=name)
    return whitened_svd(weight, statistics.xtx, rank, dtype=dtype, white=white)


register_method(
    Method(
        name="whiten",
        config_class=WhitenConfig,
        factorize=factorize,
        build=build_lowrank,
        needs_statistics=True,
        description="SVD of W·(XᵀX)^½ (needs --calib; minimizes the layer's output error ‖(W − W′)X‖_F)",
    )
)

register_method(
    Method(
        name="whiten-refit",
        config_class=WhitenConfig,
        factorize=factorize,
        build=build_lowrank,
        needs_statistics=True,
        sequential=True,
        nested=False,
        description="whiten, block by block, each layer refit in closed form to the dense output from the compressed inputs (needs --calib)",
    )
)
