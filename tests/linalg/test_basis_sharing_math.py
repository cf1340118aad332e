"""Shared bases across layers (lowrank.linalg.basis_sharing) against independent references.

The output-side closed form is checked against alternating least squares run to convergence (each
step an exact least-squares solve, written here from the normal equations), the input side against
the same with equal inputs (where the pooled SVD is the exact optimum) and, with different inputs,
its per-layer refit against the normal-equation solution; one layer is exactly ``whitened_svd``.
"""

from __future__ import annotations

import pytest
import torch

from lowrank.linalg import output_error, whitened_svd, whitening
from lowrank.linalg.basis_sharing import group_rank, refit_coefficients, shared_input_basis, shared_output_basis

OUT, IN, LAYERS, RANK = 9, 7, 3, 4


def _problem(seed: int, same_inputs: bool = False):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(OUT, IN, generator=generator, dtype=torch.float64) for _ in range(LAYERS)]
    inputs = [
        torch.randn(60, IN, generator=generator, dtype=torch.float64) @ torch.randn(IN, IN, generator=generator, dtype=torch.float64)
        for _ in range(LAYERS)
    ]
    if same_inputs:  # every layer reads the very same tokens
        inputs = [inputs[0]] * LAYERS
    return weights, [x.T @ x for x in inputs]


def _total(weights, approximations, covariances) -> float:
    return sum(output_error(w, a, c) for w, a, c in zip(weights, approximations, covariances))


def _als_output(weights, covariances, rank, steps=800):
    """min Σ‖(W_i − B C_i)X_i‖²: C_i = B⁺W_i (X_i invertible), B = (Σ W_i G_i C_iᵀ)(Σ C_i G_i C_iᵀ)⁻¹."""
    basis = torch.randn(OUT, rank, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for _ in range(steps):
        coefficients = [torch.linalg.pinv(basis) @ w for w in weights]
        left = sum(w @ g @ c.T for w, g, c in zip(weights, covariances, coefficients))
        right = sum(c @ g @ c.T for g, c in zip(covariances, coefficients))
        basis = left @ torch.linalg.inv(right)
    return _total(weights, [basis @ c for c in coefficients], covariances)


def _als_input(weights, covariance, rank, steps=800):
    """min Σ‖(W_i − C_i B)X‖² with one X: C_i = W_i G Bᵀ(B G Bᵀ)⁻¹, B = (Σ C_iᵀC_i)⁻¹ Σ C_iᵀW_i."""
    basis = torch.randn(rank, IN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for _ in range(steps):
        coefficients = [w @ covariance @ basis.T @ torch.linalg.inv(basis @ covariance @ basis.T) for w in weights]
        basis = torch.linalg.solve(sum(c.T @ c for c in coefficients), sum(c.T @ w for c, w in zip(coefficients, weights)))
    return _total(weights, [c @ basis for c in coefficients], [covariance] * len(weights))


@pytest.mark.parametrize("seed", [0, 1])
def test_output_side_is_the_joint_optimum_over_basis_and_coefficients(seed):
    weights, covariances = _problem(seed)
    factors = shared_output_basis(weights, covariances, RANK)
    achieved = _total(weights, [factors.dense(i) for i in range(LAYERS)], covariances)
    assert factors.error == pytest.approx(achieved, rel=1e-9)  # the discarded σ² are the error actually made
    reference = _als_output(weights, covariances, RANK)
    assert achieved <= reference * (1 + 1e-9)  # no better point found by ALS …
    assert achieved == pytest.approx(reference, rel=1e-6)  # … and ALS converges to it
    assert factors.basis.shape == (OUT, RANK) and all(c.shape == (RANK, IN) for c in factors.coefficients)
    assert factors.parameters() == OUT * RANK + LAYERS * RANK * IN


def test_input_side_with_shared_inputs_is_the_joint_optimum():
    weights, covariances = _problem(2, same_inputs=True)
    factors = shared_input_basis(weights, covariances, RANK)
    achieved = _total(weights, [factors.dense(i) for i in range(LAYERS)], covariances)
    reference = _als_input(weights, covariances[0], RANK)
    assert achieved <= reference * (1 + 1e-9) and achieved == pytest.approx(reference, rel=1e-6)
    assert factors.basis.shape == (RANK, IN) and factors.parameters() == RANK * IN + LAYERS * OUT * RANK


def test_input_side_refit_is_each_layers_least_squares_optimum():
    weights, covariances = _problem(3)
    pooled = shared_input_basis(weights, covariances, RANK, refit=False)
    refit = shared_input_basis(weights, covariances, RANK)
    torch.testing.assert_close(refit.basis, pooled.basis, rtol=0, atol=0)  # the refit changes the coefficients only
    for w, g, c in zip(weights, covariances, refit.coefficients):
        normal = w @ g @ refit.basis.T @ torch.linalg.inv(refit.basis @ g @ refit.basis.T)  # the normal equations
        torch.testing.assert_close(c, normal, rtol=1e-7, atol=1e-9)
    for i in range(LAYERS):  # no layer's error rises
        assert output_error(weights[i], refit.dense(i), covariances[i]) <= output_error(weights[i], pooled.dense(i), covariances[i]) * (1 + 1e-12)
    assert refit.error < pooled.error


@pytest.mark.parametrize("side", ["output", "input"])
def test_one_layer_is_exactly_whitened_svd(side):
    weights, covariances = _problem(4)
    solve = shared_output_basis if side == "output" else shared_input_basis
    factors = solve(weights[:1], covariances[:1], RANK)
    expected = whitened_svd(weights[0], covariances[0], RANK).dense()
    torch.testing.assert_close(factors.dense(0), expected, rtol=1e-10, atol=1e-10)
    assert factors.error == pytest.approx(output_error(weights[0], expected, covariances[0]), rel=1e-9)


def test_full_rank_reproduces_every_layer_and_rank_deficient_inputs_do_not_fail():
    weights, covariances = _problem(5)
    full = shared_output_basis(weights, covariances, OUT)
    for i in range(LAYERS):
        torch.testing.assert_close(full.dense(i), weights[i], rtol=1e-9, atol=1e-9)
    deficient = [c.clone() for c in covariances]
    for c in deficient:  # an input channel never active: a singular covariance, damped, not an error
        c[0], c[:, 0] = 0.0, 0.0
    for solve in (shared_output_basis, shared_input_basis):
        factors = solve(weights, deficient, 2)
        assert all(torch.isfinite(c).all() for c in factors.coefficients) and torch.isfinite(factors.basis).all()


def test_refit_coefficients_matches_brute_force():
    generator = torch.Generator().manual_seed(6)
    weight, basis = torch.randn(5, IN, generator=generator, dtype=torch.float64), torch.randn(2, IN, generator=generator, dtype=torch.float64)
    x = torch.randn(30, IN, generator=generator, dtype=torch.float64)
    coefficients = refit_coefficients(weight, basis, whitening(x.T @ x))
    torch.testing.assert_close(coefficients, torch.linalg.lstsq(x @ basis.T, x @ weight.T).solution.T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_group_rank_is_the_largest_within_the_budget(side, ratio):
    out_features, in_features, layers = 48, 32, 3
    rank = group_rank(out_features, in_features, layers, ratio, side)
    shared, per_layer = (out_features, in_features) if side == "output" else (in_features, out_features)

    def storage(k):
        return shared * k + layers * per_layer * k

    budget = (1 - ratio) * layers * out_features * in_features
    assert storage(rank) <= budget < storage(rank + 1)  # brute force over k
    assert group_rank(out_features, in_features, layers, 0.0, side) is None
