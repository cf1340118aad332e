"""Containers for the factors a factorizer returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankFactors:
    """W ≈ up @ down, with ``up`` of shape (out, rank) and ``down`` of shape (rank, in).

    The issue texts and papers call these A (= ``up``) and B (= ``down``).
    """

    up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        assert self.up.ndim == 2 and self.down.ndim == 2, "factors must be matrices"
        assert self.up.shape[1] == self.down.shape[0], f"inner dimensions differ: {self.up.shape} @ {self.down.shape}"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def num_parameters(self) -> int:
        return self.up.numel() + self.down.numel()

    def dense(self) -> torch.Tensor:
        """The product ``up @ down``, shape (out, in)."""
        return self.up @ self.down
