import math

import pytest
import torch

from analysis_helpers import planted_power_law
from lowrank.analysis import fit_power_law, submatrix_eigenvalues


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0])
def test_planted_power_law_is_recovered(alpha, seed):
    # 600 eigenvalues: the estimator's own sampling error (α − 1)/√n is about 0.08 at α = 3.
    weight = planted_power_law(alpha, 800, 600, seed=seed)
    fit = fit_power_law(torch.linalg.svdvals(weight).square())
    assert fit.alpha == pytest.approx(alpha, abs=0.15)
    assert 0 < fit.ks_distance < 0.1 and fit.num_tail > 100


@pytest.mark.parametrize("shape", [(256, 256), (768, 256)])
def test_gaussian_matrix_has_a_large_alpha(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = fit_power_law(torch.linalg.svdvals(weight).square())
    assert fit.alpha > 6  # no heavy tail: far above the 2–6 of trained layers


def test_fit_matches_the_closed_form_when_the_cutoff_is_the_minimum():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 100.0])
    fit = fit_power_law(values)
    tail = values[values >= fit.xmin]
    expected = 1 + tail.numel() / (tail / fit.xmin).log().sum().item()
    assert fit.alpha == pytest.approx(expected)


def test_too_few_eigenvalues_give_nan():
    assert math.isnan(fit_power_law(torch.tensor([1.0, 0.0])).alpha)


def test_square_matrix_is_its_own_submatrix():
    weight = torch.randn(32, 32, dtype=torch.float64)
    assert torch.allclose(submatrix_eigenvalues(weight), torch.linalg.svdvals(weight).square())


def test_submatrix_spectra_are_averaged_over_equal_blocks():
    block = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    weight = torch.cat([block, 2 * block, 3 * block], dim=1)  # (2, 6): three 2×2 blocks
    expected = (torch.tensor([9.0, 1.0]) * (1 + 4 + 9) / 3).double()
    assert torch.allclose(submatrix_eigenvalues(weight), expected)
    assert torch.allclose(submatrix_eigenvalues(weight.T), expected)
    assert submatrix_eigenvalues(weight, aspect_ratio=3.0).numel() == 2  # one 2×6 block
