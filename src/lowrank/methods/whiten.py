"""``whiten``: SVD of W·C^{1/2}, the exact minimizer of the layer's calibration output error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors, precision_dtypes
from ..linalg.weighted import output_side_svd, weighted_svd
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


def whitened_factors(
    weight: torch.Tensor,
    statistics: LayerStatistics,
    rank: int,
    damp: float,
    precision: str,
    output_weights: torch.Tensor | None = None,
    name: str = "",
) -> LowRankFactors:
    """The rank-``rank`` minimizer of ‖D(W − W′)(XᵀX)^½‖_F (D = ``output_weights``, or I), as
    ``whiten`` and ``fisher-whiten`` factor: through the input's shared whitening, or on the output
    side where XᵀX is singular by construction (:meth:`LayerStatistics.output_side`: no root, no
    damping search), in the precisions ``precision`` names."""
    whitening_dtype, dtype = precision_dtypes(precision, weight.dtype)
    if statistics.output_side(weight.shape[0]):
        factors = output_side_svd(weight, statistics.xtx, rank, output_weights, statistics.output_damping(damp), whitening_dtype)
        return LowRankFactors(up=factors.up.to(dtype), down=factors.down.to(dtype))
    white = statistics.whitening(damp, whitening_dtype, name=name)
    return weighted_svd(weight, rank, output_weights=output_weights, white=white, dtype=dtype)


def factorize(weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: WhitenConfig, name: str = "") -> LowRankFactors:
    assert statistics is not None, "whiten needs calibration statistics"
    return whitened_factors(weight, statistics, rank, config.damp, config.precision, name=name)


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
