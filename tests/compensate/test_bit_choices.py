"""Base widths chosen per layer with the correction ranks (``bit_choices``): the curve against brute force over
every (width, rank) pair, the budget, save → load, the PEFT export, and the refusals."""

from __future__ import annotations

import itertools
import math

import peft
import pytest
import torch
import transformers
from tiny_models import tiny_model

import lowrank
from lowrank.compensate import CompensateConfig, compensate_, compensation_ranks
from lowrank.compensate.export import export_peft_compensation
from lowrank.compensate.pipeline import split_bits, width_errors, width_option
from lowrank.errors import LowrankError
from lowrank.linalg.quantize import quantized_bits
from lowrank.nn import LowRankQuantLinear
from lowrank.nn.quantized_factors import QuantizedCorrectionLinear


def test_the_width_curve_is_the_least_error_of_every_pair_that_fits():
    """Brute force: for every budget of k steps, enumerate every (width, rank) whose extra bits over the narrowest base fit."""
    generator = torch.Generator().manual_seed(0)
    step = 37
    curves = {
        width: (torch.rand(6, generator=generator, dtype=torch.float64).sort(descending=True).values * scale, bits)
        for width, scale, bits in ((2, 9.0, 500), (3, 3.0, 590), (4, 1.0, 700))
    }
    errors = width_errors(curves, step)
    for units in range(len(errors)):
        fitting = [
            (gains[rank:].sum().item(), width, rank)
            for width, (gains, bits) in curves.items()
            for rank in range(len(gains) + 1)
            if math.ceil((bits - 500) / step) + rank <= units  # the wider base's extra bits, in whole steps
        ]
        assert errors[units].item() == pytest.approx(min(fitting)[0], abs=1e-12), units
        width, rank = width_option(curves, step, units)
        assert curves[width][0][rank:].sum().item() == pytest.approx(errors[units].item(), abs=1e-12)
    assert errors[-1] == 0 and all(a >= b for a, b in itertools.pairwise(errors.tolist()))


@pytest.mark.parametrize("factor_bits", [None, 4])
def test_only_its_own_width_is_the_plain_allocation(factor_bits, tiny_stats):
    model = tiny_model("llama")
    plain = compensation_ranks(model, tiny_stats, CompensateConfig(base="rtn:3", group_size=16, factor_bits=factor_bits), budget=0.1)
    same = compensation_ranks(model, tiny_stats, CompensateConfig(base="rtn:3", group_size=16, factor_bits=factor_bits, bit_choices="3"), budget=0.1)
    assert same.ranks == plain.ranks and "layer_options" not in same.details


@pytest.mark.parametrize("choices, factor_bits", [("4", 4), ("2,4", None)])
def test_chosen_widths_stay_within_the_budget_and_save_load_and_export(choices, factor_bits, tiny_stats, sample_ids, tmp_path):
    model = tiny_model("llama")
    config = CompensateConfig(base="rtn:3", group_size=16, factor_bits=factor_bits, bit_choices=choices)
    report = compensate_(model, tiny_stats, config, budget=0.3, progress=False)
    options = report.plan.details.get("layer_options", {})
    assert options, "a 30 % budget promotes some layer of the tiny model"
    uniform = 0
    for name in tiny_stats:
        layer = model.get_submodule(name)
        assert isinstance(layer, (LowRankQuantLinear, QuantizedCorrectionLinear))
        assert layer.bits == int(options.get(name, {"base": "rtn:3"})["base"].split(":")[1])
        uniform += quantized_bits(layer.out_features, layer.in_features, 3, 16)
    stored = sum(sum(split_bits(model.get_submodule(name))) for name in tiny_stats)
    assert stored - uniform <= 0.3 * uniform  # the budget is over the base at its own width everywhere
    assert report.plan.details["compensation"]["extra_storage"] == pytest.approx((stored - uniform) / uniform)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(sample_ids).logits, loaded(sample_ids).logits)
    export_peft_compensation(loaded, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base"), str(tmp_path / "peft" / "adapter")
    )
    with torch.no_grad():
        expected, got = loaded(sample_ids).logits, served(sample_ids).logits
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bit_choices": "9"}, "--bit-choices lists"),
        ({"bit_choices": "4", "base": "wanda:0.5"}, "needs a quantized base"),
        ({"bit_choices": "a"}, "--bit-choices"),
    ],
)
def test_bad_bit_choices_fail_in_one_line(options, message):
    with pytest.raises(LowrankError, match=message):
        CompensateConfig(**{"base": "rtn:3", **options})


def test_bit_choices_need_a_budget(tiny_stats):
    with pytest.raises(LowrankError, match="--bit-choices are chosen with an extra-storage --budget"):
        compensation_ranks(tiny_model("llama"), tiny_stats, CompensateConfig(base="rtn:3", group_size=16, bit_choices="4"), rank=2)
