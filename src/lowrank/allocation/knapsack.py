"""Choosing ranks under a parameter budget: greedy on marginal gain per parameter.

Each matrix (m × n) can be stored at rank r ∈ [1, r_max] for r·(m + n) parameters, or dense for
m·n, where r_max is the largest rank whose factors are still smaller than the dense matrix. With
non-increasing gains per rank step (true for singular values) the error curve over ranks is convex,
but the jump to dense is not, so each matrix's options are replaced by their lower convex hull;
taking hull segments by the largest gain per parameter while they fit is then optimal for the
relaxed problem (Fox 1966, marginal allocation), and the integer result is within one step of it.
"""

from __future__ import annotations

import heapq

import torch

from ..errors import LowrankError
from ..linalg.rank import max_factored_rank, stored_parameters  # noqa: F401  (re-exported for the allocators)


def budget_for_ratio(shapes: dict[str, tuple[int, int]], ratio: float) -> int:
    return int((1.0 - ratio) * sum(out * inp for out, inp in shapes.values()))


def _hull(costs: list[int], errors: list[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, error) points sorted by cost (error decreasing)."""
    hull: list[int] = []
    for index in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b when it lies on or above the segment from a to the new point.
            if (errors[b] - errors[a]) * (costs[index] - costs[a]) >= (errors[index] - errors[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def greedy_ranks(
    gains: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    budget: int,
    allow_dense: bool = True,
    prices: dict[str, tuple[int, int]] | None = None,
) -> dict[str, int | None]:
    """Ranks (``None`` = dense) that keep the most gain within ``budget`` parameters.

    Each matrix's options (rank 1 … r_max, then dense) are reduced to the lower convex hull of
    (parameters, error); the greedy takes hull segments by gain per parameter while they fit, which
    solves the relaxed problem exactly, then spends the rest one rank step at a time. The result is
    within one step's gain of the optimum.

    Args:
        gains: per matrix, the non-increasing gain of each rank direction (σ_i², loss units, ...).
        shapes: (out, in) per matrix.
        budget: parameters allowed for all these matrices together.
        allow_dense: whether a matrix may stay dense (else ranks stop at r_max).
        prices: entries that are not one factored matrix, as ``{name: (parameters per step, dense
            parameters)}``: size r costs r·step, up to the largest r below dense (a MoDeGPT MLP
            unit keeping r of n neurons costs r·3·hidden, dense 3·hidden·n). Their ``shapes`` are not read.
    """
    options: dict[str, list[int | None]] = {}
    hulls: dict[str, list[int]] = {}
    costs: dict[str, list[int]] = {}
    errors: dict[str, list[float]] = {}
    prices = prices or {}
    for name, shape in shapes.items():
        if name in prices:
            step, dense = prices[name]
            largest, cost = (dense - 1) // step, lambda rank, step=step, dense=dense: dense if rank is None else rank * step
        else:
            largest, cost = max_factored_rank(*shape), lambda rank, shape=shape: stored_parameters(shape, rank)
        ranks = list(range(1, largest + 1)) + ([None] if allow_dense else [])
        curve = gains[name].double()
        tail = curve.flip(0).cumsum(0).flip(0).tolist() + [0.0]  # tail[r] = Σ_{i ≥ r} gains
        options[name] = ranks
        costs[name] = [cost(rank) for rank in ranks]
        errors[name] = [0.0 if rank is None else tail[rank] for rank in ranks]
        hulls[name] = _hull(costs[name], errors[name])
    position = {name: 0 for name in shapes}  # index into the hull
    spent = sum(costs[name][hulls[name][0]] for name in shapes)
    if spent > budget:
        raise LowrankError("the ratio is too high: even rank 1 everywhere exceeds the budget; choose a smaller --ratio")

    def segment(name: str):
        hull, at = hulls[name], position[name]
        if at + 1 >= len(hull):
            return None
        a, b = hull[at], hull[at + 1]
        cost = costs[name][b] - costs[name][a]
        return (errors[name][a] - errors[name][b]) / cost, cost

    heap = []
    for name in shapes:
        step = segment(name)
        if step is not None:
            heapq.heappush(heap, (-step[0], name, step[1]))
    while heap:
        _, name, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # along a convex hull the next segments of this matrix are no better value
        spent += cost
        position[name] += 1
        step = segment(name)
        if step is not None:
            heapq.heappush(heap, (-step[0], name, step[1]))

    chosen = {name: hulls[name][position[name]] for name in shapes}
    # Spend the remainder on single rank steps (points between hull vertices), best value first.
    while True:
        best, best_value = None, -1.0
        for name, index in chosen.items():
            if index + 1 >= len(options[name]) or options[name][index + 1] is None:  # dense is not a single step
                continue
            cost = costs[name][index + 1] - costs[name][index]
            if spent + cost <= budget:
                value = (errors[name][index] - errors[name][index + 1]) / cost
                if value > best_value:
                    best, best_value = name, value
        if best is None:
            break
        spent += costs[best][chosen[best] + 1] - costs[best][chosen[best]]
        chosen[best] += 1
    return {name: options[name][index] for name, index in chosen.items()}


def predicted_error(gains: dict[str, torch.Tensor], ranks: dict[str, int | None]) -> float:
    """Σ over matrices of the discarded gains at the given ranks (dense: 0)."""
    return sum(0.0 if rank is None else gains[name][rank:].double().sum().item() for name, rank in ranks.items())
