import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank.nn.layout as layout
from lowrank.nn import LowRankLinear, linear_weight


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_matches_linear(bias):
    dense = nn.Linear(24, 16, bias=bias)
    layer = LowRankLinear.from_linear(dense, rank=16)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.to_dense(), dense.weight, atol=1e-5, rtol=1e-5)


def test_conv1d_is_read_transposed():
    conv = Conv1D(16, 24)  # GPT-2 convention: nf=out=16, nx=in=24, weight stored (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    assert linear_weight(conv).shape == (16, 24)
    layer = LowRankLinear.from_linear(conv, rank=16)
    x = torch.randn(2, 24)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)


def test_keeps_dtype_and_reports_rank():
    dense = nn.Linear(32, 32).to(torch.bfloat16)
    layer = LowRankLinear.from_linear(dense, rank=8)
    assert layer.down.weight.dtype == torch.bfloat16 and layer.up.weight.dtype == torch.bfloat16
    assert "rank=8" in repr(layer)
    assert sum(p.numel() for p in layer.parameters()) == 8 * (32 + 32) + 32
    assert layer.spec() == {"rank": 8}


def test_tall_up_factor_is_laid_out_column_major_at_the_first_call_with_the_same_outputs():
    torch.manual_seed(0)
    layer = LowRankLinear(24, 40, rank=6)
    x = torch.randn(3, 24)
    expected = x @ layer.down.weight.T @ layer.up.weight.T + layer.up.bias
    parameter = layer.up.weight
    assert parameter.is_contiguous()
    torch.testing.assert_close(layer(x), expected)
    assert layer.up.weight is parameter and parameter.stride() == (1, 40)  # same parameter, re-laid out
    assert layer.state_dict()["up.weight"].shape == (40, 6)
    # Still trainable: gradients reach both factors through the re-laid-out weight.
    layer(x).sum().backward()
    assert layer.up.weight.grad is not None and layer.down.weight.grad is not None


def test_bfloat16_factors_run_packed_without_gradients_and_plain_with_them(monkeypatch):
    monkeypatch.setattr(layout, "PACKED_MIN_MULTIPLY_ADDS", 0)  # this layer is smaller than what packs
    torch.manual_seed(0)
    layer = LowRankLinear(24, 40, rank=6).to(torch.bfloat16)
    x = torch.randn(3, 24).bfloat16()
    expected = layer.up(layer.down(x))  # the plain modules
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach())
        torch.testing.assert_close(layer(x[:1]), expected[:1].detach())
    packed = [m.__dict__.get("_packed_weight") for m in (layer.down, layer.up)]
    if layout.ONEDNN_PACKING:
        assert all(cache is not None and cache.builds == 1 for cache in packed)
    assert layer.up.weight.is_contiguous() and list(layer.state_dict()) == ["down.weight", "up.weight", "up.bias"]
    layer(x).float().sum().backward()  # gradients: the plain modules, no rebuild
    assert layer.up.weight.grad is not None and all(cache is None or cache.builds == 1 for cache in packed)
