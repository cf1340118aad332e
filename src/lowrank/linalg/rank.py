"""Rank arithmetic: how many parameters a rank costs, which rank a ratio buys."""

from __future__ import annotations

import math


def lowrank_parameters(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of the factors of an (out × in) matrix at ``rank``: rank·(out + in)."""
    return rank * (out_features + in_features)


def max_factored_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose factors are strictly smaller than the dense matrix (0 if none)."""
    return (out_features * in_features - 1) // (out_features + in_features)


def stored_parameters(shape: tuple[int, int], rank: int | None) -> int:
    """Parameters of an (out, in) matrix stored at ``rank``; ``None`` means dense."""
    return shape[0] * shape[1] if rank is None else lowrank_parameters(shape[0], shape[1], rank)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int | None:
    """The rank that removes ``ratio`` of an (out × in) matrix's parameters.

    r = floor((1 − ratio)·m·n / (m + n)), at least 1. Returns ``None`` when the factored form would
    not be strictly smaller than the dense matrix (then the layer stays dense); ratio 0 therefore
    always returns ``None``.

    Example:
        >>> rank_for_ratio(256, 256, 0.5)
        64
        >>> rank_for_ratio(256, 256, 0.0) is None
        True
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    dense = out_features * in_features
    rank = max(1, math.floor((1.0 - ratio) * dense / (out_features + in_features)))
    if ratio == 0.0 or lowrank_parameters(out_features, in_features, rank) >= dense:
        return None
    return rank
