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
  With diagonal output weights D_i (√ of the output Fisher, as ``fisher-whiten`` weights a layer),
  the stack is [D_1 W_1; …; D_n W_n]·R: the exact optimum of Σ_i ‖D_i (W_i − C_i B) R‖² when the
  layers see the same inputs. The refit does not change: D_i scales each output row, and each row
  of C_i is fitted on its own.

Error at every shared rank (input side, :func:`shared_input_errors`). The basis of rank k is the
first k rows of the basis of the largest rank K (the SVD's leading directions), so the bases are
nested. For layer i, with C_i refit, output row o keeps exactly the component of (W_i R_i)_o in the
row space of B_k R_i (least squares is an orthogonal projection), so

    ‖D_i (W_i − C_i B_k) R_i‖² = ‖D_i W_i R_i‖² − ‖D_i W_i R_i Q_{i,k}‖²,

Q_{i,k} an orthonormal basis of the columns of (B_k R_i)ᵀ = R_iᵀ B_kᵀ. A QR decomposition
R_iᵀ B_Kᵀ = Q_i T_i (Gram–Schmidt order) makes the first k columns of Q_i such a basis for every
k at once, so the error at k is the layer's whole weighted energy minus the cumulative sum of
e_{i,j} = ‖D_i W_i R_i q_{i,j}‖² over j ≤ k: one QR and one product per layer for all K ranks.

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
    output_weights: Sequence[torch.Tensor] | None = None,
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
        output_weights: per layer, positive (out_i,) weights of its output rows in the stack (e.g.
            :func:`lowrank.linalg.weighted.row_weights` of the output Fisher); ``None``: all ones.
            ``error`` stays the unweighted Σ_i ‖(W_i − W_i′) X_i‖².

    Example:
        >>> w = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
        >>> x = torch.randn(50, 8, dtype=torch.float64)
        >>> f = shared_input_basis(w, [x.T @ x, x.T @ x], rank=8)
        >>> torch.allclose(f.dense(0), w[0])
        True
    """
    _check(weights, covariances, rank, "input")
    pooled = whitening(sum(c.to(torch.float64) for c in covariances), damp=damp, dtype=torch.float64, symmetric=False)
    scales = [None] * len(weights) if output_weights is None else [d.to(dtype)[:, None] for d in output_weights]
    rows = [w.to(dtype) if d is None else d * w.to(dtype) for w, d in zip(weights, scales)]
    stacked = torch.cat(rows, dim=0) @ pooled.root.to(dtype)  # (Σ out_i, in)
    u, s, vh = _svd(stacked, rank)
    root = s[:rank].sqrt()
    basis = ((root[:, None] * vh).to(torch.float64) @ pooled.inverse_root).to(dtype)  # (k, in)
    if not refit:
        coefficients, start = [], 0
        for w, d in zip(weights, scales):
            block = u[start : start + w.shape[0]] * root
            coefficients.append(block if d is None else block / d)
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


def shared_input_errors(
    weights: Sequence[torch.Tensor],
    whitenings: Sequence[Whitening],
    basis: torch.Tensor,
    output_weights: Sequence[torch.Tensor] | None = None,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Σ_i scale_i·‖D_i (W_i − C_i B_k) R_i‖² for every k = 0 … K, each C_i refit to B_k (the first k rows of ``basis``).

    The module docstring derives it: one QR of R_iᵀ B_Kᵀ per layer, then cumulative projection
    energies. Equal, at each k, to building the layers with :func:`shared_input_basis` (``refit``) at
    rank k and measuring their weighted error, when its basis is the first k rows of ``basis``.

    Args:
        weights: the n (out_i × in) matrices.
        whitenings: each layer's input whitening (R_i R_iᵀ = X_iᵀX_i).
        basis: (K × in) the largest basis; its first k rows are the rank-k basis.
        output_weights: per layer, D_i's diagonal (out_i,); ``None``: ones.
        scales: per layer, a factor of its term (e.g. ½ / tokens for a loss per token); ``None``: ones.

    Returns:
        (K + 1,) float64, non-increasing; entry k is the error with a basis of k rows (k = 0: nothing kept).

    Example:
        >>> from lowrank.linalg import whitening
        >>> w = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
        >>> x = torch.randn(50, 8, dtype=torch.float64)
        >>> white = whitening(x.T @ x, symmetric=False)
        >>> errors = shared_input_errors(w, [white, white], shared_input_basis(w, [x.T @ x] * 2, rank=8).basis)
        >>> errors.shape, bool(errors[-1] < 1e-8 * errors[0])
        (torch.Size([9]), True)
    """
    total = None
    for index, (weight, white) in enumerate(zip(weights, whitenings)):
        root = white.root.to(torch.float64)
        image = weight.to(torch.float64) @ root  # (out, in): W_i R_i
        if output_weights is not None:
            image = output_weights[index].to(torch.float64)[:, None] * image
        q, _ = torch.linalg.qr(root.T @ basis.to(torch.float64).T)  # (in, K), nested: columns ≤ k span R_iᵀ B_kᵀ
        kept = (image @ q).square().sum(0).cumsum(0)  # (K,)
        errors = (image.square().sum() - torch.cat([kept.new_zeros(1), kept])).clamp(min=0)
        errors = errors * (1.0 if scales is None else scales[index])
        total = errors if total is None else total + errors
    return total


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


__all__ = [
    "SIDES",
    "SharedBasisFactors",
    "group_rank",
    "refit_coefficients",
    "shared_basis",
    "shared_input_basis",
    "shared_input_errors",
    "shared_output_basis",
]
