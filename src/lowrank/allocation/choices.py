"""Each layer's structure chosen with its budget by the ``global`` knapsack.

A structured method can spend a layer's budget in several ways: ``lowrank-quant`` on rank or on the
residual's bit width (:mod:`lowrank.allocation.bits`), ``lowrank-sparse`` on rank or on sparse
entries (:mod:`lowrank.allocation.sparse_choices`). Which buys less loss depends on the layer, so
the allocator decides both at once. For every targeted layer, at every budget of a grid (fractions
of its dense size, in the plan's rank units: R·(out + in) values of the model dtype), each choice
gives one candidate, and its predicted loss increase is the one ``global`` uses for a factored
layer, ½·Σ_o f_o·E[Δy_o²] (f the output's diagonal Fisher, Δy = ΔW·x over the calibration tokens),
measured on the candidate's own ΔW (:func:`loss_increase`).

A layer's error at budget R is the least of its candidates costing at most R: a non-increasing step
curve (:func:`step_gains`), which the knapsack of ``global``
(:func:`~lowrank.allocation.knapsack.greedy_ranks`) spends the budget on; each layer then gets the
options of its best candidate within the budget it won (the method's ``choose``). This module is the
machinery both use; what a candidate is, and which options it sets, is the method's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..calibration.statistics import one_pass
from ..errors import LowrankError
from ..nn import find_targets, linear_shape, linear_weight
from .knapsack import budget_for_ratio, greedy_ranks, max_factored_rank
from .plan import Plan

# Budgets tried per layer, as fractions of the dense layer's size (rank 1 is always tried as well).
BUDGET_FRACTIONS = (0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.18, 0.22, 0.26, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.85)

# {choice: [predicted loss increase at each budget of the grid, None where the choice does not fit]}
CandidateErrors = dict[Hashable, list[float | None]]


def budget_grid(out_features: int, in_features: int) -> list[int]:
    """The budgets (plan ranks) tried for an (out, in) layer: rank 1 and fractions of its dense size.

    Example:
        >>> budget_grid(256, 256)[:5]
        [1, 5, 7, 10, 12]
    """
    largest = max_factored_rank(out_features, in_features)
    dense = out_features * in_features / (out_features + in_features)
    return sorted({1, *(min(largest, max(1, int(fraction * dense))) for fraction in BUDGET_FRACTIONS)})


def loss_increase(delta: torch.Tensor, root: torch.Tensor, output_fisher: torch.Tensor, tokens: int) -> float:
    """½·Σ_o f_o·E[Δy_o²] for Δy = ΔW·x: with R·Rᵀ = XᵀX, E[Δy_o²] = ‖(ΔW·R)_o‖² / tokens.

    Example:
        >>> x = torch.randn(50, 4, dtype=torch.float64); delta = torch.randn(3, 4, dtype=torch.float64)
        >>> f = torch.rand(3, dtype=torch.float64)
        >>> exact = 0.5 * (f * (x @ delta.T).pow(2).mean(0)).sum().item()
        >>> abs(loss_increase(delta, torch.linalg.cholesky(x.T @ x), f, 50) - exact) < 1e-10
        True
    """
    per_output = (delta.to(root.dtype) @ root).pow(2).sum(1)
    return 0.5 * (output_fisher.to(root.dtype) * per_output).sum().item() / max(tokens, 1)


def step_curve(errors: CandidateErrors, grid: Sequence[int], largest: int) -> list[float]:
    """error(R) for R = 1 … ``largest``: the least candidate error costing at most R (a non-increasing step curve).

    Example:
        >>> step_curve({"a": [3.0, 1.0], "b": [2.0, None]}, [1, 3], 4)
        [2.0, 2.0, 1.0, 1.0]
    """
    best, at, curve = float("inf"), 0, []
    for budget in range(1, largest + 1):
        while at < len(grid) and grid[at] <= budget:
            best = min([best] + [row[at] for row in errors.values() if row[at] is not None])
            at += 1
        curve.append(best)
    return curve


def step_gains(curve: Sequence[float], out_features: int, in_features: int) -> torch.Tensor:
    """The gains :func:`~lowrank.allocation.knapsack.greedy_ranks` reads for ``curve`` (error at R = 1 … r_max).

    greedy_ranks reads error(R) as the tail sum of gains from R on: gains[R] = error(R) − error(R + 1),
    and the last one (r_max) is the error dense removes.

    Example:
        >>> step_gains([2.0, 2.0, 1.0], 4, 4)  # r_max of 4 × 4 is 1; the curve is cut there
        tensor([0., 2., 0., 0.], dtype=torch.float64)
    """
    largest = max_factored_rank(out_features, in_features)
    values = torch.tensor(list(curve[:largest]), dtype=torch.float64)
    gains = torch.zeros(min(out_features, in_features), dtype=torch.float64)
    gains[1:largest] = values[:-1] - values[1:]
    gains[largest] = values[-1]
    return gains


def within_budget(errors: CandidateErrors, grid: Sequence[int], budget: int) -> list[tuple[float, Hashable]]:
    """(error, choice) of every candidate costing at most ``budget``, choices in ``errors``' order.

    Example:
        >>> within_budget({"a": [3.0, 1.0], "b": [2.0, None]}, [1, 3], 2)
        [(3.0, 'a'), (2.0, 'b')]
    """
    return [(row[i], choice) for choice, row in errors.items() for i, cost in enumerate(grid) if cost <= budget and row[i] is not None]


def choices_plan(
    model: nn.Module,
    ratio: float,
    stats: dict[str, LayerStatistics],
    candidates: Callable[[torch.Tensor, LayerStatistics, list[int]], CandidateErrors],
    choose: Callable[[CandidateErrors, list[int], int], tuple[dict, str]],
    what: str,
    summary: str,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
) -> Plan:
    """The ``global`` plan of a method whose layers choose their structure with their budget.

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' stored size to remove (in values of the model's dtype).
        stats: calibration statistics with gradients (``calibrate(..., gradients=True)``).
        candidates: ``(weight, layer statistics, grid) -> {choice: [error at each budget]}``.
        choose: ``(errors, grid, budget won) -> (the layer's options, a label counted in the summary)``.
        what: the method and option, for the error message (e.g. ``"lowrank-quant with bit_choices"``).
        summary: the ``details`` key counting layers per label (e.g. ``"bits"``).
        include / exclude: layer selection, as :func:`lowrank.find_targets`.
        allow_dense: whether a layer may stay dense.

    Returns:
        A :class:`Plan` whose ranks are the layers' budgets, with ``details["layer_options"]``
        (``{name: options}``, read by :func:`lowrank.compress_`), ``details[summary]`` (how many
        layers got each label, ``"dense"`` for those kept dense) and the predicted loss increase.

    Example:
        >>> plan = choices_plan(model, 0.4, stats, errors_of, choose, "lowrank-sparse with sparse_choices", "sparse")  # doctest: +SKIP
    """
    names = find_targets(model, include=include, exclude=exclude)
    if stats is None or any(name not in stats or stats[name].output_fisher is None for name in names):
        raise LowrankError(f"{what} predicts each layer's loss from gradient statistics; pass --calib FILE (the CLI collects them)")
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    gains, options = {}, {}
    with one_pass(stats, names):
        for name in names:
            out_features, in_features = shapes[name]
            grid = budget_grid(out_features, in_features)
            errors = candidates(linear_weight(model.get_submodule(name)), stats[name], grid)
            curve = step_curve(errors, grid, max_factored_rank(out_features, in_features))
            gains[name] = step_gains(curve, out_features, in_features)
            options[name] = (curve, errors, grid)
    ranks = greedy_ranks(gains, shapes, budget_for_ratio(shapes, ratio), allow_dense=allow_dense)
    layer_options, counts, predicted = {}, {}, 0.0
    for name, budget in ranks.items():
        if budget is None:
            counts["dense"] = counts.get("dense", 0) + 1
            continue
        curve, errors, grid = options[name]
        predicted += curve[budget - 1]
        layer_options[name], label = choose(errors, grid, budget)
        counts[label] = counts.get(label, 0) + 1
    return Plan(
        ratio=ratio,
        strategy="global",
        shapes=shapes,
        ranks={name: rank for name, rank in ranks.items() if rank is not None},
        predicted_error=predicted,
        details={"layer_options": layer_options, summary: dict(sorted(counts.items()))},
    )
