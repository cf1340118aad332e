"""Orthonormal bases for projecting a gradient matrix onto a low-rank subspace (pure functions).

A gradient ``G`` of shape (out, in) is projected on its *smaller* side, so that the optimizer
state kept in the subspace is as small as possible:

- side ``"right"`` (out ≥ in): basis ``P`` is (in × rank), the projected gradient is ``G @ P``
  (out × rank) and the way back is ``R @ Pᵀ``;
- side ``"left"`` (out < in): basis ``P`` is (out × rank), the projected gradient is ``Pᵀ @ G``
  (rank × in) and the way back is ``P @ R``.

Three ways to choose ``P``: the top singular vectors of ``G`` (exact SVD, as in GaLore), a
randomized SVD (cheaper, approximate), or columns of a fixed orthogonal DCT matrix, picked as the
ones best aligned with ``G`` (the "SVD-free" variant: only the column indices need storing).
"""

from __future__ import annotations

import math

import torch

from ..linalg.randomized import randomized_svd

PROJECTION_TYPES = ("svd", "randomized_svd", "dct")


def projection_side(shape: tuple[int, int] | torch.Size) -> str:
    """``"right"`` when the gradient has at least as many rows as columns, else ``"left"``.

    Example:
        >>> projection_side((768, 256)), projection_side((256, 768))
        ('right', 'left')
    """
    out_features, in_features = shape
    return "right" if out_features >= in_features else "left"


def _oriented(grad: torch.Tensor, side: str) -> torch.Tensor:
    # Arrange the gradient so that the basis spans its rows' space: (other dim × basis dim).
    return grad if side == "right" else grad.T


def svd_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The ``rank`` dominant singular vectors of ``grad`` on ``side``, computed in float32 or better.

    Args:
        grad: (out, in) gradient.
        rank: number of basis vectors.
        side: ``"right"`` (vectors of length ``in``) or ``"left"`` (length ``out``).

    Returns:
        (dimension × rank) matrix with orthonormal columns.

    Example:
        >>> basis = svd_basis(torch.randn(32, 16), rank=4, side="right")
        >>> basis.shape
        torch.Size([16, 4])
    """
    matrix = _oriented(grad, side).to(torch.promote_types(grad.dtype, torch.float32))
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[:rank].T.contiguous()


def randomized_svd_basis(
    grad: torch.Tensor, rank: int, side: str, generator: torch.Generator, oversample: int = 8, power_iterations: int = 1
) -> torch.Tensor:
    """Approximate dominant singular vectors by a randomized range finder (Halko, Martinsson, Tropp).

    A Gaussian sketch of ``rank + oversample`` columns, ``power_iterations`` rounds of
    re-orthonormalized power iteration (they sharpen a slowly decaying spectrum), then an exact SVD
    of the small sketched matrix.

    Args:
        grad: (out, in) gradient.
        rank: number of basis vectors.
        side: ``"right"`` or ``"left"``.
        generator: seeded CPU generator for the sketch, so a run is reproducible.
        oversample: extra sketch columns beyond ``rank``.
        power_iterations: power-iteration rounds.

    Returns:
        (dimension × rank) matrix with orthonormal columns.

    Example:
        >>> basis = randomized_svd_basis(torch.randn(32, 16), 4, "right", torch.Generator().manual_seed(0))
        >>> basis.shape
        torch.Size([16, 4])
    """
    matrix = _oriented(grad, side).to(torch.promote_types(grad.dtype, torch.float32))  # (rows, dimension)
    _, _, vh = randomized_svd(matrix, rank, power_iterations, oversample, dtype=matrix.dtype, generator=generator)
    return vh[:rank].T.contiguous()


def dct_matrix(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix: column ``k`` is the cosine of frequency ``k`` sampled at ``size`` points.

    Built in float64 and cast, so the same ``size`` always gives the same bits.

    Example:
        >>> basis = dct_matrix(8)
        >>> torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-6)
        True
    """
    position = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    frequency = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (position + 0.5) * frequency / size) * math.sqrt(2.0 / size)
    matrix[:, 0] /= math.sqrt(2.0)
    return matrix.to(dtype=dtype, device=device)


def select_dct_columns(grad: torch.Tensor, dct: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Indices of the ``rank`` DCT columns best aligned with ``grad``: largest ‖G·d‖ (or ‖Gᵀ·d‖ on the left).

    Since the DCT columns are orthonormal, these are the columns that keep the most of the
    gradient's energy among all choices of ``rank`` of them. Returned sorted ascending.

    Args:
        grad: (out, in) gradient.
        dct: (dimension × dimension) orthonormal matrix from :func:`dct_matrix`.
        rank: number of columns to keep.
        side: ``"right"`` or ``"left"``.

    Example:
        >>> grad = torch.outer(torch.randn(6), dct_matrix(4)[:, 2])
        >>> select_dct_columns(grad, dct_matrix(4), rank=1, side="right").tolist()
        [2]
    """
    energy = (_oriented(grad, side).to(dct.dtype) @ dct).square().sum(dim=0)
    return torch.topk(energy, rank).indices.sort().values


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """The gradient in the subspace: ``G @ P`` (right) or ``Pᵀ @ G`` (left)."""
    return grad @ basis if side == "right" else basis.T @ grad


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Back to the full (out, in) shape: ``R @ Pᵀ`` (right) or ``P @ R`` (left)."""
    return low_rank @ basis.T if side == "right" else basis @ low_rank
