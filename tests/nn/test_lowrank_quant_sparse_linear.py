"""LowRankQuantSparseLinear (up·down + Q + S): it applies the weight its factors stand for, computed here by hand;
it runs Q and S from run-time forms built once (int4 tiles, int32 CSR), rebuilt only when the stored tensors
change, invisible to the state dict and the storage count; its spec rebuilds it; a dtype cast keeps Q's scales."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from threads import one_thread  # noqa: F401  (autouse: one torch thread)

import lowrank.nn.lowrank_quant_linear as quant_module
from lowrank.compress import cast_
from lowrank.linalg.quantize import quantize_groups
from lowrank.nn import STRUCTURES
from lowrank.nn.lowrank_quant_linear import LowRankQuantSparseFactors, LowRankQuantSparseLinear
from lowrank.nn.lowrank_sparse_linear import SparseRows


def make(out_features=37, in_features=96, bits=3, group_size=32, count=50, dtype=torch.float32, seed=0, bias=True):
    """A layer and the dense weight its factors stand for, (out, in) float64, built by hand."""
    g = torch.Generator().manual_seed(seed)
    residual = quantize_groups(torch.randn(out_features, in_features, generator=g), bits, group_size)
    flat = torch.randperm(out_features * in_features, generator=g)[:count]
    rows, cols = flat // in_features, flat % in_features
    rows[rows == 5] = 6  # row 5 has no outlier (its row pointers repeat)
    keep = torch.unique(rows * in_features + cols)
    rows, cols = keep // in_features, keep % in_features
    values = torch.randn(rows.numel(), generator=g, dtype=torch.float64) * 5
    up, down = torch.randn(out_features, 3, generator=g, dtype=torch.float64), torch.randn(3, in_features, generator=g, dtype=torch.float64)
    groups = torch.arange(in_features) // group_size
    dense = up @ down + (residual.codes.double() - residual.zeros.double()[:, groups]) * residual.scales.double()[:, groups]
    dense[rows, cols] += values
    bias_values = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    layer = LowRankQuantSparseLinear.from_factors(LowRankQuantSparseFactors(up, down, residual, rows, cols, values), bias_values, dtype)
    return layer, dense.to(dtype).double(), bias_values


def expected_output(layer, dense, bias, x):
    return F.linear(x.double(), dense, bias.to(x.dtype).double() if bias is not None else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [(1,), (1, 1), (2, 5)], ids=["one token", "one token, batched", "tokens"])
@pytest.mark.parametrize("group_size", [32, 16], ids=["int4 kernel", "dequantized"])
def test_output_is_the_weight_of_its_factors(group_size, tokens, dtype):
    layer, dense, bias = make(group_size=group_size, dtype=dtype)
    assert (layer.prepared_residual() is None) == (group_size == 16)
    x = torch.randn(*tokens, layer.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*tokens, layer.out_features) and y.dtype == dtype
    expected = expected_output(layer, dense, bias, x)
    # The int4 kernel takes bfloat16 activations and scales (~2⁻⁸ relative); bfloat16 models round their output.
    tolerance = 1e-5 if dtype == torch.float32 and group_size == 16 else 2e-2
    assert (y.double() - expected).abs().max() <= tolerance * expected.abs().max()
    torch.testing.assert_close(
        layer.to_dense().double(), dense, atol=1e-6 if dtype == torch.float32 else 0.05, rtol=1e-6 if dtype == torch.float32 else 1e-2
    )


def test_gradients_are_those_of_the_stored_weights():
    layer, _, _ = make()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    weights = torch.randn(3, layer.out_features)

    def gradients(forward):
        x.grad = None
        layer.zero_grad()
        (forward(x) * weights).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    unoptimized = lambda x: layer.up(layer.down(x)) + F.linear(x, layer.residual(torch.float32) + layer.sparse())
    for got, wanted in zip(gradients(layer), gradients(unoptimized)):
        torch.testing.assert_close(got, wanted, atol=1e-4, rtol=1e-4)
    assert layer.sparse_values.grad is not None and layer.sparse_values.grad.abs().sum() > 0


def test_run_time_forms_are_built_once_and_never_per_call(monkeypatch):
    builds, unpacks = [], []
    original_build, original_unpack = SparseRows.build, quant_module.unpack_bits
    monkeypatch.setattr(SparseRows, "build", classmethod(lambda cls, *args: builds.append(1) or original_build(*args)))
    monkeypatch.setattr(quant_module, "unpack_bits", lambda *args: unpacks.append(1) or original_unpack(*args))
    layer, _, _ = make()
    with torch.no_grad():
        outputs = [layer(torch.ones(1, layer.in_features)) for _ in range(3)] + [layer(torch.randn(6, layer.in_features))]
    assert len(builds) == 1 and len(unpacks) == 2  # one CSR form; codes and zero points unpacked once
    form = layer.prepared_sparse()
    assert form is layer.prepared_sparse() and form.csr.layout == torch.sparse_csr
    assert form.col_indices.dtype == torch.int32 and form.offsets.dtype == torch.int32
    assert torch.equal(outputs[0], outputs[2])


def test_a_changed_weight_is_never_served_from_a_stale_form():
    layer, _, _ = make()
    replacement, dense, bias = make(seed=1)
    x = torch.randn(1, layer.in_features)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(replacement.state_dict())  # in-place copies (both seeds keep 50 distinct outliers)
        y = layer(x)
    expected = expected_output(layer, dense, bias, x)
    assert (y.double() - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_state_dict_storage_and_spec_round_trip():
    layer, _, _ = make(in_features=100, count=40)  # a last group shorter than the others
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bits = layer.storage_bits()
    with torch.no_grad():
        layer(torch.randn(1, layer.in_features))
        layer(torch.randn(3, layer.in_features))
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert layer.storage_bits() == bits == sum(t.numel() * t.element_size() * 8 for t in after.values())  # nothing stored beyond its bits
    assert after["sparse_col_indices"].dtype == torch.int16 and after["sparse_crow_indices"].dtype == torch.int32

    spec = json.loads(json.dumps(layer.spec()))  # what lowrank_config.json stores
    assert spec["num_nonzero"] == layer.num_nonzero and spec["bits_per_weight"] == round(bits / (37 * 100), 4)
    rebuilt = STRUCTURES["LowRankQuantSparseLinear"].empty(100, 37, True, spec, dtype=torch.float32)
    rebuilt.load_state_dict(layer.state_dict())  # strict
    assert torch.equal(rebuilt.to_dense(), layer.to_dense()) and rebuilt.spec() == layer.spec()
    assert "num_nonzero=" in repr(layer) and layer.weight is None


def test_cast_keeps_the_scales_and_casts_the_outliers():
    layer, _, _ = make()
    cast_(layer, torch.bfloat16)
    assert layer.residual_scales.dtype == torch.float16 and layer.sparse_values.dtype == torch.bfloat16 and layer.up.weight.dtype == torch.bfloat16
    assert layer.storage_bits() == make(dtype=torch.bfloat16)[0].storage_bits()
