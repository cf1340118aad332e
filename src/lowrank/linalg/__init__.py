"""Pure tensor math: factorizations, whitening, rank arithmetic. No models in here."""

from .factors import LowRankFactors
from .rank import lowrank_parameters, max_factored_rank, rank_for_ratio, stored_parameters
from .svd import truncated_svd
from .whiten import output_error, precision_dtypes, whitened_spectrum, whitened_svd, whitening

__all__ = [
    "LowRankFactors",
    "lowrank_parameters",
    "max_factored_rank",
    "output_error",
    "rank_for_ratio",
    "stored_parameters",
    "truncated_svd",
    "precision_dtypes",
    "whitened_spectrum",
    "whitened_svd",
    "whitening",
]
