"""The allocation stage: a model, a budget and (optionally) statistics in; a :class:`Plan` out.

Strategies (``--allocate NAME``):

- ``uniform``: the same ratio for every matrix.
- ``energy``: each matrix keeps the smallest rank holding a fraction τ of its spectral energy
  (whitened when statistics are given), τ found by bisection to meet the budget.
- ``welore``: data-free; singular values normalized by the largest, one global threshold found by
  bisection; matrices whose spectra decay fast lose most rank (WeLore's low-rank components).
- ``global``: minimizes the total predicted loss increase (see :mod:`lowrank.allocation.curves`)
  under the budget, greedily by marginal gain per parameter. Needs gradient statistics.
- ``sensitivity``: the same knapsack, with each matrix's whitened error curve scaled by a *measured*
  loss sensitivity: calibration forward passes with only that matrix truncated at a few candidate
  ranks (see :mod:`lowrank.allocation.sensitivity`). Needs calibration batches, no gradients.

Every strategy meets the budget exactly: never above it, and the remainder is smaller than one rank
step of any matrix that could still grow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import rank_for_ratio
from ..linalg.welore import ranks_at_threshold
from ..methods import METHODS
from ..nn import find_targets, linear_shape, linear_weight
from ..registry import Registry
from .curves import loss_curves, whitened_energy
from .knapsack import budget_for_ratio, greedy_ranks, max_factored_rank, predicted_error, stored_parameters
from .plan import Plan
from .sensitivity import SensitivityConfig, sensitivity_curves


@dataclass
class Allocation:
    """What a strategy may return instead of bare ranks: also the loss curves it optimized (the
    plan's predicted error is then theirs) and details for :attr:`Plan.details`."""

    ranks: dict[str, int | None]
    curves: dict[str, torch.Tensor] | None = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    """A rank allocation strategy (``--allocate NAME``).

    Attributes:
        name: what users type.
        choose: ``(shapes, ratio, **context) -> ranks`` (``None`` = dense) or an :class:`Allocation`.
        needs_gradients: whether it needs calibration statistics with Fisher information.
        needs_batches: whether it runs the model on calibration batches (``allocate(..., batches=...)``).
    """

    name: str
    choose: Callable[..., "dict[str, int | None] | Allocation"]
    needs_gradients: bool = False
    needs_batches: bool = False


STRATEGIES: Registry[Strategy] = Registry("allocation strategy")


def register_strategy(name: str, needs_gradients: bool = False, needs_batches: bool = False):
    """Decorator: make ``choose`` the strategy ``name`` with its capabilities."""

    def decorator(choose):
        STRATEGIES.register(name, Strategy(name, choose, needs_gradients, needs_batches))
        return choose

    return decorator


def strategy_names() -> list[str]:
    return STRATEGIES.names()


def strategy_needs_gradients(name: str) -> bool:
    return STRATEGIES.get_entry(name).needs_gradients


def strategy_needs_batches(name: str) -> bool:
    """Whether the strategy runs the model on calibration batches (``allocate(..., batches=...)``)."""
    return STRATEGIES.get_entry(name).needs_batches


@register_strategy("uniform")
def uniform(shapes, ratio, **_context) -> dict[str, int | None]:
    """The same ratio for every layer: r = floor((1 − ratio)·m·n/(m + n))."""
    return {name: rank_for_ratio(out, inp, ratio) for name, (out, inp) in shapes.items()}


def _energies(model: nn.Module, shapes, stats) -> dict[str, torch.Tensor]:
    """σ² per matrix: of W·C^{1/2} when statistics are given, of W otherwise."""
    energies = {}
    for name in shapes:
        weight = linear_weight(model.get_submodule(name)).detach()
        if stats is not None and name in stats:
            energies[name] = whitened_energy(weight, stats[name])
        else:
            energies[name] = torch.linalg.svdvals(weight.double()).pow(2)
    return energies


def _fill(ranks, gains, shapes, budget) -> dict[str, int | None]:
    """Spend what a threshold left over, one rank step at a time, best gain per parameter first."""
    spent = sum(stored_parameters(shapes[name], rank) for name, rank in ranks.items())
    grown = dict(ranks)
    while True:
        best, best_value = None, 0.0
        for name, rank in grown.items():
            out, inp = shapes[name]
            if rank is None or rank >= max_factored_rank(out, inp) or spent + out + inp > budget:
                continue
            value = gains[name][rank].item() / (out + inp)
            if best is None or value > best_value:
                best, best_value = name, value
        if best is None:
            return grown
        grown[best] += 1
        spent += sum(shapes[best])


def _threshold_ranks(shapes, budget, ranks_at: Callable[[float], dict[str, int | None]], keep_more_when_higher: bool):
    """Bisection on a scalar threshold for the ranks that use the most of ``budget`` without exceeding it."""
    low, high = 0.0, 1.0

    def cost(ranks):
        return sum(stored_parameters(shapes[name], rank) for name, rank in ranks.items())

    for _ in range(50):
        middle = (low + high) / 2
        fits = cost(ranks_at(middle)) <= budget
        if fits == keep_more_when_higher:
            low = middle
        else:
            high = middle
    return ranks_at(low if keep_more_when_higher else high)


@register_strategy("energy")
def energy(shapes, ratio, model, stats=None, **_context) -> dict[str, int | None]:
    """Smallest rank keeping a fraction τ of each matrix's (whitened) energy, τ bisected to the budget."""
    energies = _energies(model, shapes, stats)
    budget = budget_for_ratio(shapes, ratio)
    cumulative = {name: e.cumsum(0) / e.sum().clamp(min=1e-300) for name, e in energies.items()}

    def ranks_at(threshold: float) -> dict[str, int | None]:
        ranks = {}
        for name, fraction in cumulative.items():
            rank = max(1, int((fraction < threshold).sum().item()) + 1)
            ranks[name] = rank if rank <= max_factored_rank(*shapes[name]) else None
        return ranks

    return _fill(_threshold_ranks(shapes, budget, ranks_at, keep_more_when_higher=True), energies, shapes, budget)


@register_strategy("welore")
def welore(shapes, ratio, model, **_context) -> dict[str, int | None]:
    """WeLore: one global threshold on σ_i/σ_1 (data-free), bisected to the budget."""
    energies = _energies(model, shapes, None)
    budget = budget_for_ratio(shapes, ratio)
    spectra = {name: e.clamp(min=0).sqrt() for name, e in energies.items()}

    def ranks_at(threshold: float) -> dict[str, int | None]:
        ranks = ranks_at_threshold(spectra, threshold)
        return {name: rank if rank <= max_factored_rank(*shapes[name]) else None for name, rank in ranks.items()}

    # A higher threshold keeps fewer values, so the feasible side is the high one.
    return _fill(_threshold_ranks(shapes, budget, ranks_at, keep_more_when_higher=False), energies, shapes, budget)


@register_strategy("global", needs_gradients=True)
def global_error(shapes, ratio, model, method, stats=None, allow_dense=True, **_context) -> Allocation:
    """Minimize the total predicted loss increase under the budget (greedy marginal allocation)."""
    return _global_allocation(loss_curves(model, shapes, stats, method), shapes, ratio, allow_dense)


def _global_allocation(curves, shapes, ratio, allow_dense=True) -> Allocation:
    return Allocation(ranks=greedy_ranks(curves, shapes, budget_for_ratio(shapes, ratio), allow_dense=allow_dense), curves=curves)


def global_plan(curves: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float) -> Plan:
    """The ``global`` plan for loss curves computed elsewhere (e.g. block by block,
    :mod:`lowrank.blockwise.gradients`): the same knapsack and the same :class:`Plan` as :func:`allocate`."""
    return _plan(ratio, "global", shapes, _global_allocation(curves, shapes, ratio))


def _plan(ratio: float, strategy: str, shapes, result: Allocation) -> Plan:
    ranks = result.ranks
    plan = Plan(ratio=ratio, strategy=strategy, shapes=shapes, ranks={n: r for n, r in ranks.items() if r is not None}, details=result.details)
    if result.curves is not None:
        plan.predicted_error = predicted_error(result.curves, ranks)
    return plan


@register_strategy("sensitivity", needs_batches=True)
def sensitivity(shapes, ratio, model, stats=None, batches=None, strategy_config=None, allow_dense=True, **_context) -> Allocation:
    """Minimize the total *measured-sensitivity* loss increase under the budget (see :mod:`.sensitivity`)."""
    if strategy_config is not None and not isinstance(strategy_config, SensitivityConfig):
        raise LowrankError(f"strategy 'sensitivity' takes a SensitivityConfig, got {type(strategy_config).__name__}")
    curves, details = sensitivity_curves(model, shapes, stats, batches, strategy_config)
    if stats is not None and all(name in stats and stats[name].output_fisher is not None for name in shapes):
        # The second-order scale ``global`` would have used, to compare with the measured one.
        for name, item in details["matrices"].items():
            item["fisher_scale"] = 0.5 * stats[name].output_fisher.mean().item()
    ranks = greedy_ranks(curves, shapes, budget_for_ratio(shapes, ratio), allow_dense=allow_dense)
    return Allocation(ranks=ranks, curves=curves, details={"sensitivity": details})


def allocate(
    model: nn.Module,
    ratio: float,
    method: str = "whiten",
    stats: dict[str, LayerStatistics] | None = None,
    strategy: str = "uniform",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
    batches: Sequence[dict[str, torch.Tensor]] | None = None,
    strategy_config=None,
    predict_error: bool | None = None,
    method_config=None,
) -> Plan:
    """Decide the rank of every targeted linear layer so the targeted weights shrink by ``ratio``.

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' weight parameters to remove, in [0, 1).
        method: the factorization method the plan is for (``global`` predicts its errors); a
            method that sizes whole modules (``modegpt``) makes its own plan with ``strategy``
            (see :func:`lowrank.methods.modegpt.modegpt_plan`).
        stats: calibration statistics; ``global`` needs them with gradients
            (``calibrate(..., gradients=True)``); ``energy`` whitens with them when given;
            ``sensitivity`` whitens with them (or collects them from ``batches``).
        strategy: one of :func:`strategy_names`.
        include: regular expressions selecting layers (default: linears in the blocks).
        exclude: regular expressions removing layers.
        allow_dense: let ``global`` and ``sensitivity`` keep a layer dense when that is the best
            use of the budget (``False`` matches what an elastic model can be resized to).
        batches: calibration batches with ``input_ids`` and ``labels``
            (:func:`lowrank.calibration.calibration_batches`), for strategies that run the model
            (:func:`strategy_needs_batches`).
        strategy_config: options of the strategy, e.g. a
            :class:`~lowrank.allocation.sensitivity.SensitivityConfig` for ``sensitivity``.
        predict_error: set ``plan.predicted_error`` (the predicted per-token loss increase).
            ``None``: when the strategy computed loss curves anyway (``global``, ``sensitivity``);
            ``True``: also for the others when the statistics carry gradients, at the cost of one
            whitened spectrum per matrix (on SmolLM2-135M as long as a ``whiten`` compression).
        method_config: the method's options, the config :func:`lowrank.compress_` takes. A method
            that makes its own plan reads them (``modegpt``, ``basis-sharing``, ``lowrank-quant``'s
            ``bit_choices``, ``lowrank-sparse``'s ``sparse_choices``); the per-matrix strategies
            plan from the method's name alone, so callers can pass them for any method.

    Returns:
        A :class:`Plan` (reads like ``{module name: rank}``), with ``predicted_error`` as
        ``predict_error`` says (``sensitivity``: from measured scales; its measurements are in
        ``details``).

    Example:
        >>> plan = allocate(model, ratio=0.3)  # doctest: +SKIP
        >>> plan["model.layers.0.mlp.up_proj"]  # doctest: +SKIP
        134
    """
    if not 0.0 <= ratio < 1.0:
        raise LowrankError(f"ratio must be in [0, 1), got {ratio}; e.g. 0.3 removes 30 % of the targeted parameters")
    own_plan = METHODS.get(method).plan
    if own_plan is not None:  # a method that sizes whole modules (modegpt's MLPs), or sets per-layer options, plans itself
        return own_plan(
            model, ratio, stats=stats, strategy=strategy, include=include, exclude=exclude, allow_dense=allow_dense, strategy_config=strategy_config,
            batches=batches, predict_error=predict_error, config=method_config,
        )  # fmt: skip
    return allocate_matrices(model, ratio, method, stats, strategy, include, exclude, allow_dense, batches, strategy_config, predict_error)


def allocate_matrices(
    model: nn.Module,
    ratio: float,
    method: str = "whiten",
    stats: dict[str, LayerStatistics] | None = None,
    strategy: str = "uniform",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
    batches: Sequence[dict[str, torch.Tensor]] | None = None,
    strategy_config=None,
    predict_error: bool | None = None,
) -> Plan:
    """:func:`allocate` by a per-matrix strategy, whatever plan the method would make itself (for a
    method's own ``plan`` that falls back to the strategies)."""
    choose = STRATEGIES.get_entry(strategy).choose
    names = find_targets(model, include=include, exclude=exclude)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    if ratio == 0.0:
        result = Allocation(ranks={name: None for name in shapes})
    else:
        result = choose(
            shapes, ratio, model=model, method=method, stats=stats, allow_dense=allow_dense, batches=batches, strategy_config=strategy_config
        )
    if not isinstance(result, Allocation):
        result = Allocation(ranks=result)
    plan = _plan(ratio, strategy, shapes, result)
    has_gradients = stats is not None and all(name in stats and stats[name].output_fisher is not None for name in shapes)
    if result.curves is None and has_gradients and predict_error:
        plan.predicted_error = predicted_error(loss_curves(model, shapes, stats, method), result.ranks)
    return plan
