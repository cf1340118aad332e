"""Projection bases: orthonormal, dominant, best aligned; pure functions on tensors."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank.train.projection import (
    dct_matrix,
    project,
    project_back,
    projection_side,
    randomized_svd_basis,
    select_dct_columns,
    svd_basis,
)


@pytest.mark.parametrize("size", [1, 7, 64, 256])
def test_dct_matrix_is_orthogonal(size):
    basis = dct_matrix(size, dtype=torch.float64)
    torch.testing.assert_close(basis.T @ basis, torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(basis @ basis.T, torch.eye(size, dtype=torch.float64))


def test_dct_matrix_is_the_dct_ii():
    # Column k samples cos(pi (n + 1/2) k / N): the DCT of a constant signal is all in column 0.
    basis = dct_matrix(16, dtype=torch.float64)
    coefficients = torch.ones(16, dtype=torch.float64) @ basis
    assert coefficients[0] == pytest.approx(4.0)
    assert coefficients[1:].abs().max() < 1e-12


@pytest.mark.parametrize("side", ["right", "left"])
def test_selected_dct_columns_are_the_best_aligned(side):
    grad = torch.randn(6, 8) if side == "right" else torch.randn(8, 6)
    dct = dct_matrix(8)
    chosen = select_dct_columns(grad, dct, rank=3, side=side)

    def kept_energy(columns) -> float:
        return project(grad, dct[:, list(columns)], side).square().sum().item()

    best = max(itertools.combinations(range(8), 3), key=kept_energy)  # brute force over all 56 choices
    assert chosen.tolist() == list(best)
    assert chosen.dtype == torch.int64


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_svd_basis_is_orthonormal_and_dominant(shape):
    grad = torch.randn(*shape)
    side = projection_side(shape)
    basis = svd_basis(grad, rank=4, side=side)
    assert basis.shape == (12, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    kept = project(grad, basis, side).square().sum()
    singular = torch.linalg.svdvals(grad)
    torch.testing.assert_close(kept, singular[:4].square().sum(), rtol=1e-4, atol=0)


def test_randomized_svd_finds_an_exactly_low_rank_subspace():
    grad = torch.randn(50, 3) @ torch.randn(3, 30)
    basis = randomized_svd_basis(grad, rank=3, side="right", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_back(project(grad, basis, "right"), basis, "right"), grad, atol=1e-4, rtol=1e-4)


def test_randomized_svd_is_reproducible_from_its_generator():
    grad = torch.randn(30, 20)
    first = randomized_svd_basis(grad, 4, "right", torch.Generator().manual_seed(5))
    second = randomized_svd_basis(grad, 4, "right", torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_full_basis_projection_round_trips(shape):
    grad = torch.randn(*shape, dtype=torch.float64)
    side = projection_side(shape)
    basis = dct_matrix(6, dtype=torch.float64)
    low = project(grad, basis, side)
    assert low.shape == (10, 6) if side == "right" else (6, 10)
    torch.testing.assert_close(project_back(low, basis, side), grad)
