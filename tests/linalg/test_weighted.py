import pytest
import torch

from lowrank.linalg import whitening
from lowrank.linalg.weighted import matrix_weights, output_side_svd, row_weights, weighted_energy, weighted_svd


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_weighted_energy_is_the_squared_singular_values(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    x = torch.randn(300, shape[1], generator=generator, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    weights = row_weights(torch.rand(shape[0], generator=generator, dtype=torch.float64) ** 4)
    white = whitening(x.T @ x)
    for kwargs, scaled in [({}, weight), ({"output_weights": weights, "white": white}, weights[:, None] * weight @ white.root)]:
        energy = weighted_energy(weight, **kwargs)
        reference = torch.linalg.svdvals(scaled).pow(2)  # the independent route: an SVD
        assert energy.shape == reference.shape and bool((energy[:-1] >= energy[1:]).all()) and bool((energy >= 0).all())
        # Gram eigenvalues: absolute error about ε·σ₁², whatever the size of σ_i.
        torch.testing.assert_close(energy, reference, rtol=0, atol=1e-12 * reference[0].item())


def test_weighted_energy_of_a_rank_deficient_matrix_is_never_negative():
    weight = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 20, dtype=torch.float64)
    energy = weighted_energy(weight)
    assert bool((energy >= 0).all()) and energy[2:].max() < 1e-12 * energy[0]


def _singular_case(out: int = 12, features: int = 30, tokens: int = 18):
    """A layer whose XᵀX has fewer tokens than columns (rank 18 of 30), and positive output weights."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(out, features, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, features, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, features, dtype=torch.float64)
    weights = row_weights(torch.rand(out, generator=generator, dtype=torch.float64) ** 4)
    return weight, x, weights


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_output_side_svd_is_the_whitened_optimum(damp):
    # A full-rank XᵀX: the output side and the root give one and the same W′.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    x = torch.randn(200, 24, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    weights = row_weights(torch.rand(16, generator=generator, dtype=torch.float64))
    covariance = x.T @ x
    white = whitening(covariance, damp=damp, symmetric=False)
    for rank in (1, 5, 16):
        for d in (None, weights):
            side = output_side_svd(weight, covariance, rank, d, damping=white.damping)
            reference = weighted_svd(weight, rank, d, white)
            torch.testing.assert_close(side.dense(), reference.dense(), rtol=1e-9, atol=1e-9)
            # The same balanced factors, up to the sign of each rank-one term.
            signs = torch.sign((side.up * reference.up).sum(0))
            torch.testing.assert_close(side.up * signs, reference.up, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 6, 12])
def test_output_side_svd_of_a_singular_covariance_is_the_exact_optimum_on_the_data(rank):
    weight, x, weights = _singular_case()
    factors = output_side_svd(weight, x.T @ x, rank, weights)
    error = (weights[:, None] * (weight - factors.dense()) @ x.T).square().sum().item()
    singular = torch.linalg.svdvals(weights[:, None] * weight @ x.T).square()  # Eckart–Young on D·W·X itself
    assert error == pytest.approx(singular[rank:].sum().item(), rel=1e-9, abs=1e-12 * singular[0].item())
    # The damped whitened SVD (what the root route must do here) is never better on the data.
    damped = weighted_svd(weight, rank, weights, whitening(x.T @ x, symmetric=False))
    assert error <= (weights[:, None] * (weight - damped.dense()) @ x.T).square().sum().item() * (1 + 1e-9) + 1e-12 * singular[0].item()


def test_output_side_energy_is_what_output_side_factors_lose():
    weight, x, weights = _singular_case()
    energy = weighted_energy(weight, weights, covariance=x.T @ x)
    for rank in (2, 7):
        factors = output_side_svd(weight, x.T @ x, rank, weights)
        error = (weights[:, None] * (weight - factors.dense()) @ x.T).square().sum().item()
        assert energy[rank:].sum().item() == pytest.approx(error, rel=1e-9, abs=1e-12 * energy[0].item())


def test_output_side_svd_keeps_zero_directions_finite():
    weight, x, _ = _singular_case(out=12, features=30, tokens=4)  # D·W·X has rank 4 < the rank asked
    factors = output_side_svd(weight, x.T @ x, 8)
    assert bool(torch.isfinite(factors.up).all() and torch.isfinite(factors.down).all())
    torch.testing.assert_close(factors.dense() @ x.T, weight @ x.T, rtol=1e-8, atol=1e-8)


def test_matrix_weights_give_the_full_fisher_quadratic_form_and_row_weights_on_a_diagonal():
    generator = torch.Generator().manual_seed(0)
    gradients = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    fisher = gradients.T @ gradients / 40
    error = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    weights = matrix_weights(fisher, 0.0)
    torch.testing.assert_close(weights, weights.T)
    torch.testing.assert_close((weights @ error).pow(2).sum(), torch.trace(error.T @ fisher @ error))
    diagonal = fisher.diagonal().clone()
    torch.testing.assert_close(matrix_weights(torch.diag(diagonal), 1e-3), torch.diag(row_weights(diagonal, 1e-3)))
    # A rank-deficient Fisher (fewer gradients than outputs) still gives finite, positive definite weights.
    singular = gradients[:3].T @ gradients[:3]
    assert torch.linalg.eigvalsh(matrix_weights(singular, 1e-6)).min() > 0
