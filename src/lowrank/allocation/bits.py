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
width of its best quantized candidate within the budget it won (the machinery, shared with
``lowrank-sparse``'s ``sparse_choices``, is :mod:`lowrank.allocation.choices`). The factorization then fits the
method's own order (``alternate`` by default, whose error is at most the low-rank-first start's
when it is judged by the same error) and keeps the plain fit where that is better.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..calibration import LayerStatistics
from .choices import BUDGET_FRACTIONS, CandidateErrors, budget_grid, choices_plan, loss_increase, within_budget
from .plan import Plan

__all__ = ["BUDGET_FRACTIONS", "bits_plan", "budget_grid", "candidate_errors", "loss_increase"]


def candidate_errors(weight: torch.Tensor, stats: LayerStatistics, config, grid: Sequence[int]) -> CandidateErrors:
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
    errors: CandidateErrors = {None: [loss_increase(target - best_fit(budget), white.root, fisher, tokens) for budget in grid]}
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

    Example:
        >>> plan = bits_plan(model, 0.8, stats, LowRankQuantConfig(bit_choices="2,3,4"))  # doctest: +SKIP
        >>> plan.details["layer_options"]["model.layers.0.mlp.down_proj"]  # doctest: +SKIP
        {'bits': 3}
    """

    def choose(errors: CandidateErrors, grid: list[int], budget: int) -> tuple[dict, str]:
        within = within_budget(errors, grid, budget)
        winner = min(within, key=lambda candidate: candidate[0])[1]
        # The bit width of the best quantized candidate within the budget (the plain fit may still win
        # inside the factorization, judged by its own error); the narrowest when none fits.
        quantized = [candidate for candidate in within if candidate[1] is not None]
        return {"bits": min(quantized)[1] if quantized else min(config.choices)}, ("plain" if winner is None else f"{winner}-bit")

    return choices_plan(
        model, ratio, stats, lambda weight, layer, grid: candidate_errors(weight, layer, config, grid), choose,
        "lowrank-quant with bit_choices", "bits", include=include, exclude=exclude, allow_dense=allow_dense,
    )  # fmt: skip
