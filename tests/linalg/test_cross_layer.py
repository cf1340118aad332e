"""The anchored cross-layer objective, checked against an independent formula on small matrices.

Tokens are rows here: X (tokens × in) are a layer's dense inputs, X̃ the compressed model's. The
anchored objective J(W′) = (1 − α)‖X Wᵀ − X̃ W′ᵀ‖² + α‖X Wᵀ − X W′ᵀ‖² is, token for token, plain
reduced-rank regression on the stacked data [√(1−α) X̃; √α X] → [√(1−α) X Wᵀ; √α X Wᵀ], which the
reference solves with numpy (least squares, then Eckart–Young), never touching lowrank's whitening.
"""

from itertools import pairwise

import numpy as np
import pytest
import torch

from lowrank import LowrankError
from lowrank.calibration.paired import PairedStatistics
from lowrank.linalg import whitened_svd, whitening
from lowrank.linalg.cross_layer import anchored_error, anchored_subset_refit, anchored_target, weighted_shifted_error
from lowrank.linalg.nystrom import nystrom_refit
from lowrank.linalg.refit import refit_target
from references import reduced_rank_optimum
from threads import one_thread  # noqa: F401  (autouse: one torch thread)


def _problem(tokens=80, in_features=7, out_features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, in_features, dtype=torch.float64)
    shifted = x + 0.3 * torch.randn(tokens, in_features, generator=generator, dtype=torch.float64)  # earlier layers compressed
    return weight, x, shifted


def _anchored_fit(weight, x, shifted, anchor, rank):
    fit = anchored_target(weight, x.T @ x, x.T @ shifted, shifted.T @ shifted, anchor)
    return whitened_svd(fit.target, fit.gram, rank).dense()


def _stacked(weight, x, shifted, anchor):
    """The objective as one least-squares problem over twice the tokens (numpy, float64)."""
    inputs = np.vstack([np.sqrt(1 - anchor) * shifted.numpy(), np.sqrt(anchor) * x.numpy()])
    outputs = np.vstack([np.sqrt(1 - anchor) * (x @ weight.T).numpy(), np.sqrt(anchor) * (x @ weight.T).numpy()])
    return inputs, outputs


@pytest.mark.parametrize("anchor", [0.0, 0.3, 0.8])
def test_full_rank_target_is_the_stacked_least_squares_solution(anchor):
    weight, x, shifted = _problem()
    inputs, outputs = _stacked(weight, x, shifted, anchor)
    expected = np.linalg.lstsq(inputs, outputs, rcond=None)[0].T
    fit = anchored_target(weight, x.T @ x, x.T @ shifted, shifted.T @ shifted, anchor)
    np.testing.assert_allclose(fit.target.numpy(), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.gram.numpy(), inputs.T @ inputs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("anchor", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("rank", [1, 3])
def test_anchored_fit_is_the_rank_r_minimizer_of_the_anchored_objective(anchor, rank):
    weight, x, shifted = _problem()
    fit = _anchored_fit(weight, x, shifted, anchor, rank)
    inputs, outputs = _stacked(weight, x, shifted, anchor)
    optimum = reduced_rank_optimum(outputs, inputs, rank)

    def objective(candidate):  # straight from the tokens, not from second moments
        return (1 - anchor) * (x @ weight.T - shifted @ candidate.T).pow(2).sum().item() + anchor * (x @ (weight - candidate).T).pow(2).sum().item()

    assert objective(fit) == pytest.approx(optimum, rel=1e-9)
    assert anchored_error(weight, fit, x.T @ x, x.T @ shifted, shifted.T @ shifted, anchor) == pytest.approx(optimum, rel=1e-9)
    # No rank-r candidate does better: random ones and small perturbations of the fit.
    generator = torch.Generator().manual_seed(1)
    u, s, vh = torch.linalg.svd(fit)
    for _ in range(100):
        up, down = torch.randn(5, rank, generator=generator, dtype=torch.float64), torch.randn(rank, 7, generator=generator, dtype=torch.float64)
        assert objective(up @ down) >= optimum
        nudged = (u[:, :rank] + 1e-3 * torch.randn(5, rank, generator=generator, dtype=torch.float64)) * s[:rank] @ vh[:rank]
        assert objective(nudged) >= optimum


def test_anchor_ends_are_the_refit_and_the_dense_input_fit():
    weight, x, shifted = _problem()
    a, b, s = x.T @ x, x.T @ shifted, shifted.T @ shifted
    # α = 0: the plain refit, bit for bit (the default sequential path is unchanged by the anchor).
    assert torch.equal(anchored_target(weight, a, b, s, 0.0).target, refit_target(weight, b, whitening(s, symmetric=False)))
    # α = 1: nothing to correct; the rank-r fit is the ordinary whitened SVD of W on dense inputs.
    ends = anchored_target(weight, a, b, s, 1.0)
    torch.testing.assert_close(ends.target, weight, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(whitened_svd(ends.target, ends.gram, 2).dense(), whitened_svd(weight, a, 2).dense(), rtol=1e-8, atol=1e-9)


def test_anchoring_trades_calibration_fit_for_closeness_to_the_dense_fit():
    # Monotone in α: the shifted-input error grows, the dense-input error shrinks (both strictly).
    weight, x, shifted = _problem()
    shifted_errors, dense_errors = [], []
    for anchor in (0.0, 0.25, 0.5, 0.75, 1.0):
        fit = _anchored_fit(weight, x, shifted, anchor, rank=3)
        shifted_errors.append((x @ weight.T - shifted @ fit.T).pow(2).sum().item())
        dense_errors.append((x @ (weight - fit).T).pow(2).sum().item())
    assert all(later > earlier for earlier, later in pairwise(shifted_errors))
    assert all(later < earlier for earlier, later in pairwise(dense_errors))


def test_weighted_shifted_error_equals_the_weighted_error_on_the_tokens():
    weight, x, shifted = _problem()
    approximation = weight + 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.linspace(0.1, 2.0, weight.shape[0], dtype=torch.float64)
    pair = PairedStatistics(shifted.T @ shifted, x.T @ shifted, x.T @ x, shifted.abs().sum(0), x.shape[0])
    direct = ((x @ weight.T - shifted @ approximation.T).pow(2) * weights).sum().item()
    assert weighted_shifted_error(weight, approximation, pair, weights) == pytest.approx(direct, rel=1e-9)
    assert weighted_shifted_error(weight, approximation, pair) == pytest.approx((x @ weight.T - shifted @ approximation.T).pow(2).sum().item(), rel=1e-9)


@pytest.mark.parametrize("anchor", [-0.1, 1.5, float("nan")])
def test_anchor_outside_the_unit_interval_is_refused(anchor):
    weight, x, shifted = _problem()
    with pytest.raises(LowrankError, match=r"anchor must lie in \[0, 1\]"):
        anchored_target(weight, x.T @ x, x.T @ shifted, shifted.T @ shifted, anchor)


@pytest.mark.parametrize("anchor", [0.0, 0.4, 1.0])
def test_subset_refit_is_the_stacked_least_squares_solution_on_the_kept_inputs(anchor):
    # The compressed model feeds the layer only the kept inputs S (computed from shifted inputs), the
    # dense one all n; the reference stacks the two streams, each asked for the dense output.
    weight, x, shifted = _problem(in_features=7)
    kept = torch.tensor([5, 0, 3])
    small = shifted[:, kept]
    inputs = np.vstack([np.sqrt(1 - anchor) * small.numpy(), np.sqrt(anchor) * x[:, kept].numpy()])
    outputs = np.vstack([np.sqrt(1 - anchor) * (x @ weight.T).numpy(), np.sqrt(anchor) * (x @ weight.T).numpy()])
    expected = np.linalg.lstsq(inputs, outputs, rcond=None)[0].T
    refit = anchored_subset_refit(weight, x.T @ x, x.T @ small, small.T @ small, kept, anchor)
    np.testing.assert_allclose(refit.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_subset_refit_of_unshifted_inputs_is_the_nystrom_refit():
    weight, x, _ = _problem()
    kept = torch.tensor([1, 2, 6])
    refit = anchored_subset_refit(weight, x.T @ x, (x.T @ x)[:, kept], (x.T @ x)[kept][:, kept], kept, anchor=0.3)
    torch.testing.assert_close(refit, nystrom_refit(weight, x.T @ x, kept), rtol=1e-9, atol=1e-12)
