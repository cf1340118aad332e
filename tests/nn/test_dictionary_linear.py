"""DictionaryLinear's paths: one token through the CSR form, many tokens through dense codes scattered
for the call (when dense enough) or the token-sliced sparse product; every path gives the dense
product of the stored parts, keeps no dense codes, and save → load is exact."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model
from torch.profiler import ProfilerActivity, profile

import lowrank
from lowrank.methods.dictionary import DictionaryConfig
from lowrank.nn import DictionaryLinear
from lowrank.nn.dictionary_linear import DENSE_CODES_MIN_TOKENS, DictionaryFactors, dense_codes_min_density
from lowrank.nn.lowrank_sparse_linear import SparseRows, token_slices


def make_dictionary(nonzeros, num_atoms=20, out_features=40, in_features=60, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(num_atoms, generator=g)[:nonzeros] for _ in range(out_features)])
    factors = DictionaryFactors(torch.randn(num_atoms, in_features, generator=g), indices, torch.randn(out_features, nonzeros, generator=g))
    return DictionaryLinear.from_factors(factors, torch.randn(out_features, generator=g) if bias else None, dtype)


def reference(layer, x):
    """Codes·Atoms built by brute force (a loop over the stored entries), in float64."""
    codes = torch.zeros(layer.out_features, layer.num_atoms, dtype=torch.float64)
    for row in range(layer.out_features):
        for index, value in zip(layer.code_indices[row].tolist(), layer.code_values[row].tolist()):
            codes[row, index] = value
    bias = layer.bias.double() if layer.bias is not None else None
    return F.linear(x.double(), codes @ layer.atoms.weight.double(), bias)


def operators(layer, x):
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        layer(x)
    return {event.key: event.count for event in prof.key_averages()}


def test_path_choice_by_tokens_density_and_dtype():
    dense_enough, sparse = make_dictionary(nonzeros=10), make_dictionary(nonzeros=7)  # codes 50 % and 35 % dense
    many = DENSE_CODES_MIN_TOKENS
    assert dense_codes_min_density(torch.float32) == 0.5 and dense_codes_min_density(torch.bfloat16) == 0.3
    assert not dense_enough.uses_dense_codes(1, torch.float32) and not dense_enough.uses_dense_codes(many - 1, torch.float32)
    assert dense_enough.uses_dense_codes(many, torch.float32) and dense_enough.uses_dense_codes(many, torch.bfloat16)
    assert not sparse.uses_dense_codes(many, torch.float32) and sparse.uses_dense_codes(many, torch.bfloat16)
    # Codes over 4 MiB dense (5632 × 903 in bfloat16, 10 MiB) wait for 512 tokens; 2048 × 901 (3.5 MiB) does not.
    large, small = DictionaryLinear(64, 5632, 903, 452, bias=False), DictionaryLinear(64, 2048, 901, 451, bias=False)
    assert not large.uses_dense_codes(511, torch.bfloat16) and large.uses_dense_codes(512, torch.bfloat16)
    assert small.uses_dense_codes(256, torch.bfloat16) and not small.uses_dense_codes(255, torch.bfloat16)


@pytest.mark.parametrize("nonzeros", [10, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, DENSE_CODES_MIN_TOKENS + 3])
@pytest.mark.parametrize("bias", [True, False])
def test_every_path_gives_the_dense_product_of_the_stored_parts(nonzeros, dtype, tokens, bias):
    layer = make_dictionary(nonzeros, dtype=dtype, bias=bias)
    x = torch.randn(1, tokens, 60, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y = layer(x)
    expected = reference(layer, x)
    tolerance = (3e-2 if dtype == torch.bfloat16 else 1e-5) * expected.abs().max().item()
    assert y.shape == (1, tokens, 40) and y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=0)


def test_one_token_keeps_the_csr_path_and_many_tokens_scatter_once():
    layer = make_dictionary(nonzeros=10)
    one = operators(layer, torch.randn(1, 60))
    assert one.get("aten::mv", 0) == 1 and "aten::scatter_" not in one and "aten::embedding_bag" not in one
    assert "aten::_to_copy" not in one or one["aten::_to_copy"] <= 2  # x to the CSR dtype and back at most: no index conversion
    many = operators(layer, torch.randn(DENSE_CODES_MIN_TOKENS, 60))
    assert many.get("aten::scatter_", 0) == 1 and "aten::embedding_bag" not in many and "aten::mv" not in many
    sparse = operators(make_dictionary(nonzeros=7), torch.randn(DENSE_CODES_MIN_TOKENS, 60))
    assert "aten::scatter_" not in sparse and sparse.get("aten::embedding_bag", 0) >= 1


def test_dense_codes_are_not_kept_after_the_call():
    layer = make_dictionary(nonzeros=10)
    bits, state = layer.storage_bits(), {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(1, 60))  # builds the CSR form
        layer(torch.randn(DENSE_CODES_MIN_TOKENS, 60))
    prepared = vars(layer._prepared.value).values()
    held = [t for t in list(layer.parameters()) + list(layer.buffers()) + list(prepared) if torch.is_tensor(t)]
    assert all(tuple(t.shape) != (40, 20) for t in held if t.layout == torch.strided)  # the CSR form has that shape, sparse
    assert layer.storage_bits() == bits and all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_dense_codes_path_gradients_match_the_reference():
    layer = make_dictionary(nonzeros=10)
    x = torch.randn(DENSE_CODES_MIN_TOKENS, 60, generator=torch.Generator().manual_seed(2), requires_grad=True)
    layer(x).square().mean().backward()
    twin = make_dictionary(nonzeros=10).double()
    x64 = x.detach().double().requires_grad_(True)
    codes = torch.zeros(40, 20, dtype=torch.float64).scatter(1, twin.code_indices.long(), twin.code_values)
    F.linear(F.linear(x64, twin.atoms.weight), codes, twin.bias).square().mean().backward()
    for ours, theirs in [(x.grad, x64.grad), (layer.code_values.grad, twin.code_values.grad), (layer.atoms.weight.grad, twin.atoms.weight.grad)]:
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, float32_calls", [(70, 3), (20, 1)])
def test_sparse_product_slices_float32_tokens_past_l2_and_gives_the_same_result(dtype, tokens, float32_calls):
    g = torch.Generator().manual_seed(3)
    in_features, out_features, per_row = 8192, 6, 5  # float32: xᵀ is 32 KiB per token, slices of 32 tokens past 1 MiB
    cols = torch.stack([torch.randperm(in_features, generator=g)[:per_row].sort().values for _ in range(out_features)]).reshape(-1)
    values = torch.randn(out_features * per_row, generator=g)
    rows = SparseRows.build(torch.arange(out_features + 1) * per_row, cols, values, (out_features, in_features))
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    dense = torch.zeros(out_features, in_features, dtype=torch.float64)
    dense[torch.arange(out_features).repeat_interleave(per_row), cols] = values.double()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = rows.matmul(x, values, out_features)
    calls = {event.key: event.count for event in prof.key_averages()}.get("aten::embedding_bag", 0)
    assert token_slices(tokens, in_features, dtype) == calls == (float32_calls if dtype == torch.float32 else 1)
    tolerance = (2e-2 if dtype == torch.bfloat16 else 1e-5) * y.abs().max().item()
    torch.testing.assert_close(y.double(), F.linear(x.double(), dense), atol=tolerance, rtol=0)


@pytest.mark.parametrize("nonzeros, dense_path", [(2, False), (6, True)])
def test_save_after_running_then_load_gives_identical_logits(tmp_path, nonzeros, dense_path):
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.5, method="dictionary")
    report = lowrank.compress_(model, plan, method="dictionary", config=DictionaryConfig(nonzeros=nonzeros), progress=False)
    layers = [m for m in model.modules() if isinstance(m, DictionaryLinear)]
    assert layers and all(m.uses_dense_codes(DENSE_CODES_MIN_TOKENS, torch.float32) == dense_path for m in layers)
    short = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    long = torch.randint(0, 128, (1, DENSE_CODES_MIN_TOKENS + 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(short), model(long)  # builds the run-time forms
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    with torch.no_grad():
        for x in (short, long):
            assert torch.equal(loaded(x).logits, model(x).logits)
