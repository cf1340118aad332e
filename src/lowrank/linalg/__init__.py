"""Pure tensor math: factorizations, whitening, rank arithmetic. No models in here."""

from .factors import LowRankFactors
from .rank import lowrank_parameters, rank_for_ratio
from .svd import truncated_svd
from .whiten import output_error, whitened_spectrum, whitened_svd, whitening

__all__ = [
    "LowRankFactors",
    "lowrank_parameters",
    "output_error",
    "rank_for_ratio",
    "truncated_svd",
    "whitened_spectrum",
    "whitened_svd",
    "whitening",
]
