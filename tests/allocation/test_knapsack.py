import itertools

import pytest
import torch

from lowrank.allocation.knapsack import greedy_ranks, max_factored_rank, predicted_error, stored_parameters
from lowrank.errors import LowrankError


def brute_force(gains, shapes, budget):
    options = {name: list(range(1, max_factored_rank(*shape) + 1)) + [None] for name, shape in shapes.items()}
    best = None
    for choice in itertools.product(*options.values()):
        ranks = dict(zip(options, choice))
        if sum(stored_parameters(shapes[n], r) for n, r in ranks.items()) <= budget:
            error = predicted_error(gains, ranks)
            best = error if best is None else min(best, error)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_within_one_step_of_the_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a": (6, 10), "b": (8, 8), "c": (10, 6)}
    gains = {name: torch.rand(6, generator=generator).sort(descending=True).values ** 3 * (1 + 4 * (name == "c")) for name in shapes}
    largest_step = max(g.sum().item() for g in gains.values())
    exact_hits = 0
    for budget in range(48, 190, 7):
        ranks = greedy_ranks(gains, shapes, budget)
        assert sum(stored_parameters(shapes[n], r) for n, r in ranks.items()) <= budget
        optimum = brute_force(gains, shapes, budget)
        assert optimum - 1e-12 <= predicted_error(gains, ranks) <= optimum + largest_step
        exact_hits += predicted_error(gains, ranks) <= optimum + 1e-12
    assert exact_hits >= 10  # usually exactly optimal


def test_budget_is_never_exceeded_and_nearly_filled():
    generator = torch.Generator().manual_seed(0)
    shapes = {"q": (32, 32), "up": (64, 32), "down": (32, 64)}
    gains = {name: torch.rand(min(s), generator=generator).sort(descending=True).values for name, s in shapes.items()}
    for budget in (400, 1500, 3000, 5000):
        ranks = greedy_ranks(gains, shapes, budget)
        spent = sum(stored_parameters(shapes[n], r) for n, r in ranks.items())
        growable = [sum(shapes[n]) for n, r in ranks.items() if r is not None and r < max_factored_rank(*shapes[n])]
        assert spent <= budget
        assert not growable or budget - spent < max(growable)


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(LowrankError, match="ratio is too high"):
        greedy_ranks({"a": torch.ones(8)}, {"a": (8, 8)}, budget=10)
