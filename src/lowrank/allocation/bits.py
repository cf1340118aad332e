"""Each layer's bit width chosen with its budget: ``lowrank-quant`` under ``--allocate global`` with
``--option bit_choices=2,3,4``.

A layer stored as A·B + Q (a low-rank part beside a b-bit residual) can spend its budget on rank or
on bits, and which buys less loss depends on the layer. For every targeted layer, at every budget of
a grid (fractions of its dense size, in the plan's rank units: R·(out + in) values of the model
dtype) the candidates are:

- the plain low-rank fit at rank R;
- for every bit width b, the low-rank-first split (SVDQuant): the best fit of rank r′, r′ the rank that
  fits beside a b-bit residual in the budget (:func:`~lowrank.methods.lowrank_quant.lowrank_rank`),
  then W minus it quantized by round-to-nearest.

Each candidate's predicted loss increase is the one ``global`` uses for a factored layer,
½·Σ_o f_o·E[Δy_o²] (f the output's diagonal Fisher, Δy = ΔW·x over the calibration tokens), here
measured on the candidate's own ΔW. A layer's error at budget R is then the least of its candidates
costing at most R: a non-increasing curve, which the knapsack of ``global``
(:func:`~lowrank.allocation.knapsack.greedy_ranks`) spends the budget on, and each layer gets the bit
width of its best quantized candidate within the budget it won. The factorization then fits the
method's own order (``alternate`` by default, whose error is at most the low-rank-first start's
when it is judged by the same error) and keeps the plain fit where that is better.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def candidate_errors(weight: torch.Tensor, stats: LayerStatistics, config, grid: Sequence[int]) -> dict[int | None, list[float | None]]:
    """Predicted loss increase of each candidate of one layer: ``{bits: [error at each budget of grid]}``,
    ``None`` for the plain low-rank fit; an entry is ``None`` where that bit width does not fit the budget."""
    from ..compensate.base import BaseSpec, compress_base
    from ..methods.lowrank_quant import lowrank_rank, outlier_count
    from ..nn.lowrank_sparse_linear import value_bits

    out_features, in_features = weight.shape
    model_bits = value_bits(weight.dtype)
    target = weight.detach().double()
    white = stats.whitening(0.0, torch.float64, symmetric=False)
    fisher, tokens = stats.output_fisher, stats.num_tokens
    # One SVD gives every rank's best fit: of W (Frobenius), or of W·L then ·L⁻¹ (whitened; any root
    # gives the same optimum) as the method fits its low-rank part.
    if config.whiten:
        u, s, vh = torch.linalg.svd(target @ white.root, full_matrices=False)
        vh = white.unwhiten(vh)
    else:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)

    def best_fit(rank: int) -> torch.Tensor:
        return (u[:, :rank] * s[:rank]) @ vh[:rank]

    num_outliers = outlier_count(out_features, in_features, config.outliers)
    errors: dict[int | None, list[float | None]] = {None: [loss_increase(target - best_fit(budget), white.root, fisher, tokens) for budget in grid]}
    for bits in config.choices:
        row = []
        for budget in grid:
            inner = lowrank_rank(out_features, in_features, budget, bits, config.group_size, model_bits, num_outliers)
            if inner < 1:
                row.append(None)
                continue
            low = best_fit(inner)
            residual = compress_base(target - low, None, BaseSpec("rtn", bits=bits), config.group_size, dtype=torch.float64).approximation
            row.append(loss_increase(target - low - residual, white.root, fisher, tokens))
        errors[bits] = row
    return errors


def bits_plan(
    model: nn.Module,
    ratio: float,
    stats: dict[str, LayerStatistics],
    config,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
) -> Plan:
    """The ``global`` plan of ``lowrank-quant`` with ``config.bit_choices``: a budget and a bit width per layer.

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' stored size to remove (counted as ``lowrank-quant``
            counts it: in values of the model's dtype).
        stats: calibration statistics with gradients (``calibrate(..., gradients=True)``).
        config: a :class:`~lowrank.methods.lowrank_quant.LowRankQuantConfig` with ``bit_choices``.
        include / exclude: layer selection, as :func:`lowrank.find_targets`.
        allow_dense: whether a layer may stay dense.

    Returns:
        A :class:`Plan` whose ranks are the layers' budgets, with ``details["layer_options"]``
        (``{name: {"bits": b}}``, read by :func:`lowrank.compress_`), ``details["bits"]`` (how many
        layers got each width) and the predicted loss increase.
    """
    names = find_targets(model, include=include, exclude=exclude)
    if stats is None or any(name not in stats or stats[name].output_fisher is None for name in names):
        raise LowrankError("lowrank-quant with bit_choices predicts each layer's loss from gradient statistics; pass --calib FILE (the CLI collects them)")
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    curves, options, chosen_errors = {}, {}, {}
    with one_pass(stats, names):
        for name in names:
            out_features, in_features = shapes[name]
            grid = budget_grid(out_features, in_features)
            errors = candidate_errors(linear_weight(model.get_submodule(name)), stats[name], config, grid)
            # error(R) for R = 1 … r_max: the best candidate costing at most R (a step curve).
            largest = max_factored_rank(out_features, in_features)
            best, at, curve = float("inf"), 0, []
            for budget in range(1, largest + 1):
                while at < len(grid) and grid[at] <= budget:
                    best = min([best] + [row[at] for row in errors.values() if row[at] is not None])
                    at += 1
                curve.append(best)
            # greedy_ranks reads error(R) as the tail sum of gains from R on: gains[R] = error(R) − error(R + 1).
            values = torch.tensor(curve, dtype=torch.float64)
            gains = torch.zeros(min(out_features, in_features), dtype=torch.float64)
            gains[1:largest] = values[:-1] - values[1:]
            gains[largest] = values[-1]
            curves[name] = gains
            options[name] = (curve, errors, grid)
    ranks = greedy_ranks(curves, shapes, budget_for_ratio(shapes, ratio), allow_dense=allow_dense)
    layer_options, widths, predicted = {}, {}, 0.0
    for name, budget in ranks.items():
        if budget is None:
            widths["dense"] = widths.get("dense", 0) + 1
            continue
        curve, errors, grid = options[name]
        predicted += curve[budget - 1]
        within = [(row[i], bits) for bits, row in errors.items() for i, cost in enumerate(grid) if cost <= budget and row[i] is not None]
        winner = min(within, key=lambda candidate: candidate[0])[1]
        # The bit width of the best quantized candidate within the budget (the plain fit may still win
        # inside the factorization, judged by its own error); the narrowest when none fits.
        quantized = [candidate for candidate in within if candidate[1] is not None]
        layer_options[name] = {"bits": min(quantized)[1] if quantized else min(config.choices)}
        label = "plain" if winner is None else f"{winner}-bit"
        widths[label] = widths.get(label, 0) + 1
    plan = Plan(
        ratio=ratio,
        strategy="global",
        shapes=shapes,
        ranks={name: rank for name, rank in ranks.items() if rank is not None},
        predicted_error=predicted,
        details={"layer_options": layer_options, "bits": dict(sorted(widths.items()))},
    )
    return plan
