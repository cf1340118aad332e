import pytest
import torch

from lowrank.linalg.welore import low_rank_components, reduction_at, welore_ranks


def spectra_and_shapes():
    decaying = 0.5 ** torch.arange(64, dtype=torch.float64)
    flat = torch.linspace(1.0, 0.9, 64, dtype=torch.float64)
    spectra = {"decaying": decaying, "flat": flat, "medium": torch.linspace(1.0, 0.01, 64, dtype=torch.float64)}
    return spectra, {name: (64, 64) for name in spectra}


@pytest.mark.parametrize("reduction", [0.1, 0.3, 0.5])
def test_reduction_is_reached_with_one_global_threshold(reduction):
    spectra, shapes = spectra_and_shapes()
    ranks = welore_ranks(spectra, shapes, reduction)
    assert reduction_at(ranks, shapes) >= reduction
    assert ranks["decaying"] <= ranks["medium"] <= ranks["flat"]
    # Minimal: keeping one more singular value in any factored matrix would miss the target.
    for name, rank in ranks.items():
        if rank < 32:
            assert reduction_at({**ranks, name: rank + 1}, shapes) < reduction + 64 * 128 / (3 * 64 * 64) + 1e-9


def test_fast_decaying_matrices_are_the_low_rank_components():
    spectra, shapes = spectra_and_shapes()
    low_rank = low_rank_components(welore_ranks(spectra, shapes, 0.3), shapes)
    assert low_rank == {"decaying": True, "flat": False, "medium": False}


def test_zero_reduction_keeps_every_rank():
    spectra, shapes = spectra_and_shapes()
    assert welore_ranks(spectra, shapes, 0.0) == {name: 64 for name in spectra}
