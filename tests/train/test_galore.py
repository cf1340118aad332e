"""GradientProjectionAdamW: AdamW at full rank, low-rank state otherwise, exact resume."""

from __future__ import annotations

import io

import numpy as np

import pytest
import torch
from torch import nn

from lowrank.train import GradientProjectionAdamW, projected_parameter_groups

PROJECTION_TYPES = ["svd", "randomized_svd", "dct"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # A tall and a wide matrix (both projection sides), biases, and an embedding.
    return nn.Sequential(nn.Embedding(20, 12), nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 8))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 20, (16,), generator=generator)
        target = torch.randn(16, 8, generator=generator)
        loss = (model(tokens) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _projected_optimizer(model: nn.Module, rank: int, scale: float, proj_type: str) -> GradientProjectionAdamW:
    matrices = [parameter for parameter in model.parameters() if parameter.ndim == 2]
    others = [parameter for parameter in model.parameters() if parameter.ndim != 2]
    groups = [{"params": matrices, "rank": rank, "scale": scale, "proj_type": proj_type, "update_proj_gap": 1}, {"params": others}]
    return GradientProjectionAdamW(groups, lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("proj_type", PROJECTION_TYPES)
def test_full_rank_with_scale_one_equals_adamw(proj_type):
    reference, projected, scaled = _model(), _model(), _model()
    _train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1), steps=5)
    _train(projected, _projected_optimizer(projected, rank=24, scale=1.0, proj_type=proj_type), steps=5)
    _train(scaled, _projected_optimizer(scaled, rank=24, scale=0.5, proj_type=proj_type), steps=5)
    for expected, actual in zip(reference.parameters(), projected.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(scaled[1].weight, reference[1].weight)  # the scale does act at full rank


@pytest.mark.parametrize("proj_type", PROJECTION_TYPES)
def test_low_rank_state_and_updates_inside_the_subspace(proj_type):
    model = _model()
    optimizer = GradientProjectionAdamW(projected_parameter_groups(model, rank=3, scale=1.0, proj_type=proj_type), lr=1e-2)
    wide = model[3].weight  # (8, 24): projected on the left
    tall = model[1].weight  # (24, 12): projected on the right
    before = wide.detach().clone()
    _train(model, optimizer, steps=1)
    assert optimizer.state[wide]["exp_avg"].shape == (3, 24)
    assert optimizer.state[tall]["exp_avg"].shape == (24, 3)
    assert optimizer.state[model[1].bias]["exp_avg"].shape == (24,)  # vectors: plain AdamW
    if proj_type == "dct":
        assert set(optimizer.state[wide]) == {"step", "exp_avg", "exp_avg_sq", "columns"}  # no stored basis
        assert optimizer.state[wide]["columns"].dtype == torch.int64
        basis = optimizer._basis(optimizer.state[wide], optimizer.param_groups[0], wide, "left")
    else:
        basis = optimizer.state[wide]["basis"]
        assert basis.shape == (8, 3)
    update = wide.detach() - before
    # The whole update lies in span(basis): removing that component leaves nothing.
    torch.testing.assert_close(update - basis @ (basis.T @ update), torch.zeros_like(update), atol=1e-7, rtol=0)
    assert update.abs().max() > 1e-4


def test_sign_residual_moves_directions_outside_the_subspace():
    model = _model()
    optimizer = GradientProjectionAdamW(projected_parameter_groups(model, rank=3, scale=1.0, residual="sign"), lr=1e-2)
    wide = model[3].weight
    before = wide.detach().clone()
    _train(model, optimizer, steps=1)
    basis = optimizer.state[wide]["basis"]
    update = wide.detach() - before
    assert (update - basis @ (basis.T @ update)).abs().max() > 1e-3


@pytest.mark.parametrize("proj_type", PROJECTION_TYPES)
def test_state_dict_loads_with_weights_only_and_resumes_bit_identically(proj_type):
    def make(model):
        return GradientProjectionAdamW(projected_parameter_groups(model, rank=3, update_proj_gap=2, proj_type=proj_type), lr=1e-2)

    straight = _model()
    optimizer = make(straight)
    _train(straight, optimizer, steps=6)

    first_half = _model()
    optimizer = make(first_half)
    _train(first_half, optimizer, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": first_half.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    optimizer = make(resumed)
    optimizer.load_state_dict(saved["optimizer"])
    _train(resumed, optimizer, steps=3, first_step=3)
    for expected, actual in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize(
    "options, message",
    [({"proj_type": "pca"}, "proj_type"), ({"residual": "adam"}, "residual"), ({"rank": 0}, "rank"), ({"update_proj_gap": 0}, "update_proj_gap")],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GradientProjectionAdamW(projected_parameter_groups(_model(), **{"rank": 3, **options}))


def _reference_galore(weight, gradients, rank, lr, betas, eps, weight_decay, scale, update_proj_gap):
    """GaLore written out from its definition, with numpy's SVD: every ``update_proj_gap`` steps the
    top-``rank`` singular vectors of the gradient on its smaller side; AdamW moments of the projected
    gradient; the normalized update projected back, times ``scale``; decoupled weight decay first."""
    weight, (beta1, beta2) = weight.numpy().copy(), betas
    right = weight.shape[0] >= weight.shape[1]
    first = second = None
    trajectory = []
    for step, gradient in enumerate(gradients, start=1):
        gradient = gradient.numpy()
        if (step - 1) % update_proj_gap == 0:
            u, _, vt = np.linalg.svd(gradient, full_matrices=False)
            basis = vt[:rank].T if right else u[:, :rank]
        projected = gradient @ basis if right else basis.T @ gradient
        if first is None:
            first, second = np.zeros_like(projected), np.zeros_like(projected)
        first = beta1 * first + (1 - beta1) * projected
        second = beta2 * second + (1 - beta2) * projected**2
        normalized = (first / (1 - beta1**step)) / (np.sqrt(second / (1 - beta2**step)) + eps)
        update = normalized @ basis.T if right else basis @ normalized
        weight = weight * (1 - lr * weight_decay) - lr * scale * update
        trajectory.append(weight)
    return trajectory


# (betas, update_proj_gap, steps): two steps in one basis; and, with β1 = 0 (so that the signs numpy
# and torch give singular vectors cannot matter), three steps refreshing the basis every step.
GALORE_SCHEDULES = [((0.9, 0.999), 10, 2), ((0.0, 0.999), 1, 3)]


@pytest.mark.parametrize("shape", [(10, 6), (4, 9)], ids=["tall", "wide"])
@pytest.mark.parametrize("betas, update_proj_gap, steps", GALORE_SCHEDULES)
def test_galore_steps_equal_a_hand_written_reference(shape, betas, update_proj_gap, steps):
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=generator, dtype=torch.float64)
    gradients = [torch.randn(shape, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, shape[1], dtype=torch.float64) for _ in range(steps)]
    options = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1)
    parameter = nn.Parameter(start.clone())
    optimizer = GradientProjectionAdamW(
        [{"params": [parameter], "rank": 2, "scale": 0.25, "update_proj_gap": update_proj_gap, "proj_type": "svd"}], **options
    )
    expected = _reference_galore(start, gradients, rank=2, scale=0.25, update_proj_gap=update_proj_gap, **options)
    for gradient, reference in zip(gradients, expected):
        parameter.grad = gradient.clone()
        optimizer.step()
        np.testing.assert_allclose(parameter.detach().numpy(), reference, rtol=1e-10, atol=1e-12)
    assert not np.allclose(expected[-1], start.numpy() * (1 - 1e-2 * 0.1) ** steps, atol=1e-4)  # the steps did move it


@pytest.mark.parametrize("shape", [(10, 6), (4, 9)], ids=["tall", "wide"])
def test_galore_steps_equal_galore_torch(shape):
    # The authors' package (pip install galore-torch) is a second reference; it is not a dependency.
    galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is not installed (optional second reference)")
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=generator)
    gradients = [torch.randn(shape, generator=generator) for _ in range(2)]
    # Weight decay 0: galore-torch decays after the update, torch's AdamW (and ours) before it.
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    group = {"rank": 2, "scale": 0.25, "update_proj_gap": 10}
    optimizer = GradientProjectionAdamW([{"params": [ours], **group, "proj_type": "svd"}], lr=1e-2, eps=1e-8)
    reference = galore_torch.GaLoreAdamW(
        [{"params": [theirs], **group, "proj_type": "std", "proj_quant": False}], lr=1e-2, eps=1e-8, no_deprecation_warning=True
    )
    for gradient in gradients:
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        optimizer.step()
        reference.step()
        # The displacements, not the weights, so that a wrong update size cannot hide under float32 round-off.
        torch.testing.assert_close(ours - start, theirs - start, rtol=1e-4, atol=1e-6)
