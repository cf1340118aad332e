"""Each layer's sparse share chosen with its budget: ``lowrank-sparse`` under ``--allocate global`` with
``--option sparse_choices=0,0.25,0.5``.

A layer stored as A·B + S (a low-rank part beside sparse entries) can spend its budget on rank or on
entries, and which buys less loss depends on the layer: a spectrum that decays fast wants rank, a
residual with a few large entries on busy inputs wants them. For every targeted layer, at every
budget R of the grid (:func:`~lowrank.allocation.choices.budget_grid`), each share s of
``sparse_choices`` gives one candidate: the layer exactly as ``lowrank-sparse`` builds it at budget R
with ``sparse_fraction = s`` (:func:`~lowrank.methods.lowrank_sparse.factorize`: the alternation of
the low-rank fit and the entry selection, the best iterate, the plain fit where that is better), its
sparse entries paid as the method counts them (value, column index and row pointers,
:func:`~lowrank.methods.lowrank_sparse.split_budget`). Share 0 is the plain low-rank fit at rank R.

Each candidate's predicted loss increase is measured on its own ΔW
(:func:`~lowrank.allocation.choices.loss_increase`), and the knapsack of ``global`` spends the budget
on the layers' step curves (:func:`~lowrank.allocation.choices.choices_plan`); each layer gets the
share of its best candidate within the budget it won, and is built at that budget (which may lie
above the grid point whose error was predicted: the unused rest of the budget is still spent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..calibration import LayerStatistics
from .choices import CandidateErrors, choices_plan, loss_increase, within_budget
from .plan import Plan


def candidate_errors(weight: torch.Tensor, stats: LayerStatistics, config, grid: Sequence[int], name: str = "") -> CandidateErrors:
    """Predicted loss increase of each candidate of one layer: ``{share: [error at each budget of grid]}``.

    Args:
        weight: the (out, in) dense weight.
        stats: the layer's calibration statistics with gradients.
        config: a :class:`~lowrank.methods.lowrank_sparse.LowRankPlusSparseConfig` with ``sparse_choices``.
        grid: the budgets (plan ranks) to try.
        name: layer name for messages.

    Example:
        >>> errors = candidate_errors(weight, stats[name], LowRankPlusSparseConfig(sparse_choices="0,0.25"), [1, 8])  # doctest: +SKIP
        >>> sorted(errors)  # doctest: +SKIP
        [0.0, 0.25]
    """
    from ..methods.lowrank_sparse import factorize

    target = weight.detach().double()
    # Any root of XᵀX gives the same ‖ΔW·R‖; the symmetric one is what the method fits with, so it is cached already.
    root = stats.whitening(0.0, torch.float64, symmetric=True, name=name).root
    errors: CandidateErrors = {}
    for share in config.choices:
        candidate = dataclasses.replace(config, sparse_fraction=share, sparse_choices="")
        errors[share] = [
            loss_increase(target - factorize(weight, stats, budget, candidate, name=name).dense().double(), root, stats.output_fisher, stats.num_tokens)
            for budget in grid
        ]
    return errors


def sparse_plan(
    model: nn.Module,
    ratio: float,
    stats: dict[str, LayerStatistics],
    config,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
) -> Plan:
    """The ``global`` plan of ``lowrank-sparse`` with ``config.sparse_choices``: a budget and a sparse share per layer.

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' stored size to remove (counted as ``lowrank-sparse``
            counts it: in values of the model's dtype, sparse entries with their indices).
        stats: calibration statistics with gradients (``calibrate(..., gradients=True)``).
        config: a :class:`~lowrank.methods.lowrank_sparse.LowRankPlusSparseConfig` with ``sparse_choices``.
        include / exclude: layer selection, as :func:`lowrank.find_targets`.
        allow_dense: whether a layer may stay dense.

    Returns:
        A :class:`Plan` whose ranks are the layers' budgets, with ``details["layer_options"]``
        (``{name: {"sparse_fraction": s}}``, read by :func:`lowrank.compress_`),
        ``details["sparse"]`` (how many layers got each share) and the predicted loss increase.

    Example:
        >>> plan = sparse_plan(model, 0.4, stats, LowRankPlusSparseConfig(whiten=True, sparse_choices="0,0.25,0.5"))  # doctest: +SKIP
        >>> plan.details["layer_options"]["model.layers.0.mlp.down_proj"]  # doctest: +SKIP
        {'sparse_fraction': 0.25}
    """

    def choose(errors: CandidateErrors, grid: list[int], budget: int) -> tuple[dict, str]:
        share = min(within_budget(errors, grid, budget), key=lambda candidate: candidate[0])[1]
        return {"sparse_fraction": share}, "plain" if share == 0.0 else f"share {share:g}"

    return choices_plan(
        model, ratio, stats, lambda weight, layer, grid: candidate_errors(weight, layer, config, grid), choose,
        "lowrank-sparse with sparse_choices", "sparse", include=include, exclude=exclude, allow_dense=allow_dense,
    )  # fmt: skip
