"""The knapsack with priced entries (a MoDeGPT MLP unit: size k costs k·step, dense a fixed price) against brute force."""

import itertools

import pytest
import torch

from lowrank.allocation.knapsack import greedy_ranks, max_factored_rank, predicted_error, stored_parameters

PRICES = {"unit": (9, 9 * 7)}  # 7 neurons of 3·3 parameters each: sizes 1 … 6, or dense at 63
SHAPES = {"a": (6, 10), "b": (8, 8), "unit": (3, 7)}  # the unit's shape is not read


def cost(name, size):
    step, dense = PRICES.get(name, (None, None))
    if step is not None:
        return dense if size is None else size * step
    return stored_parameters(SHAPES[name], size)


def options(name):
    largest = (PRICES[name][1] - 1) // PRICES[name][0] if name in PRICES else max_factored_rank(*SHAPES[name])
    return list(range(1, largest + 1)) + [None]


def brute_force(gains, budget):
    best = None
    for choice in itertools.product(*(options(name) for name in SHAPES)):
        sizes = dict(zip(SHAPES, choice))
        if sum(cost(name, size) for name, size in sizes.items()) <= budget:
            error = predicted_error(gains, sizes)
            best = error if best is None else min(best, error)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_priced_entries_are_sized_within_one_step_of_the_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    gains = {name: torch.rand(7, generator=generator).sort(descending=True).values ** 2 * (1 + 3 * (name == "unit")) for name in SHAPES}
    largest_step = max(g.sum().item() for g in gains.values())
    exact_hits = 0
    for budget in range(45, 190, 9):
        sizes = greedy_ranks(gains, SHAPES, budget, prices=PRICES)
        assert sum(cost(name, size) for name, size in sizes.items()) <= budget
        assert sizes["unit"] is None or 1 <= sizes["unit"] <= 6
        optimum = brute_force(gains, budget)
        assert optimum - 1e-12 <= predicted_error(gains, sizes) <= optimum + largest_step
        exact_hits += predicted_error(gains, sizes) <= optimum + 1e-12
    assert exact_hits >= 8  # of 17 budgets; usually exactly optimal
