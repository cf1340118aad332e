"""Matrices with known spectra, built from seeded random orthogonal bases."""

from __future__ import annotations

import numpy as np
import torch


def orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows × columns) matrix with orthonormal columns (rows ≥ columns)."""
    q, _ = torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))
    return q


def with_singular_values(singular: torch.Tensor, rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """A (rows × columns) matrix whose singular values are ``singular`` (length min(rows, columns))."""
    generator = torch.Generator().manual_seed(seed)
    count = singular.numel()
    return (orthonormal(rows, count, generator) * singular.double()) @ orthonormal(columns, count, generator).T


def planted_power_law(alpha: float, rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """A matrix whose eigenvalues σ² are a Pareto(α) sample: p(λ) ∝ λ^(−α) for λ ≥ 1."""
    uniform = np.random.default_rng(seed).random(min(rows, columns))
    eigenvalues = torch.from_numpy((1.0 - uniform) ** (-1.0 / (alpha - 1.0)))
    return with_singular_values(eigenvalues.sqrt().sort(descending=True).values, rows, columns, seed)
