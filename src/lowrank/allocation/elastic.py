"""One compressed model that serves any size.

The whitened (and plain, and Fisher-weighted) factorizations are nested: the rank-r factors are the
first r components of the full factors, because they come from one SVD ordered by singular value.
So a model compressed once at a generous rank — every matrix at r_max, the largest rank whose
factors are smaller than the dense matrix — holds every smaller model: choose ranks for a new
budget and keep the first components. For ``global`` allocation the saved per-matrix loss curves
give the global order of all components, so resizing reruns the greedy allocation on them, with
nothing recomputed and no original model needed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import rank_for_ratio
from ..nn import find_targets, linear_shape
from .curves import loss_curves
from .knapsack import budget_for_ratio, greedy_ranks, max_factored_rank
from .plan import Plan

ELASTIC_STRATEGIES = ("uniform", "global")


def elastic_plan(
    model: nn.Module,
    method: str = "whiten",
    stats: dict[str, LayerStatistics] | None = None,
    strategy: str = "uniform",
    include=None,
    exclude=None,
) -> Plan:
    """Every targeted layer at r_max, plus what :func:`resize_ranks` needs to pick any smaller size.

    Args:
        model: the dense model.
        method: the factorization method (``global`` predicts its errors).
        stats: calibration statistics (with gradients for ``global``).
        strategy: ``"uniform"`` or ``"global"``: how sizes are chosen at load time.
        include: regular expressions selecting layers.
        exclude: regular expressions removing layers.
    """
    if strategy not in ELASTIC_STRATEGIES:
        raise LowrankError(f"an elastic model resizes with {' or '.join(ELASTIC_STRATEGIES)} allocation, not {strategy!r}")
    names = find_targets(model, include=include, exclude=exclude)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    ranks = {name: max_factored_rank(*shape) for name, shape in shapes.items() if max_factored_rank(*shape) >= 1}
    elastic = {"strategy": strategy, "method": method}
    if strategy == "global":
        curves = loss_curves(model, shapes, stats, method)
        elastic["gains"] = {name: curves[name][: ranks[name] + 1].tolist() for name in ranks}
    plan = Plan(ratio=0.0, strategy=strategy, shapes=shapes, ranks=ranks, details={"elastic": elastic})
    plan.ratio = plan.achieved_ratio
    return plan


def resize_ranks(plan: Plan, ratio: float) -> dict[str, int]:
    """Ranks of the ``ratio``-sized model inside an elastic plan (never above the stored ranks)."""
    elastic = plan.details.get("elastic")
    if elastic is None:
        raise LowrankError("this model was not saved elastic; compress it with --elastic to resize it later")
    if not 0.0 < ratio < 1.0:
        raise LowrankError(f"ratio must be in (0, 1), got {ratio}")
    if elastic["strategy"] == "uniform":
        ranks = {name: rank_for_ratio(*plan.shapes[name], ratio) for name in plan.ranks}
        ranks = {name: min(rank, plan.ranks[name]) for name, rank in ranks.items() if rank is not None}
    else:
        gains = {name: torch.tensor(values, dtype=torch.float64) for name, values in elastic["gains"].items()}
        shapes = {name: plan.shapes[name] for name in plan.ranks}
        ranks = greedy_ranks(gains, shapes, budget_for_ratio(plan.shapes, ratio), allow_dense=False)
    if len(ranks) != len(plan.ranks):
        raise LowrankError("this elastic model cannot reach that ratio with every layer factored; choose another ratio")
    return ranks
