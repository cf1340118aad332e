"""Closed-form refit against shifted inputs (reduced-rank regression).

When earlier layers are compressed, a layer sees inputs X̃ instead of the dense X. The rank-r W′
minimizing ‖W X − W′ X̃‖_F follows from the least-squares solution P = W X X̃ᵀ (X̃ X̃ᵀ)⁻¹: the residual
of P is orthogonal to X̃, so ‖W X − W′X̃‖² = ‖W X − P X̃‖² + ‖(P − W′) X̃‖², and the best W′ is the
whitened rank-r factorization of P under X̃ X̃ᵀ. With X̃ = X, P = W and nothing changes, so the
refit never has a larger calibration error than factorizing W itself.
"""

from __future__ import annotations

import torch

from .whiten import Whitening


def refit_target(weight: torch.Tensor, cross: torch.Tensor, white: Whitening) -> torch.Tensor:
    """P = W · (X X̃ᵀ) · (X̃ X̃ᵀ)⁻¹, with the inverse taken through the (damped) whitening of X̃ X̃ᵀ.

    Args:
        weight: (out, in) dense weight W.
        cross: Σ x x̃ᵀ over tokens (in, in): dense inputs against the compressed model's inputs.
        white: :func:`lowrank.linalg.whitening` of Σ x̃ x̃ᵀ.
    """
    inverse = white.inverse_root.T @ white.inverse_root  # C⁻¹ for any root (see Whitening)
    return weight.double() @ cross.double() @ inverse.double()


def shifted_output_error(weight: torch.Tensor, approximation: torch.Tensor, dense_xtx: torch.Tensor, cross: torch.Tensor, shifted_xtx: torch.Tensor) -> float:
    """‖W X − W′ X̃‖²_F from second moments: tr(W XXᵀ Wᵀ) − 2 tr(W XX̃ᵀ W′ᵀ) + tr(W′ X̃X̃ᵀ W′ᵀ)."""
    w, v = weight.double(), approximation.double()
    value = torch.einsum("oi,ij,oj->", w, dense_xtx.double(), w)
    value -= 2 * torch.einsum("oi,ij,oj->", w, cross.double(), v)
    value += torch.einsum("oi,ij,oj->", v, shifted_xtx.double(), v)
    return value.item()
