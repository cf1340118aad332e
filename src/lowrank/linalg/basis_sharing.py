"""Shared bases across layers (Basis Sharing, Wang et al. 2024): n matrices, one basis, own coefficients.

n layers y_i = W_i x_i (W_i: out × in, the same projection in n neighbouring blocks) are stored as
one basis and n coefficient matrices, on either side:

- **output side**, W_i ≈ B·C_i with B (out × k) shared, C_i (k × in) per layer. With R_i a whitening
  root of layer i's own input covariance G_i = X_iᵀX_i (R_i R_iᵀ = G_i), the calibration error is
  Σ_i ‖(W_i − B C_i) X_i‖² = Σ_i ‖W_i R_i − B (C_i R_i)‖² = ‖[W_1R_1, …, W_nR_n] − B [D_1, …, D_n]‖²
  with D_i = C_i R_i free (R_i is invertible). That is a rank-k approximation of the horizontal
  concatenation, so Eckart–Young gives the exact joint optimum over B and all C_i: B D = the SVD's
  first k components, C_i = D_i R_i⁻¹, and the error is the sum of the discarded squared singular
  values of the concatenation. With n = 1 this is exactly :func:`lowrank.linalg.whitened_svd`.
- **input side** (the paper's choice for q/k/v/gate/up, whose inputs are the same residual stream):
  W_i ≈ C_i·B with B (k × in) shared, C_i (out × k) per layer, so every layer first projects its
  input onto the same k directions. With per-layer G_i there is no closed form (each layer weights
  B's row space by its own metric). As the paper does, B comes from the SVD of the vertical stack
  [W_1; …; W_n]·R with R a root of the pooled G = Σ_i G_i, which is the exact optimum when the
  layers see the same inputs; then every C_i is refit in closed form to its own layer,
  C_i = argmin ‖(W_i − C_i B) R_i‖ (least squares), which can only lower each layer's error.

Storage of a group: out·k + Σ k·in_i (output side) or k·in + Σ out_i·k (input side), against Σ out·in_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .whiten import Whitening, output_error, whitening

SIDES = ("input", "output")


@dataclass
class SharedBasisFactors:
    """A group's shared basis and per-layer coefficients.

    Attributes:
        side: ``"output"`` (W_i ≈ basis·coefficients[i], basis out × k) or ``"input"``
            (W_i ≈ coefficients[i]·basis, basis k × in).
        basis: the shared matrix.
        coefficients: one matrix per layer, in the group's order.
        error: Σ_i ‖(W_i − W_i′) X_i‖² on the calibration inputs (each layer on its own inputs).
    """

    side: str
    basis: torch.Tensor
    coefficients: list[torch.Tensor]
    error: float

    @property
    def rank(self) -> int:
        return self.basis.shape[1] if self.side == "output" else self.basis.shape[0]

    def dense(self, index: int) -> torch.Tensor:
        """The (out, in) weight that layer ``index`` of the group applies."""
        coefficients = self.coefficients[index]
        return self.basis @ coefficients if self.side == "output" else coefficients @ self.basis

    def parameters(self) -> int:
        """Values stored: the basis once and every layer's coefficients."""
        return self.basis.numel() + sum(c.numel() for c in self.coefficients)


def group_rank(out_features: int, in_features: int, layers: int, ratio: float, side: str) -> int | None:
    """The largest shared rank k whose group storage stays within (1 − ratio) of its dense size.

    Output side: out·k + n·k·in parameters; input side: k·in + n·out·k. ``None`` when no rank is
    both smaller than dense and useful (k ≥ the stacked matrix's rank would store more than it saves).

    Example:
        >>> group_rank(256, 256, 2, 0.4, "input")  # 0.6·2·256² / (256 + 2·256)
        102
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    dense = layers * out_features * in_features
    shared, per_layer = (out_features, in_features) if side == "output" else (in_features, out_features)
    rank = int((1.0 - ratio) * dense) // (shared + layers * per_layer)
    largest = min(shared, layers * per_layer)
    if rank >= largest or ratio <= 0.0:
        return None
    return max(rank, 1)


def _svd(matrix: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s, vh[:rank]


def shared_output_basis(
    weights: Sequence[torch.Tensor],
    covariances: Sequence[torch.Tensor],
    rank: int,
    damp: float = 0.0,
    whitenings: Sequence[Whitening] | None = None,
    dtype: torch.dtype = torch.float64,
) -> SharedBasisFactors:
    """The exact minimizer of Σ_i ‖(W_i − B C_i) X_i‖² over a shared B (out × k) and per-layer C_i.

    Args:
        weights: the n (out × in_i) matrices (same ``out``).
        covariances: each layer's input second moments X_iᵀX_i (in_i × in_i).
        rank: k.
        damp: relative damping of each covariance (see :func:`lowrank.linalg.whitening`).
        whitenings: precomputed whitenings of ``covariances`` (layers reading one input share one).
        dtype: precision of the decomposition and of the factors.

    Example:
        >>> w = [torch.randn(8, 6, dtype=torch.float64) for _ in range(2)]
        >>> x = torch.randn(50, 6, dtype=torch.float64)
        >>> f = shared_output_basis(w, [x.T @ x, x.T @ x], rank=8)
        >>> torch.allclose(f.dense(1), w[1])
        True
    """
    _check(weights, covariances, rank, "output")
    whites = list(whitenings) if whitenings is not None else [whitening(c, damp=damp, dtype=dtype, symmetric=False) for c in covariances]
    whitened = torch.cat([w.to(dtype) @ white.root.to(dtype) for w, white in zip(weights, whites)], dim=1)  # (out, Σ in_i)
    u, s, vh = _svd(whitened, rank)
    root = s[:rank].sqrt()  # balanced between basis and coefficients, as whitened_svd splits Σ
    basis = u * root
    coefficients, start = [], 0
    for w, white in zip(weights, whites):
        block = root[:, None] * vh[:, start : start + w.shape[1]]
        start += w.shape[1]
        # Unwhitened in the whitening's own precision (an ill-conditioned root's inverse has large entries).
        coefficients.append((block.to(white.inverse_root.dtype) @ white.inverse_root).to(dtype))
    error = s[rank:].square().sum().item()
    return SharedBasisFactors("output", basis, coefficients, error)


def shared_input_basis(
    weights: Sequence[torch.Tensor],
    covariances: Sequence[torch.Tensor],
    rank: int,
    damp: float = 0.0,
    whitenings: Sequence[Whitening] | None = None,
    dtype: torch.dtype = torch.float64,
    refit: bool = True,
) -> SharedBasisFactors:
    """A shared B (k × in) and per-layer C_i (out_i × k) with W_i ≈ C_i B (the paper's Basis Sharing).

    B spans the first k right singular vectors of [W_1; …; W_n]·R, R a root of the pooled covariance
    Σ_i X_iᵀX_i (the exact optimum when every layer sees the pooled inputs); with ``refit`` each C_i
    is then the least-squares optimum for its own inputs given B, so no layer's error rises.

    Args:
        weights: the n (out_i × in) matrices (same ``in``).
        covariances: each layer's input second moments X_iᵀX_i (in × in).
        rank: k.
        damp: relative damping of the covariances.
        whitenings: precomputed whitenings of ``covariances`` (for the refit).
        dtype: precision of the decomposition and of the factors.
        refit: refit every C_i to its own layer's inputs (``False``: the pooled SVD's coefficients).

    Example:
        >>> w = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
        >>> x = torch.randn(50, 8, dtype=torch.float64)
        >>> f = shared_input_basis(w, [x.T @ x, x.T @ x], rank=8)
        >>> torch.allclose(f.dense(0), w[0])
        True
    """
    _check(weights, covariances, rank, "input")
    pooled = whitening(sum(c.to(torch.float64) for c in covariances), damp=damp, dtype=torch.float64, symmetric=False)
    stacked = torch.cat([w.to(dtype) for w in weights], dim=0) @ pooled.root.to(dtype)  # (Σ out_i, in)
    u, s, vh = _svd(stacked, rank)
    root = s[:rank].sqrt()
    basis = ((root[:, None] * vh).to(torch.float64) @ pooled.inverse_root).to(dtype)  # (k, in)
    if not refit:
        coefficients, start = [], 0
        for w in weights:
            coefficients.append(u[start : start + w.shape[0]] * root)
            start += w.shape[0]
    else:
        whites = list(whitenings) if whitenings is not None else [whitening(c, damp=damp, dtype=torch.float64, symmetric=False) for c in covariances]
        coefficients = [refit_coefficients(w, basis, white).to(dtype) for w, white in zip(weights, whites)]
    error = sum(output_error(w, c @ basis, g) for w, c, g in zip(weights, coefficients, covariances))
    return SharedBasisFactors("input", basis, coefficients, error)


def refit_coefficients(weight: torch.Tensor, basis: torch.Tensor, white: Whitening) -> torch.Tensor:
    """argmin_C ‖(W − C·B)·R‖_F for a fixed basis B (k × in), R R ᵀ = the layer's input covariance.

    Solved as least squares on the whitened rows (B R)ᵀ Cᵀ = (W R)ᵀ in float64, which stays defined
    when B R is rank-deficient (the minimum-norm solution).

    Example:
        >>> from lowrank.linalg import whitening
        >>> x, b = torch.randn(40, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> c = refit_coefficients(torch.randn(3, 5, dtype=torch.float64), b, whitening(x.T @ x))
        >>> c.shape
        torch.Size([3, 2])
    """
    root = white.root.to(torch.float64)
    left = (basis.to(torch.float64) @ root).T  # (in, k)
    right = (weight.to(torch.float64) @ root).T  # (in, out)
    return torch.linalg.lstsq(left, right, driver="gelsd").solution.T  # (out, k)


def shared_basis(side: str, weights, covariances, rank: int, **options) -> SharedBasisFactors:
    """:func:`shared_output_basis` or :func:`shared_input_basis` by ``side``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return (shared_output_basis if side == "output" else shared_input_basis)(weights, covariances, rank, **options)


def _check(weights, covariances, rank: int, side: str) -> None:
    assert len(weights) >= 1 and len(weights) == len(covariances), "one covariance per weight"
    for w, c in zip(weights, covariances):
        assert w.ndim == 2 and c.shape == (w.shape[1], w.shape[1]), "each covariance must be (in, in) of its weight"
    if side == "output":
        assert len({w.shape[0] for w in weights}) == 1, "an output-side basis needs the same out_features"
        largest = min(weights[0].shape[0], sum(w.shape[1] for w in weights))
    else:
        assert len({w.shape[1] for w in weights}) == 1, "an input-side basis needs the same in_features"
        largest = min(weights[0].shape[1], sum(w.shape[0] for w in weights))
    assert 1 <= rank <= largest, f"rank {rank} out of range 1..{largest}"


__all__ = ["SIDES", "SharedBasisFactors", "group_rank", "refit_coefficients", "shared_basis", "shared_input_basis", "shared_output_basis"]
