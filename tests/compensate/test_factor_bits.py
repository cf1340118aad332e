"""Quantized correction factors (``factor_bits``): exact bits, save → load, the error guarantee, the budget."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_model

import lowrank
from lowrank.compensate import CompensateConfig, base_of, compensate_, compensation_ranks, factorize
from lowrank.compensate.layer import quantize_correction, quantized_factorize
from lowrank.compensate.pipeline import split_bits
from lowrank.compress import cast_
from lowrank.errors import LowrankError
from lowrank.linalg import LowRankFactors
from lowrank.linalg.whiten import output_error
from lowrank.nn import LowRankQuantLinear, linear_weight
from lowrank.nn.quantized_factors import QuantizedCorrectionLinear

LAYER = "model.layers.0.mlp.down_proj"  # 32 × 64 in the tiny llama


def test_bits_are_counted_code_by_code(tiny_stats):
    """Hand count for a 32 × 64 layer, rtn:4 base in groups of 16, rank 3 with 4-bit factors in groups of 16."""
    model = tiny_model("llama")
    report = compensate_(model, tiny_stats, CompensateConfig(base="rtn:4", group_size=16, factor_bits=4), rank=3, progress=False)
    layer = model.get_submodule(LAYER)
    assert isinstance(layer, QuantizedCorrectionLinear) and layer.rank == 3
    base = 32 * 64 * 4 + 32 * 4 * 4 + 32 * 4 * 16  # codes, 4-bit zeros, float16 scales
    # down (3, 64): 192 codes, 12 groups (zeros padded to 16 codes); upᵀ (3, 32): 96 codes, 6 groups (zeros padded to 8).
    correction = 3 * 64 * 4 + 16 * 4 + 12 * 16 + 3 * 32 * 4 + 8 * 4 + 6 * 16
    assert split_bits(layer) == (base, correction)
    assert layer.storage_bits() == base + correction
    # What is stored is what is counted: the bytes of the layer's state dict (no bias here).
    assert 8 * sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == base + correction
    counts = report.parameters
    assert counts["base_bits"] + counts["correction_bits"] == counts["targeted_bits_after"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_gives_the_same_logits(dtype, tiny_stats, sample_ids, tmp_path):
    model = cast_(tiny_model("llama"), dtype)
    report = compensate_(model, tiny_stats, CompensateConfig(base="gptq:3", group_size=16, factor_bits=4), rank=4, progress=False)
    assert isinstance(model.get_submodule(LAYER), QuantizedCorrectionLinear)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    assert type(loaded.get_submodule(LAYER)) is QuantizedCorrectionLinear and loaded.get_submodule(LAYER).dtype == dtype
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        for name in tiny_stats:
            if name.endswith("down_proj"):
                continue  # 64 inputs
            assert torch.equal(model.get_submodule(name)(x), loaded.get_submodule(name)(x)), name
        if dtype == torch.float32:  # in bfloat16 the in-memory model's rotary inv_freq was cast by cast_, the loaded one's was not
            assert torch.equal(model(sample_ids).logits, loaded(sample_ids).logits)


def test_the_layer_computes_the_dequantized_factors(tiny_stats):
    """Forward = x·(up·down + Q)ᵀ with up, down dequantized independently from the quantizer's own codes."""
    weight = linear_weight(tiny_model("llama").get_submodule(LAYER)).detach()
    config = CompensateConfig(base="rtn:3", group_size=16, factor_bits=4)
    factors = factorize(weight, tiny_stats[LAYER], 4, config)
    layer = QuantizedCorrectionLinear.from_factors(factors, None, torch.float64)
    up = (factors.up.codes.double() - factors.up.zeros.double().repeat_interleave(16, 1)) * factors.up.scales.double().repeat_interleave(16, 1)
    down = (factors.down.codes.double() - factors.down.zeros.double().repeat_interleave(16, 1)) * factors.down.scales.double().repeat_interleave(
        16, 1
    )
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = x @ (up.T @ down + factors.residual.dequantize()).T
    assert torch.allclose(layer(x), expected, atol=1e-10)


@pytest.mark.parametrize("factor_bits", [2, 4, 8])
@pytest.mark.parametrize("lowrank_first", [False, True])
def test_quantized_factors_never_raise_a_layers_calibration_error(factor_bits, lowrank_first, tiny_stats):
    model = tiny_model("llama")
    config = CompensateConfig(base="gptq:3", group_size=16, factor_bits=factor_bits, lowrank_first=lowrank_first)
    for name, statistics in tiny_stats.items():
        weight = linear_weight(model.get_submodule(name)).detach().double()
        base = output_error(weight, base_of(weight, statistics, config).approximation, statistics.xtx)
        for rank in (1, 8):
            assert output_error(weight, factorize(weight, statistics, rank, config).dense(), statistics.xtx) <= base


def test_a_harmful_quantized_correction_falls_back_to_a_lower_rank_and_says_so(tiny_stats, caplog):
    """Two nearly parallel ``down`` rows (their 2-bit codes differ in one place) make D̂ C D̂ᵀ nearly
    singular, so the 2-bit rounding of the least-squares ``up`` lands in a direction of large input
    variance: worse than the base alone (checked first, so the case does not pass vacuously); the
    layer retries at rank 1 (the EoRA correction of its own) and ends no worse than the base."""
    weight = linear_weight(tiny_model("llama").get_submodule(LAYER)).detach().double()
    statistics = tiny_stats[LAYER]
    config = CompensateConfig(base="rtn:3", group_size=16, factor_bits=2, factor_group_size=64)
    base = base_of(weight, statistics, config)
    row = torch.randn(1, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    down = torch.cat([row, row + 1e-2 * torch.randn(1, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))])
    harmful = LowRankFactors(up=torch.zeros(32, 2, dtype=torch.float64), down=down)
    baseline = output_error(weight, base.approximation, statistics.xtx)
    up, down_codes = quantize_correction(weight - base.approximation, harmful, statistics.xtx, 2, 64)
    assert output_error(weight, base.approximation + up.dequantize().T @ down_codes.dequantize(), statistics.xtx) > baseline
    with caplog.at_level(logging.WARNING, logger="lowrank.compensate.layer"):
        factors = quantized_factorize(weight, statistics, 2, config, "probe", base, [(base, harmful)])
    assert "layer probe: the rank-2 correction with 2-bit factors" in caplog.text
    rank = factors.down.codes.shape[0] if hasattr(factors.down, "codes") else factors.down.shape[0]
    assert rank < 2
    assert output_error(weight, factors.dense(), statistics.xtx) <= baseline


def test_the_budget_buys_several_times_the_rank_and_is_never_exceeded(tiny_stats):
    model = tiny_model("llama")
    plain = compensation_ranks(model, tiny_stats, CompensateConfig(base="gptq:3", group_size=16), budget=0.1)
    config = CompensateConfig(base="gptq:3", group_size=16, factor_bits=4)
    quantized = compensation_ranks(model, tiny_stats, config, budget=0.1)
    # float32 factors cost 32 bits a value, 4-bit ones 4 + 20/16: about 6× the rank for the same bits.
    assert sum(quantized.ranks.values()) >= 4 * sum(plain.ranks.values()) > 0
    report = compensate_(model, tiny_stats, config, budget=0.1, progress=False)
    counts = report.parameters
    assert counts["correction_bits"] <= 0.1 * counts["base_bits"]
    # Less than one rank step of the largest layer (32 + 64 codes at 4 bits + 6 groups' scales and zeros) is left, plus the packing's reserve.
    assert counts["correction_bits"] > 0.1 * counts["base_bits"] - (96 * 4 + 6 * 20) - 14 * 4 * 7 * 4
    assert report.plan.details["compensation"]["extra_storage"] == pytest.approx(counts["correction_bits"] / counts["base_bits"])


@pytest.mark.parametrize("options", [{"factor_bits": 16}, {"factor_bits": 1}, {"factor_bits": 4, "base": "wanda:0.5"}])
def test_bad_factor_bits_fail_in_one_line(options):
    with pytest.raises(LowrankError, match="--factor-bits must be 2..8"):
        CompensateConfig(**{"base": "rtn:3", **options})


def test_rank_zero_layers_stay_plain(tiny_stats):
    """A layer the budget leaves uncorrected keeps the base alone, as without factor_bits."""
    model = tiny_model("llama")
    compensate_(model, tiny_stats, CompensateConfig(base="gptq:3", group_size=16, factor_bits=4), budget=0.05, progress=False)
    layers = [model.get_submodule(name) for name in tiny_stats]
    assert all(isinstance(layer, QuantizedCorrectionLinear) == (layer.rank > 0) for layer in layers)
    assert any(isinstance(layer, LowRankQuantLinear) for layer in layers)
