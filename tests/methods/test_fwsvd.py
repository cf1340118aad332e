"""FWSVD is the rank-r minimizer of the Fisher-weighted error ‖diag(√I)(W − W′)‖_F (checked with numpy)."""

import numpy as np
import pytest
import torch

from lowrank.calibration import LayerStatistics
from lowrank.methods.fwsvd import FWSVDConfig, factorize


def _problem(out_features=9, in_features=6, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_features, in_features))
    importance = rng.random(out_features) ** 4  # row importances spanning orders of magnitude
    return weight, importance


def _fwsvd(weight: np.ndarray, importance: np.ndarray, rank: int) -> np.ndarray:
    stats = LayerStatistics.zeros(weight.shape[1])
    stats.weight_grad_sq = torch.from_numpy(importance)
    return factorize(torch.from_numpy(weight), stats, rank, FWSVDConfig(damp=0.0)).dense().numpy()


@pytest.mark.parametrize("rank", [1, 3])
def test_fwsvd_minimizes_the_fisher_weighted_error(rank):
    weight, importance = _problem()
    root = np.sqrt(importance)

    def weighted_error(candidate):
        return float(np.sum((root[:, None] * (weight - candidate)) ** 2))

    # Closed form: the best rank-r approximation of diag(√I)·W (Eckart–Young), scaled back by diag(1/√I).
    u, s, vt = np.linalg.svd(root[:, None] * weight, full_matrices=False)
    expected = (u[:, :rank] * s[:rank] @ vt[:rank]) / root[:, None]
    mine = _fwsvd(weight, importance, rank)
    np.testing.assert_allclose(mine, expected, rtol=1e-9, atol=1e-9)
    optimum = float(np.sum(s[rank:] ** 2))
    assert weighted_error(mine) == pytest.approx(optimum, rel=1e-9)
    rng = np.random.default_rng(1)
    for _ in range(200):  # no random rank-r matrix, nor a small perturbation of the optimum, does better
        assert weighted_error(rng.standard_normal((9, rank)) @ rng.standard_normal((rank, 6))) >= optimum
        nudged = (u[:, :rank] + 1e-3 * rng.standard_normal((9, rank))) * s[:rank] @ vt[:rank] / root[:, None]
        assert weighted_error(nudged) >= optimum
    plain_u, plain_s, plain_vt = np.linalg.svd(weight, full_matrices=False)  # the unweighted SVD is worse here
    assert weighted_error(plain_u[:, :rank] * plain_s[:rank] @ plain_vt[:rank]) > optimum * 1.01
