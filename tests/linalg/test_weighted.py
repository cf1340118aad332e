import pytest
import torch

from lowrank.linalg import whitening
from lowrank.linalg.weighted import row_weights, weighted_energy


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_weighted_energy_is_the_squared_singular_values(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    x = torch.randn(300, shape[1], generator=generator, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    weights = row_weights(torch.rand(shape[0], generator=generator, dtype=torch.float64) ** 4)
    white = whitening(x.T @ x)
    for kwargs, scaled in [({}, weight), ({"output_weights": weights, "white": white}, weights[:, None] * weight @ white.root)]:
        energy = weighted_energy(weight, **kwargs)
        reference = torch.linalg.svdvals(scaled).pow(2)  # the independent route: an SVD
        assert energy.shape == reference.shape and bool((energy[:-1] >= energy[1:]).all()) and bool((energy >= 0).all())
        # Gram eigenvalues: absolute error about ε·σ₁², whatever the size of σ_i.
        torch.testing.assert_close(energy, reference, rtol=0, atol=1e-12 * reference[0].item())


def test_weighted_energy_of_a_rank_deficient_matrix_is_never_negative():
    weight = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 20, dtype=torch.float64)
    energy = weighted_energy(weight)
    assert bool((energy >= 0).all()) and energy[2:].max() < 1e-12 * energy[0]
