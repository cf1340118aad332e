"""The structured layers run on run-time forms built once (int4 kernel tiles, int32 indices, CSR
tensors): the same outputs and gradients as the stored weights, never rebuilt per call, rebuilt when
the stored tensors change, and invisible to the state dict and the storage accounting."""

import pytest
import torch
import torch.nn.functional as F

import lowrank.nn.layout as layout
import lowrank.nn.lowrank_quant_linear as quant_module
from lowrank.linalg.quantize import quantize_groups
from lowrank.nn import DictionaryLinear, LowRankPlusSparseLinear, LowRankQuantLinear
from lowrank.nn.dictionary_linear import DictionaryFactors
from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors
from lowrank.nn.lowrank_sparse_linear import LowRankSparseFactors, SparseRows


def make_quant(out_features=40, in_features=128, bits=4, group_size=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = quantize_groups(torch.randn(out_features, in_features, generator=g), bits, group_size)
    factors = LowRankQuantFactors(torch.randn(out_features, 3, generator=g), torch.randn(3, in_features, generator=g), residual)
    return LowRankQuantLinear.from_factors(factors, torch.randn(out_features, generator=g), dtype)


def make_sparse(out_features=40, in_features=60, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm((out_features - 1) * in_features, generator=g)[:300].sort().values
    rows = flat // in_features
    rows = rows + (rows >= 7)  # row 7 stays empty
    factors = LowRankSparseFactors(
        torch.randn(out_features, 3, generator=g), torch.randn(3, in_features, generator=g), rows, flat % in_features, torch.randn(300, generator=g)
    )
    return LowRankPlusSparseLinear.from_factors(factors, torch.randn(out_features, generator=g), dtype)


def make_dictionary(out_features=40, in_features=60, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(out_features)])
    factors = DictionaryFactors(torch.randn(20, in_features, generator=g), indices, torch.randn(out_features, 4, generator=g))
    return DictionaryLinear.from_factors(factors, torch.randn(out_features, generator=g), dtype)


def layer_bias(layer):
    return layer.bias if isinstance(layer, DictionaryLinear) else layer.up.bias


def reference(layer, x):
    """The unoptimized forward pass: the stored weights applied densely, in float64."""
    if isinstance(layer, LowRankQuantLinear):
        weight = layer.up.weight.double() @ layer.down.weight.double() + layer.residual(torch.float64)
    else:
        weight = layer.to_dense().double()
    return F.linear(x.double(), weight, layer_bias(layer).double())


def residual_scale(layer, x):
    if isinstance(layer, LowRankQuantLinear):
        return F.linear(x.double(), layer.residual(torch.float64)).abs().max()
    return reference(layer, x).abs().max()


def tolerance(layer, dtype):
    """Half-precision models round to their dtype; the int4 kernel takes bfloat16 activations and
    scales in every dtype (relative ~2⁻⁸ of the residual's contribution); the rest is float32 exact."""
    if dtype == torch.bfloat16 or (isinstance(layer, LowRankQuantLinear) and layer.prepared_residual() is not None):
        return 2e-2
    return 1e-5


CASES = [
    ("quant 4-bit group 64", lambda dtype, seed=0: make_quant(dtype=dtype, seed=seed)),
    ("quant 3-bit group 32, rows not a multiple of 16", lambda dtype, seed=0: make_quant(37, 96, 3, 32, dtype, seed)),
    ("quant 2-bit group 128", lambda dtype, seed=0: make_quant(48, 256, 2, 128, dtype, seed)),
    ("quant 5-bit (two planes), input not a multiple of the group", lambda dtype, seed=0: make_quant(33, 100, 5, 32, dtype, seed)),
    ("quant 8-bit group 512 (kernel groups of 256)", lambda dtype, seed=0: make_quant(32, 600, 8, 512, dtype, seed)),
    ("quant group 16 (no kernel)", lambda dtype, seed=0: make_quant(24, 40, 3, 16, dtype, seed)),
    ("sparse", lambda dtype, seed=0: make_sparse(dtype=dtype, seed=seed)),
    ("dictionary", lambda dtype, seed=0: make_dictionary(dtype=dtype, seed=seed)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, None), (1, 1, None), (2, 5, None)], ids=["one token", "one token, batched", "tokens"])
@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_output_matches_the_stored_weights(name, make, shape, dtype):
    layer = make(dtype)
    x = torch.randn(*shape[:-1], layer.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], layer.out_features) and y.dtype == dtype
    expected = reference(layer, x)
    error = (y.double() - expected).abs().max()
    assert error <= tolerance(layer, dtype) * residual_scale(layer, x) + (expected.abs().max() * 2**-7 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_the_stored_weights(name, make):
    # A loss linear in the output has gradients that do not depend on the forward pass's rounding.
    layer = make(torch.float32)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    weights = torch.randn(3, layer.out_features)

    def gradients(forward):
        x.grad = None
        layer.zero_grad()
        (forward(x) * weights).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    if isinstance(layer, LowRankQuantLinear):
        unoptimized = lambda x: layer.up(layer.down(x)) + F.linear(x, layer.residual(torch.float32))  # noqa: E731
    else:
        unoptimized = lambda x: F.linear(x, layer.to_dense(), layer_bias(layer))  # noqa: E731
    for got, wanted in zip(gradients(layer), gradients(unoptimized)):
        torch.testing.assert_close(got, wanted, atol=1e-4, rtol=1e-4)


def test_quantized_codes_are_unpacked_once_not_per_call(monkeypatch):
    calls = []
    original = quant_module.unpack_bits
    monkeypatch.setattr(quant_module, "unpack_bits", lambda *args: calls.append(args) or original(*args))
    layer = make_quant()
    x = torch.randn(1, 128)
    with torch.no_grad():
        outputs = [layer(x) for _ in range(3)] + [layer(torch.randn(4, 7, 128))]
    assert len(calls) == 2  # codes and zero points, once, at the first call
    assert layer.prepared_residual() is layer.prepared_residual()
    assert torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("make", [make_sparse, make_dictionary], ids=["sparse", "dictionary"])
def test_sparse_forms_are_built_once_with_int32_indices(monkeypatch, make):
    builds = []
    original = SparseRows.build
    monkeypatch.setattr(SparseRows, "build", classmethod(lambda cls, *args: builds.append(1) or original(*args)))
    layer = make()
    with torch.no_grad():
        for x in (torch.randn(1, layer.in_features), torch.randn(1, layer.in_features), torch.randn(6, layer.in_features)):
            layer(x)
    assert len(builds) == 1
    form = layer.prepared_codes() if isinstance(layer, DictionaryLinear) else layer.prepared_sparse()
    assert form.col_indices.dtype == torch.int32 and form.offsets.dtype == torch.int32 and form.csr.layout == torch.sparse_csr


@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_a_changed_weight_is_never_served_from_a_stale_form(name, make):
    layer, replacement = make(torch.float32), make(torch.float32, seed=1)
    with torch.no_grad():
        for p in replacement.parameters():
            p.mul_(-1.5)
    x = torch.randn(1, layer.in_features)
    with torch.no_grad():
        layer(x)  # builds the run-time form from the old weights
        layer.load_state_dict(replacement.state_dict())  # in-place copies: the versions change
        y = layer(x)
    assert (y.double() - reference(layer, x)).abs().max() <= tolerance(layer, torch.float32) * residual_scale(layer, x)


@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_state_dict_and_storage_are_unchanged_by_running(name, make):
    layer = make(torch.float32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bits, buffers = layer.storage_bits(), [n for n, _ in layer.named_buffers()]
    with torch.no_grad():
        layer(torch.randn(1, layer.in_features))
        layer(torch.randn(3, layer.in_features))
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert layer.storage_bits() == bits and [n for n, _ in layer.named_buffers()] == buffers


def test_kernel_bytes_read_per_token():
    # 4-bit codes read as 4 bits + a bfloat16 scale and zero per group; 5–8-bit codes as two 4-bit planes.
    layer = make_quant(32, 128, 4, 64)
    lowrank_bits = 3 * (32 + 128) * 32 + 32 * 32
    assert layer.runtime_bits() == lowrank_bits + 32 * 128 * 4 + 32 * 2 * 2 * 16
    assert make_quant(32, 128, 8, 64).runtime_bits() == lowrank_bits + 2 * (32 * 128 * 4 + 32 * 2 * 2 * 16)
    assert make_quant(24, 40, 3, 16).runtime_bits() == (3 * (24 + 40) + 24) * 32 + 24 * 40 * 32  # no kernel: Q read dense


def factor_linears(layer):
    """The plain ``nn.Linear`` factors a layer runs through ``layout.run_linear`` (down/up, or atoms)."""
    return [m for m in layer.children() if type(m) is torch.nn.Linear]


@pytest.mark.skipif(not layout.ONEDNN_PACKING, reason="no oneDNN bfloat16 path (torch without oneDNN, or a CPU without AVX-512)")
@pytest.mark.parametrize("name, make", [c for c in CASES if c[0] in ("quant 4-bit group 64", "sparse", "dictionary")], ids=["quant", "sparse", "dictionary"])
def test_bfloat16_factors_run_from_a_packed_form_built_once(monkeypatch, name, make):
    monkeypatch.setattr(layout, "PACKED_MIN_MULTIPLY_ADDS", 0)  # these test layers are smaller than what packs
    layer = make(torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    inputs = [torch.randn(*shape, layer.in_features, generator=torch.Generator().manual_seed(4)).bfloat16() for shape in ((1, 1), (1, 1), (2, 5))]
    monkeypatch.setattr(layout, "ONEDNN_PACKING", False)
    with torch.no_grad():
        plain = [layer(x) for x in inputs]  # the unoptimized path: torch's plain bfloat16 F.linear
    assert all("_packed_weight" not in m.__dict__ for m in factor_linears(layer))
    monkeypatch.setattr(layout, "ONEDNN_PACKING", True)
    with torch.no_grad():
        packed = [layer(x) for x in inputs]
    for got, wanted in zip(packed, plain):
        torch.testing.assert_close(got, wanted)  # bfloat16 tolerance: only the float32 accumulation order may differ
    caches = [m.__dict__["_packed_weight"] for m in factor_linears(layer)]
    assert caches and all(cache.builds == 1 and cache.value.is_mkldnn for cache in caches)  # once, not per call
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # An in-place write (load_state_dict, an optimizer step) rebuilds the packed form: never stale.
    linear = factor_linears(layer)[0]
    with torch.no_grad():
        linear.weight.mul_(-2)
        torch.testing.assert_close(layer(inputs[2]).double(), reference(layer, inputs[2]), atol=2e-2 * reference(layer, inputs[2]).abs().max().item(), rtol=0)
    assert linear.__dict__["_packed_weight"].builds == 2
    # With gradients the plain modules run (the packed form has no backward), and nothing is rebuilt.
    x = inputs[2].clone().requires_grad_()
    layer(x).float().sum().backward()
    assert x.grad is not None and linear.weight.grad is not None and linear.__dict__["_packed_weight"].builds == 2


@pytest.mark.skipif(not layout.ONEDNN_PACKING, reason="no oneDNN bfloat16 path (torch without oneDNN, or a CPU without AVX-512)")
def test_only_products_torch_would_send_to_onednn_are_packed():
    # Below 16³ multiply-adds torch's own bfloat16 kernel (a few µs of fixed cost) beats oneDNN's (~30 µs).
    weight, x = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    with torch.no_grad():
        assert not layout.packs(weight, x[:1]) and not layout.packs(weight, x)  # 16·16·1 and 16·16·16 = 16³
        assert layout.packs(weight, torch.cat([x, x[:1]]))  # 17·16·16
        assert not layout.packs(weight.float(), torch.cat([x, x[:1]]).float())  # float32 keeps its kernels
    assert not layout.packs(weight, torch.cat([x, x[:1]]))  # gradients recorded: the plain modules run


def test_a_hooked_factor_is_called_as_a_module(monkeypatch):
    monkeypatch.setattr(layout, "PACKED_MIN_MULTIPLY_ADDS", 0)
    layer, seen = make_quant(dtype=torch.bfloat16), []
    layer.up.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        layer(torch.randn(1, 128).bfloat16())
    assert seen == [(1, 40)] and "_packed_weight" not in layer.up.__dict__
