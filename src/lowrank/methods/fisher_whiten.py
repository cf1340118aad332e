"""``fisher-whiten``: whitened inputs and Fisher-weighted outputs, the layer's predicted loss increase.

Minimizes ‖diag(√f)(W − W′)C^{1/2}‖_F with C = E[x xᵀ] and f = E[(∂L/∂y)²] per output channel:
to second order (diagonal empirical Fisher) this is twice the increase of the per-token loss
caused by this layer alone — the quantity the ``global`` allocation budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..linalg.weighted import row_weights
from .registry import Method, register_method
from .svd import build_lowrank


@dataclass
class FisherWhitenConfig:
    """Options of Fisher-weighted whitened SVD.

    Attributes:
        damp: input-covariance damping relative to its mean eigenvalue (0: only when singular).
        fisher_damp: added to each output's Fisher information, relative to the mean.
        precision: ``"mixed"`` (the default): the covariance's root and the unwhitening in
            float64, the SVD of the whitened weight in float32 (0.82× float64's time on SmolLM2,
            the same perplexity: ``benchmarks/results/precision.md``); or ``"float64"`` /
            ``"float32"`` throughout.
            A layer with no more outputs than inputs whose XᵀX has fewer calibration tokens than
            columns (singular by construction) is factored on the output side instead, in the
            root's precision (:func:`~lowrank.linalg.weighted.output_side_svd`: the same optimum,
            no damping search).
    """

    mixed_precision: ClassVar[bool] = True
    version: int = 1
    damp: float = 0.0
    fisher_damp: float = 1e-6
    precision: str = "mixed"


def factorize(weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: FisherWhitenConfig, name: str = "") -> LowRankFactors:
    if statistics is None or statistics.output_fisher is None:
        raise LowrankError(f"fisher-whiten needs gradient statistics for {name or 'this layer'}; calibrate with gradients=True")
    # Imported here, not at the top: importing .whiten first would register whiten before
    # fisher-whiten and change the order `lowrank --help` lists the methods in.
    from .whiten import whitened_factors

    weights = row_weights(statistics.output_fisher, config.fisher_damp)
    return whitened_factors(weight, statistics, rank, config.damp, config.precision, weights, name)


register_method(
    Method(
        name="fisher-whiten",
        config_class=FisherWhitenConfig,
        factorize=factorize,
        build=build_lowrank,
        needs_statistics=True,
        needs_gradients=True,
        fisher_weighted=True,
        description="SVD of diag(√Fisher)·W·(XᵀX)^½: the layer's predicted loss increase (needs --calib; backward pass)",
    )
)
