"""The pure math of the initializations: full-rank reconstruction, which triplets each one takes."""

from __future__ import annotations

import pytest
import torch

from lowrank.adapt import covariance_factors, minor_factors, principal_factors, randomized_svd
from lowrank.adapt.decompose import balance


def spectrum_matrix(out_features: int = 48, in_features: int = 32, decay: float = 0.85, seed: int = 0) -> torch.Tensor:
    """A matrix with geometrically decaying singular values, like a trained weight."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, in_features, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator, dtype=torch.float64))
    return (u * decay ** torch.arange(in_features, dtype=torch.float64)) @ v.T


def covariance(in_features: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, in_features, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, in_features, dtype=torch.float64)
    return x.T @ x


FULL_RANK = [
    ("principal", lambda w: principal_factors(w, 32)),
    ("principal-randomized", lambda w: principal_factors(w, 32, svd="randomized")),
    ("minor", lambda w: minor_factors(w, 32)),
    ("covariance-instruction", lambda w: covariance_factors(w, covariance(), 32, largest=True)),
    ("covariance-knowledge", lambda w: covariance_factors(w, covariance(), 32, largest=False)),
]


@pytest.mark.parametrize("name,factorize", FULL_RANK, ids=[row[0] for row in FULL_RANK])
def test_full_rank_reconstructs_the_weight(name, factorize):
    weight = spectrum_matrix()
    assert torch.allclose(factorize(weight).dense(), weight, atol=1e-10)


def test_principal_and_minor_take_opposite_ends_of_the_spectrum():
    weight = spectrum_matrix()
    singular_values = torch.linalg.svdvals(weight)
    top = torch.linalg.svdvals(principal_factors(weight, 4).dense())[:4]
    bottom = torch.linalg.svdvals(minor_factors(weight, 4).dense())[:4]
    assert torch.allclose(top, singular_values[:4])
    assert torch.allclose(bottom, singular_values[-4:])


def test_instruction_mode_keeps_more_output_energy_than_knowledge_mode():
    # Top triplets of W·C act hardest on the calibration inputs: removing them from W costs the most output.
    weight, c = spectrum_matrix(), covariance()
    energy = lambda f: torch.einsum("oi,ij,oj->", f.dense(), c, f.dense()).item()  # noqa: E731  ‖BA X‖²
    assert energy(covariance_factors(weight, c, 4, largest=True)) > 10 * energy(covariance_factors(weight, c, 4, largest=False))


def test_balance_keeps_the_product_and_equalizes_norms():
    up, down = torch.randn(10, 3, dtype=torch.float64) * 100, torch.randn(3, 7, dtype=torch.float64)
    balanced = balance(up, down)
    assert torch.allclose(balanced.dense(), up @ down)
    assert torch.allclose(balanced.up.norm(dim=0), balanced.down.norm(dim=1))


@pytest.mark.parametrize("power_iterations,tolerance", [(0, 1.5), (2, 1.01), (4, 1.001)])
def test_randomized_svd_error_approaches_the_exact_one(power_iterations, tolerance):
    weight = spectrum_matrix(200, 120, decay=0.97) + 0.01 * torch.randn(200, 120, dtype=torch.float64)
    exact = principal_factors(weight, 8)
    u, s, vh = randomized_svd(weight, 8, power_iterations=power_iterations, seed=0)
    exact_error = (weight - exact.dense()).norm()
    randomized_error = (weight - (u * s) @ vh).norm()
    assert exact_error <= randomized_error * (1 + 1e-12)
    assert randomized_error <= tolerance * exact_error


def test_randomized_svd_is_seeded():
    weight = spectrum_matrix()
    first, second = randomized_svd(weight, 4, seed=3), randomized_svd(weight, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
