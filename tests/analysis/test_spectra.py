import math

import pytest
import torch

from analysis_helpers import with_singular_values
from lowrank.analysis import effective_rank, energy_rank, singular_values, spectrum_metrics, stable_rank


def test_diagonal_matrix_has_its_diagonal_as_spectrum():
    weight = torch.diag(torch.tensor([1.0, 4.0, 2.0, 0.0]))
    metrics = spectrum_metrics(singular_values(weight))
    assert singular_values(weight).tolist() == [4.0, 2.0, 1.0, 0.0]
    assert metrics["spectral_norm"] == 4.0
    assert metrics["nuclear_norm"] == 7.0
    assert metrics["frobenius_norm"] == pytest.approx(math.sqrt(21))
    assert metrics["stable_rank"] == pytest.approx(21 / 16)
    p = torch.tensor([4.0, 2.0, 1.0]) / 7
    assert metrics["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert metrics["rank_90"] == 2 and metrics["rank_99"] == 3  # 20/21 = 0.952 ≥ 0.9


def test_flat_spectrum_has_full_ranks():
    singular = torch.ones(16)
    assert stable_rank(singular) == pytest.approx(16)
    assert effective_rank(singular) == pytest.approx(16)
    assert energy_rank(singular, 0.9) == 15 and energy_rank(singular, 1.0) == 16


def test_low_rank_plus_noise_shows_the_planted_rank():
    generator = torch.Generator().manual_seed(0)
    planted = torch.randn(300, 8, generator=generator, dtype=torch.float64) @ torch.randn(8, 200, generator=generator, dtype=torch.float64)
    noise = 1e-3 * torch.randn(300, 200, generator=generator, dtype=torch.float64)
    metrics = spectrum_metrics(singular_values(planted + noise))
    assert metrics["rank_99"] <= 8
    assert 1 < metrics["stable_rank"] <= 8
    assert 1 < metrics["effective_rank"] < 9


def test_spectrum_is_computed_in_float64_for_low_precision_weights():
    singular = torch.linspace(3, 1, 32)
    weight = with_singular_values(singular, 64, 32).to(torch.bfloat16)
    values = singular_values(weight)
    assert values.dtype == torch.float64
    assert torch.allclose(values, singular.double(), atol=0.05)


def test_zero_matrix_has_zero_ranks():
    metrics = spectrum_metrics(singular_values(torch.zeros(5, 3)))
    assert metrics["stable_rank"] == 0 and metrics["effective_rank"] == 0 and metrics["rank_90"] == 0
