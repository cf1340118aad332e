"""WeLore's split of a model's matrices into low-rank components and the rest.

WeLore (Jaiswal et al. 2024, "From GaLore to WeLore") normalizes each matrix's singular values by
its largest, drops those under one global threshold, and picks the threshold so that the whole
model reaches a target reduction. Matrices whose spectrum decays fast lose most of their rank and
are the *low-rank components* (LRCs); flat spectra keep theirs. Pure functions on spectra, so the
allocation code can reuse them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .rank import max_factored_rank, stored_parameters

# Bisection steps on the threshold in [0, 1]: 2⁻⁶⁰ is below float64 resolution.
BISECTION_STEPS = 60


def ranks_at_threshold(spectra: Mapping[str, torch.Tensor], threshold: float) -> dict[str, int]:
    """Per matrix, how many singular values σ_i / σ_1 ≥ ``threshold`` (at least 1)."""
    ranks = {}
    for name, singular in spectra.items():
        largest = singular.max().item() if singular.numel() else 0.0
        kept = int((singular >= threshold * largest).sum().item()) if largest > 0 else 0
        ranks[name] = max(1, kept)
    return ranks


def kept_parameters(shape: tuple[int, int], rank: int) -> int:
    """Parameters of a matrix kept at ``rank``: factored when that is smaller, dense otherwise."""
    return stored_parameters(shape, rank if rank <= max_factored_rank(*shape) else None)


def reduction_at(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> float:
    """Fraction of the matrices' parameters removed when each is stored at its rank."""
    dense = sum(shapes[name][0] * shapes[name][1] for name in ranks)
    kept = sum(kept_parameters(shapes[name], rank) for name, rank in ranks.items())
    return 1.0 - kept / dense


def welore_ranks(spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], reduction: float) -> dict[str, int]:
    """Ranks from one global threshold on normalized singular values that removes ``reduction`` of the parameters.

    The threshold is the smallest (found by bisection) whose ranks reach the reduction, so no
    more is cut than needed. A matrix stays dense (counts in full) when its rank would not save
    parameters.

    Args:
        spectra: singular values of each matrix.
        shapes: (out, in) of each matrix.
        reduction: target fraction of the parameters of these matrices to remove, in [0, 1).

    Example:
        >>> spectra = {"a": torch.tensor([1.0, 0.1, 0.1, 0.1]), "b": torch.ones(4)}
        >>> welore_ranks(spectra, {"a": (4, 4), "b": (4, 4)}, 0.3)
        {'a': 1, 'b': 4}
    """
    assert 0.0 <= reduction < 1.0, f"reduction must be in [0, 1), got {reduction}"
    if reduction == 0.0:
        return ranks_at_threshold(spectra, 0.0)
    low, high = 0.0, 1.0
    if reduction_at(ranks_at_threshold(spectra, high), shapes) < reduction:
        return ranks_at_threshold(spectra, high)  # unreachable: every matrix at its minimum rank
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if reduction_at(ranks_at_threshold(spectra, middle), shapes) >= reduction:
            high = middle
        else:
            low = middle
    return ranks_at_threshold(spectra, high)


def low_rank_components(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> dict[str, bool]:
    """True for the matrices whose rank is cut far enough that storing the factors saves parameters.

    Example:
        >>> low_rank_components({"a": 1, "b": 4}, {"a": (4, 4), "b": (4, 4)})
        {'a': True, 'b': False}
    """
    return {name: kept_parameters(shapes[name], rank) < shapes[name][0] * shapes[name][1] for name, rank in ranks.items()}
