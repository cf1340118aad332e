"""The low-rank fit that the structured methods alternate with their second part (sparse, quantized)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .factors import LowRankFactors
from .svd import truncated_svd
from .whiten import Whitening, whitened_svd


@dataclass
class ResidualFit:
    """Best rank-r fits of matrices close to ``target``, and the error every candidate is judged by.

    Without ``white`` the fit is the truncated SVD and the error ‖target − approximation‖²_F; with it
    (the whitening of the layer's calibration inputs XᵀX) the error is ‖(target − approximation)·(XᵀX)^½‖²_F,
    the layer's output error on the calibration data, and the fit is the whitened SVD that minimizes
    it, unless ``whitened_fit`` is off (a method that only ranks its other part by the data).
    """

    target: torch.Tensor  # (out, in), in the precision the method factors in
    white: Whitening | None = None
    xtx: torch.Tensor | None = None
    whitened_fit: bool = True

    def factors(self, matrix: torch.Tensor, rank: int) -> LowRankFactors:
        """The best rank-``rank`` approximation of ``matrix`` (whitened when this fit is)."""
        if self.white is not None and self.whitened_fit:
            return whitened_svd(matrix, self.xtx, rank, dtype=self.target.dtype, white=self.white)
        return truncated_svd(matrix, rank, dtype=self.target.dtype)

    def error(self, approximation: torch.Tensor) -> float:
        """Squared (whitened) Frobenius distance of ``approximation`` from the target."""
        delta = self.target - approximation
        return (delta @ self.white.root if self.white is not None else delta).pow(2).sum().item()
