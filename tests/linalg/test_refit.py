"""The closed-form refit against shifted inputs, checked against least squares and brute force.

Tokens are rows here: X (tokens × in) are the dense layer's inputs, X̃ the compressed model's, and the
refit W′ should make X̃ W′ᵀ as close as possible to the dense outputs Y = X Wᵀ.
"""

import pytest
import torch

from lowrank.linalg import whitened_svd, whitening
from lowrank.linalg.refit import refit_target, shifted_output_error
from references import reduced_rank_optimum


def _problem(tokens=60, in_features=7, out_features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, in_features, dtype=torch.float64)
    shifted = x + 0.3 * torch.randn(tokens, in_features, generator=generator, dtype=torch.float64)  # earlier layers compressed
    return weight, x, shifted


def _refit(weight, x, shifted):
    return refit_target(weight, x.T @ shifted, whitening(shifted.T @ shifted))


def test_refit_target_is_the_least_squares_solution():
    weight, x, shifted = _problem()
    # P minimizes ‖X̃ Pᵀ − X Wᵀ‖_F: solve it column by column with lstsq, independently of the whitening.
    expected = torch.linalg.lstsq(shifted, x @ weight.T).solution.T
    torch.testing.assert_close(_refit(weight, x, shifted), expected, rtol=1e-9, atol=1e-10)


def test_refit_of_unshifted_inputs_is_the_weight():
    weight, x, _ = _problem()
    torch.testing.assert_close(_refit(weight, x, x), weight, rtol=1e-9, atol=1e-10)


def test_shifted_output_error_equals_the_error_on_the_tokens():
    weight, x, shifted = _problem()
    approximation = weight + 0.1 * torch.randn(weight.shape, dtype=torch.float64)
    direct = (x @ weight.T - shifted @ approximation.T).pow(2).sum().item()
    value = shifted_output_error(weight, approximation, x.T @ x, x.T @ shifted, shifted.T @ shifted)
    assert value == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("rank", [1, 3])
def test_whitened_refit_is_the_reduced_rank_regression_optimum(rank):
    weight, x, shifted = _problem()
    shifted_xtx = shifted.T @ shifted
    refit = whitened_svd(_refit(weight, x, shifted), shifted_xtx, rank).dense()
    y = x @ weight.T

    def error(candidate):
        return (y - shifted @ candidate.T).pow(2).sum().item()

    optimum = reduced_rank_optimum(y.numpy(), shifted.numpy(), rank)
    assert error(refit) == pytest.approx(optimum, rel=1e-9)
    # No rank-r candidate beats it: random ones, small perturbations of it, and plain whitening of W.
    generator = torch.Generator().manual_seed(1)
    u, s, vh = torch.linalg.svd(refit)
    for _ in range(200):
        up, down = torch.randn(5, rank, generator=generator, dtype=torch.float64), torch.randn(rank, 7, generator=generator, dtype=torch.float64)
        assert error(up @ down) >= optimum
        nudged = (u[:, :rank] + 1e-3 * torch.randn(5, rank, generator=generator, dtype=torch.float64)) * s[:rank] @ vh[:rank]
        assert error(nudged) >= optimum
    plain = whitened_svd(weight, x.T @ x, rank).dense()  # what the layer gets without the refit
    assert error(plain) > optimum * 1.01
