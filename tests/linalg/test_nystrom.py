"""Nyström neuron selection and the closed-form refit (MoDeGPT type I) against independent references:
least squares on the activations themselves, the leverage scores' definition, and brute force over
every subset on tiny cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank.errors import LowrankError
from lowrank.linalg.nystrom import greedy_order, leverage_order, nested_residuals, nystrom_refit, ridge_leverage_scores, selection_error


def gated_activations(seed: int, tokens: int, neurons: int, width: int = 6) -> torch.Tensor:
    """(tokens, neurons) h = silu(x·A) ⊙ (x·B) of a random input of ``width`` dimensions: correlated, as an MLP's are."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    gate, up = (torch.randn(width, neurons, generator=generator, dtype=torch.float64) for _ in range(2))
    return torch.nn.functional.silu(x @ gate) * (x @ up)


def least_squares(weight: torch.Tensor, activations: torch.Tensor, kept) -> tuple[torch.Tensor, float]:
    """(B, Σ‖W·h − B·h_S‖²) by lstsq on the activations: the reference, never forming C."""
    kept = list(kept)
    target = activations @ weight.T
    if not kept:
        return weight.new_zeros(weight.shape[0], 0), target.pow(2).sum().item()
    solution = torch.linalg.lstsq(activations[:, kept], target, driver="gelsd").solution  # (k, out)
    return solution.T, (target - activations[:, kept] @ solution).pow(2).sum().item()


def test_refit_equals_least_squares_on_the_activations():
    activations = gated_activations(0, tokens=300, neurons=12)
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept = torch.tensor([0, 3, 4, 7, 11])
    refit = nystrom_refit(weight, activations.T @ activations, kept)
    expected, residual = least_squares(weight, activations, kept.tolist())
    torch.testing.assert_close(refit, expected, rtol=1e-7, atol=1e-9)
    assert selection_error(weight, activations.T @ activations, kept, refit) == pytest.approx(residual, rel=1e-8)
    # The refit is the optimum: slicing W alone (no refit) leaves more error.
    assert selection_error(weight, activations.T @ activations, kept, weight[:, kept]) > 1.1 * residual


def test_nested_residuals_are_the_refit_errors_of_every_prefix():
    activations = gated_activations(2, tokens=200, neurons=10)
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    correlation = activations.T @ activations
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    residuals = nested_residuals(weight, correlation, order)
    expected = [least_squares(weight, activations, order[:k].tolist())[1] for k in range(11)]
    torch.testing.assert_close(residuals, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-9 * expected[0])
    assert residuals[-1] == 0 and bool((residuals[:-1] >= residuals[1:]).all())


def test_singular_correlation_is_damped_to_the_least_squares_residual():
    """More neurons than tokens: C is singular, the refit damps it and still reaches lstsq's residual."""
    activations = gated_activations(5, tokens=6, neurons=10)
    weight = torch.randn(3, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    correlation = activations.T @ activations
    kept = torch.arange(8)  # 8 kept neurons, rank ≤ 6: C_SS singular
    refit = nystrom_refit(weight, correlation, kept)
    assert torch.isfinite(refit).all()
    _, residual = least_squares(weight, activations, kept.tolist())
    total = (activations @ weight.T).pow(2).sum().item()
    assert selection_error(weight, correlation, kept, refit) <= residual + 1e-8 * total
    residuals = nested_residuals(weight, correlation, torch.arange(10))
    assert torch.isfinite(residuals).all() and residuals[6:].max() <= 1e-6 * total  # 6 neurons span everything (up to the ridge)


@pytest.mark.parametrize("tokens", [100, 5])  # a full-rank and a singular correlation
def test_ridge_leverage_scores_match_their_definition(tokens):
    activations = gated_activations(7, tokens=tokens, neurons=9)
    correlation = activations.T @ activations
    ridge = 0.05
    lam = ridge * correlation.diagonal().mean()
    expected = torch.linalg.solve(correlation + lam * torch.eye(9, dtype=torch.float64), correlation).diagonal()  # C symmetric: C(C+λI)⁻¹ = (C+λI)⁻¹C
    torch.testing.assert_close(ridge_leverage_scores(correlation, ridge), expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(leverage_order(correlation, ridge), torch.argsort(expected, descending=True, stable=True))
    with pytest.raises(LowrankError, match="ridge"):
        ridge_leverage_scores(correlation, 0.0)


def brute_force(weight, activations, size):
    """Every subset of ``size`` neurons with its refit error."""
    return {subset: least_squares(weight, activations, subset)[1] for subset in itertools.combinations(range(activations.shape[1]), size)}


SEEDS, NEURONS, KEPT = range(20), 8, 3


def test_selection_against_brute_force_over_every_subset():
    """On 20 seeded tiny cases (8 neurons, keep 3, all 56 subsets enumerated):

    - the greedy order's first 3 neurons are within 1 % of the best subset's weighted refit error
      in every case (it found the optimum in all 30 cases tried while writing this test);
    - the ridge leverage top 3 (which reads C only) are never worse than the median subset, and their
      unweighted Nyström error tr(C − Ĉ_S) is within (k + 1)·Σ_{i>k} λ_i(C), the bound volume
      sampling meets in expectation (Deshpande et al. 2006), here met by a deterministic choice.
    """
    identity = torch.eye(NEURONS, dtype=torch.float64)
    for seed in SEEDS:
        activations = gated_activations(100 + seed, tokens=150, neurons=NEURONS, width=5)
        weight = torch.randn(4, NEURONS, generator=torch.Generator().manual_seed(200 + seed), dtype=torch.float64)
        correlation = activations.T @ activations
        errors = brute_force(weight, activations, KEPT)
        best, median = min(errors.values()), sorted(errors.values())[len(errors) // 2]
        greedy = tuple(sorted(greedy_order(weight, correlation)[:KEPT].tolist()))
        assert errors[greedy] <= 1.01 * best, seed
        leverage = tuple(sorted(leverage_order(correlation, 1e-2)[:KEPT].tolist()))
        assert errors[leverage] <= median, seed
        unweighted = least_squares(identity, activations, leverage)[1]
        tail = torch.linalg.eigvalsh(correlation).flip(0)[KEPT:].sum().item()
        assert tail <= unweighted <= (KEPT + 1) * tail, seed  # no subset beats the best rank-k approximation


def test_greedy_order_is_the_stepwise_least_squares_greedy():
    """Each step of the greedy order keeps the neuron whose addition gives the smallest refit error,
    the error measured by least squares on the activations for every candidate (never forming C):
    the whole order agrees on full-rank cases. On a rank-deficient one (6 tokens, 10 neurons) it agrees
    before the last step to the rank, where every candidate completes the span (a tie at zero error):
    there its pick is error-free too, and the neurons left add nothing and follow in index order."""
    for seed, tokens, neurons in [(0, 200, 10), (1, 200, 12), (2, 6, 10)]:
        activations = gated_activations(300 + seed, tokens=tokens, neurons=neurons, width=8)
        weight = torch.randn(4, neurons, generator=torch.Generator().manual_seed(400 + seed), dtype=torch.float64)
        rank = torch.linalg.matrix_rank(activations).item()
        chosen: list[int] = []
        for _ in range(rank):
            errors = {i: least_squares(weight, activations, [*chosen, i])[1] for i in range(neurons) if i not in chosen}
            chosen.append(min(errors, key=errors.get))
        order = greedy_order(weight, activations.T @ activations).tolist()
        assert sorted(order) == list(range(neurons))
        if rank == neurons:
            assert order == chosen, seed
        else:
            assert order[: rank - 1] == chosen[: rank - 1], seed
            assert least_squares(weight, activations, order[:rank])[1] <= 1e-9 * least_squares(weight, activations, [])[1]
            assert order[rank:] == sorted(set(range(neurons)) - set(order[:rank])), seed


def test_exact_when_the_correlation_has_the_kept_rank():
    """C of rank k: k well-chosen neurons span every activation, and both orders find an error-free subset."""
    generator = torch.Generator().manual_seed(9)
    activations = torch.randn(50, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 7, generator=generator, dtype=torch.float64)
    weight = torch.randn(2, 7, generator=generator, dtype=torch.float64)
    correlation = activations.T @ activations
    total = (activations @ weight.T).pow(2).sum().item()
    for order in (greedy_order(weight, correlation), leverage_order(correlation, 1e-6)):
        assert least_squares(weight, activations, order[:3].tolist())[1] <= 1e-9 * total
        assert nested_residuals(weight, correlation, order)[3] <= 1e-8 * total
