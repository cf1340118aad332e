"""SLTrain layers: documented size, gradients only to the trainable parts, LOST start, model conversion."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from lowrank.linalg import truncated_svd
from lowrank.nn import STRUCTURES
from lowrank.train import LowRankSparseConfig, LowRankSparseLinear, to_low_rank_sparse_


@pytest.mark.parametrize("in_features, out_features, rank, density, bias", [(64, 32, 8, 0.05, True), (48, 96, 4, 0.1, False), (16, 16, 16, 0.0, True)])
def test_parameter_count_is_as_documented(in_features, out_features, rank, density, bias):
    layer = LowRankSparseLinear.random(in_features, out_features, rank, density, bias=bias)
    expected = rank * (in_features + out_features) + round(density * in_features * out_features) + (out_features if bias else 0)
    assert sum(parameter.numel() for parameter in layer.parameters()) == expected
    assert layer.sparse_indices.unique().numel() == layer.num_nonzero  # distinct positions


def test_gradients_reach_only_the_trainable_values():
    layer = LowRankSparseLinear.random(20, 10, rank=3, density=0.2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 20)
    weight = layer.to_dense().detach().requires_grad_()
    (torch.nn.functional.linear(x, weight, layer.bias) ** 2).sum().backward()
    layer(x).square().sum().backward()

    assert not layer.sparse_indices.requires_grad and layer.sparse_indices.grad is None
    assert set(name for name, p in layer.named_parameters()) == {"up", "down", "sparse_values", "bias"}
    # The values get exactly the dense gradient at their positions, and only there.
    torch.testing.assert_close(layer.sparse_values.grad, weight.grad.reshape(-1)[layer.sparse_indices])
    torch.testing.assert_close(layer.up.grad, weight.grad @ layer.down.detach().T)
    torch.testing.assert_close(layer.down.grad, layer.up.detach().T @ weight.grad)


def test_sparse_part_stays_on_its_support_after_training():
    layer = LowRankSparseLinear.random(20, 10, rank=3, density=0.2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(torch.randn(4, 20)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    sparse = layer.to_dense() - layer.up @ layer.down
    outside = torch.ones(200, dtype=torch.bool)
    outside[layer.sparse_indices] = False
    assert sparse.reshape(-1)[outside].abs().max() < 1e-6


def test_random_init_keeps_the_requested_weight_scale():
    layer = LowRankSparseLinear.random(256, 256, rank=64, density=0.0, std=0.02, generator=torch.Generator().manual_seed(0))
    assert layer.to_dense().std().item() == pytest.approx(0.02, rel=0.1)


def test_lost_start_is_exact_at_full_rank_and_beats_svd_below():
    dense = nn.Linear(32, 24)
    exact = LowRankSparseLinear.from_linear(dense, rank=24, density=0.0)
    torch.testing.assert_close(exact.to_dense(), dense.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact(torch.ones(2, 32)), dense(torch.ones(2, 32)), atol=1e-5, rtol=0)

    layer = LowRankSparseLinear.from_linear(dense, rank=4, density=0.25)
    assert layer.num_nonzero == 24 * 8  # whole input channels
    svd = truncated_svd(dense.weight.detach(), 4)
    svd_error = (svd.up @ svd.down - dense.weight).norm()
    lost_error = (layer.to_dense() - dense.weight).norm()
    assert lost_error < 0.95 * svd_error
    channels = layer.sparse_indices.view(24, 8) % 32
    assert (channels == channels[0]).all()  # the same columns in every row


@pytest.mark.parametrize("init", ["random", "lost"])
def test_conversion_replaces_block_linears_and_state_round_trips(init):
    model = tiny_model("llama")
    names = to_low_rank_sparse_(model, LowRankSparseConfig(rank=0.25, density=0.05, init=init))
    assert len(names) == 2 * 7 and all(".layers." in name for name in names)
    layer = model.get_submodule(names[0])
    assert isinstance(layer, LowRankSparseLinear) and layer.rank == 8
    tokens = torch.randint(0, 128, (2, 12))
    logits = model(tokens).logits
    assert torch.isfinite(logits).all()

    # Rebuilt from the structure registry and its spec, as `lowrank.load` does.
    structure = STRUCTURES["LowRankSparseLinear"]
    rebuilt = structure.empty(layer.in_features, layer.out_features, layer.bias is not None, layer.spec())
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt.to_dense(), layer.to_dense())


def test_bad_configs_are_refused():
    from lowrank.errors import LowrankError

    with pytest.raises(LowrankError, match="init"):
        to_low_rank_sparse_(tiny_model("llama"), LowRankSparseConfig(init="dense"))
    with pytest.raises(LowrankError, match="density"):
        to_low_rank_sparse_(tiny_model("llama"), LowRankSparseConfig(density=1.5))


def test_merging_gives_dense_linears_with_the_same_outputs():
    from lowrank.train import merge_low_rank_sparse_

    model = tiny_model("llama")
    names = to_low_rank_sparse_(model, LowRankSparseConfig(rank=4, density=0.1))
    tokens = torch.randint(0, 128, (2, 12))
    before = model(tokens).logits
    assert merge_low_rank_sparse_(model) == names
    assert all(type(model.get_submodule(name)) is nn.Linear for name in names)
    torch.testing.assert_close(model(tokens).logits, before, atol=1e-5, rtol=1e-5)
