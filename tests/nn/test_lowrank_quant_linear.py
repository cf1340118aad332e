"""The decode path of low-rank + quantized (and low-rank + sparse) layers: ``up`` laid out column-major
once without a copy, no autograd Function when nothing needs a gradient; outputs equal the dense
product of the stored parts, and save → load is exact."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import lowrank
import lowrank.nn.layout as layout
from lowrank.linalg.quantize import quantize_groups
from lowrank.methods.lowrank_quant import LowRankQuantConfig
from lowrank.nn import LowRankPlusSparseLinear, LowRankQuantLinear
from lowrank.nn.layout import low_rank_plus, tall_column_major_
from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors, LowRankQuantSparseFactors, LowRankQuantSparseLinear
from lowrank.nn.lowrank_sparse_linear import LowRankSparseFactors


def make_quant(out_features=40, in_features=128, rank=5, bits=4, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = quantize_groups(torch.randn(out_features, in_features, generator=g), bits, 64)
    factors = LowRankQuantFactors(torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g), residual)
    return LowRankQuantLinear.from_factors(factors, torch.randn(out_features, generator=g) if bias else None, dtype)


def make_quant_sparse(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = quantize_groups(torch.randn(40, 128, generator=g), 4, 64)
    rows, cols = torch.tensor([0, 3, 3, 39]), torch.tensor([5, 0, 127, 64])
    factors = LowRankQuantSparseFactors(
        torch.randn(40, 5, generator=g), torch.randn(5, 128, generator=g), residual, rows, cols, torch.randn(4, generator=g)
    )
    return LowRankQuantSparseLinear.from_factors(factors, torch.randn(40, generator=g), dtype)


def make_sparse(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(40 * 60, generator=g)[:300].sort().values
    factors = LowRankSparseFactors(
        torch.randn(40, 3, generator=g), torch.randn(3, 60, generator=g), flat // 60, flat % 60, torch.randn(300, generator=g)
    )
    return LowRankPlusSparseLinear.from_factors(factors, torch.randn(40, generator=g), dtype)


def reference(layer, x):
    """The stored parts multiplied densely in float64: up·down + Q (+ S), plus the bias."""
    weight = layer.up.weight.double() @ layer.down.weight.double()
    if hasattr(layer, "residual_codes"):
        weight = weight + layer.residual(torch.float64)
    if hasattr(layer, "sparse_values"):
        weight = weight + layer.sparse().double()
    bias = layer.up.bias.double() if layer.up.bias is not None else None
    return F.linear(x.double(), weight, bias)


MAKERS = {"quant": make_quant, "quant-sparse": make_quant_sparse, "sparse": make_sparse}


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (2, 7)])
def test_outputs_match_the_dense_product_of_the_stored_parts(name, dtype, shape):
    layer = MAKERS[name](dtype=dtype)
    x = torch.randn(*shape, layer.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        for _ in range(2):  # the first call lays ``up`` out; the second runs on that layout
            y = layer(x)
            expected = reference(layer, x)
            # The int4 kernel takes bfloat16 activations (relative 2⁻⁹ of Q·x); bfloat16 models round everything.
            tolerance = (2e-2 if dtype == torch.bfloat16 else 4e-3) * expected.abs().max().item()
            assert y.shape == (*shape, layer.out_features) and y.dtype == dtype
            torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("out_features, bits, bias", [(40, 4, True), (37, 3, False), (48, 6, True)])
def test_quant_outputs_for_padded_rows_two_planes_and_no_bias(out_features, bits, bias):
    layer = make_quant(out_features=out_features, bits=bits, bias=bias)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(layer, x)
        torch.testing.assert_close(layer(x).double(), expected, atol=4e-3 * expected.abs().max().item(), rtol=0)


def test_tall_weight_is_laid_out_column_major_once_without_a_copy():
    layer = make_quant()
    up = layer.up.weight
    values, parameter = up.detach().clone(), up
    with torch.no_grad():
        layer(torch.randn(1, 128))
    pointer = up.data_ptr()
    assert layer.up.weight is parameter and up.stride() == (1, 40) and up.shape == (40, 5)
    assert torch.equal(up, values)
    assert up.untyped_storage().nbytes() == 40 * 5 * 4  # the values only: no padding, no second copy
    with torch.no_grad():
        layer(torch.randn(1, 128))
    assert up.data_ptr() == pointer  # laid out once, not per call
    assert layer.down.weight.is_contiguous()  # wide (rank < in): row-major is the faster one there


def test_a_first_call_under_inference_mode_leaves_a_trainable_layer():
    layer = make_quant()
    with torch.inference_mode():
        layer(torch.randn(1, 128))
    assert layer.up.weight.stride() == (1, 40) and not layer.up.weight.is_inference()
    layer(torch.randn(2, 128)).sum().backward()
    torch.testing.assert_close(layer.up.bias.grad, torch.full((40,), 2.0))


def test_wide_or_already_laid_out_weights_are_left_alone():
    wide = torch.nn.Linear(8, 3)
    pointer = wide.weight.data_ptr()
    assert not tall_column_major_(wide) and wide.weight.data_ptr() == pointer and wide.weight.is_contiguous()
    tall = torch.nn.Linear(3, 8)
    assert tall_column_major_(tall) and not tall_column_major_(tall)
    half = torch.nn.Linear(3, 8).bfloat16()  # bfloat16 gained nothing column-major (layer-speed.md)
    assert not tall_column_major_(half) and half.weight.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_plus_matches_the_plain_modules(dtype):
    # float32: ``up`` is re-laid out (rounding-level differences); bfloat16: left row-major, so lowrank.load's layer
    # computes bit for bit what the trust_remote_code modeling file computes (row-major up, the sum after it).
    g = torch.Generator().manual_seed(0)
    for bias in (True, False):
        down, up = torch.nn.Linear(64, 12, bias=False).to(dtype), torch.nn.Linear(12, 96, bias=bias).to(dtype)
        plain_down, plain_up = copy.deepcopy(down), copy.deepcopy(up)
        x, other = torch.randn(2, 5, 64, generator=g).to(dtype), torch.randn(2, 5, 96, generator=g).to(dtype)
        with torch.no_grad():
            y, plain = low_rank_plus(x, down, up, other), plain_up(plain_down(x)) + other
            if dtype == torch.bfloat16:
                assert up.weight.is_contiguous() and torch.equal(y, plain)
            else:
                assert up.weight.stride() == (1, 96)
                torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
            expected = F.linear(F.linear(x.double(), down.weight.double()), up.weight.double(), None if up.bias is None else up.bias.double())
            torch.testing.assert_close(y.double(), expected + other.double(), atol=2e-2 * expected.abs().max().item(), rtol=0)


def graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_the_autograd_function_runs_only_when_the_input_needs_a_gradient():
    layer = make_quant()
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(4))
    # Training the factors (x without gradient): Q is fixed, so no node for Q·x is recorded.
    assert "_Int4ResidualProductBackward" not in graph_nodes(layer(x))
    # A gradient to x: Q·x goes through the Function, whose backward multiplies by the dequantized Q.
    x.requires_grad_(True)
    y = layer(x)
    assert "_Int4ResidualProductBackward" in graph_nodes(y)
    y.square().sum().backward()
    reference_x = x.detach().double().requires_grad_(True)
    reference(layer, reference_x).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), reference_x.grad, rtol=2e-2, atol=2e-2 * reference_x.grad.abs().max().item())


def test_factor_gradients_flow_through_the_column_major_up():
    layer = make_quant()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    layer(x).sum().backward()
    # d(sum y)/d up = (sum over tokens of down·x)ᵀ repeated per output; d/d bias = tokens.
    hidden = (x.double() @ layer.down.weight.double().T).sum(0)
    torch.testing.assert_close(layer.up.weight.grad.double(), hidden.expand(40, -1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.up.bias.grad, torch.full((40,), 3.0))


@pytest.mark.parametrize("method, config", [("lowrank-quant", LowRankQuantConfig(group_size=32)), ("lowrank-sparse", None)])
def test_save_after_running_then_load_gives_identical_logits(tmp_path, method, config):
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.5, method=method)
    report = lowrank.compress_(model, plan, method=method, config=config, progress=False)
    x = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(x).logits  # lays every ``up`` out column-major
    ups = [m.up.weight for m in model.modules() if isinstance(m, (LowRankQuantLinear, LowRankPlusSparseLinear))]
    assert ups and all(w.stride() == (1, w.shape[0]) for w in ups)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
        assert torch.equal(model(x).logits, before)


def test_bfloat16_save_after_running_then_load_gives_identical_logits(tmp_path, monkeypatch):
    # bfloat16 factors run from a cached packed form (layout.run_linear): nothing of it is saved, and a
    # loaded model (which packs its own) computes what the model did. (A bfloat16 model cast with .to()
    # keeps a bfloat16 rotary buffer that a loaded one recomputes in float32, so the comparison is to the
    # loaded copy of the model saved before running.)
    monkeypatch.setattr(layout, "PACKED_MIN_MULTIPLY_ADDS", 0)  # the tiny model's factors are smaller than what packs
    model = tiny_model("llama").to(torch.bfloat16)
    plan = lowrank.allocate(model, 0.5, method="lowrank-quant")
    report = lowrank.compress_(model, plan, method="lowrank-quant", config=LowRankQuantConfig(group_size=32), progress=False)
    x = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    lowrank.save(model, tmp_path / "before", report=report)
    with torch.no_grad():
        model(x)
    assert any("_packed_weight" in m.__dict__ for m in model.modules()) == layout.ONEDNN_PACKING
    lowrank.save(model, tmp_path / "after", report=report)
    weights = sorted(p.name for p in (tmp_path / "after").glob("*.safetensors"))
    assert weights and all((tmp_path / "after" / name).read_bytes() == (tmp_path / "before" / name).read_bytes() for name in weights)
    loaded, reference = lowrank.load(tmp_path / "after"), lowrank.load(tmp_path / "before")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        first = loaded(x).logits
        assert torch.equal(loaded(x).logits, first) and torch.equal(reference(x).logits, first)
