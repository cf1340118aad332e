"""compensate_ on a whole (tiny) model: ranks, the extra-storage budget, bit accounting, save → load."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

import lowrank
from lowrank.compensate import CompensateConfig, base_of, compensate_, compensation_ranks
from lowrank.compensate.pipeline import split_bits
from lowrank.errors import LowrankError
from lowrank.linalg.whiten import output_error
from lowrank.nn import LowRankPlusSparseLinear, LowRankQuantLinear, linear_weight


@pytest.mark.parametrize("budget", [0.5, 1.0, 2.0])
def test_the_budget_is_never_exceeded_and_almost_spent(budget, tiny_stats):
    model = tiny_model("llama")
    config = CompensateConfig(base="gptq:3", group_size=16)
    report = compensate_(model, tiny_stats, config, budget=budget, progress=False)
    counts = report.parameters
    assert counts["correction_bits"] <= budget * counts["base_bits"]
    # The knapsack leaves less than one rank step of the largest layer (32 + 64 values of 32 bits).
    assert counts["correction_bits"] > budget * counts["base_bits"] - (32 + 64) * 32
    assert counts["base_bits"] + counts["correction_bits"] == counts["targeted_bits_after"]
    assert report.plan.details["compensation"]["base_bits"] == counts["base_bits"]  # predicted before = stored after


def test_bits_add_up_part_by_part(tiny_stats):
    """Codes, zero points and scales of the base, r·(out + in) model-dtype values of the correction."""
    model = tiny_model("llama")
    compensate_(model, tiny_stats, CompensateConfig(base="rtn:4", group_size=16), rank=3, progress=False)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")  # 32 × 64, groups of 16
    assert isinstance(layer, LowRankQuantLinear)
    assert split_bits(layer) == (32 * 64 * 4 + 32 * 4 * 4 + 32 * 4 * 16, 3 * (32 + 64) * 32)
    model = tiny_model("llama")
    compensate_(model, tiny_stats, CompensateConfig(base="wanda:2:4"), rank=2, progress=False)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, LowRankPlusSparseLinear)
    assert split_bits(layer) == (32 * 32 * (32 + 16) + 33 * 32, 2 * (32 + 64) * 32)


def test_a_loss_aware_budget_beats_the_same_storage_spent_uniformly(tiny_stats):
    """The allocator spends the budget where the base's error costs most; judged by the sum of
    predicted loss increases (Fisher-weighted output errors) over the layers, never worse."""
    config = CompensateConfig(base="gptq:3", group_size=16)
    model = tiny_model("llama")
    plan = compensation_ranks(model, tiny_stats, config, budget=1.0)
    assert plan.strategy == "global" and len(set(plan.ranks.values())) > 1
    spent = sum(rank * sum(plan.shapes[name]) for name, rank in plan.ranks.items())
    uniform_rank = spent // sum(sum(shape) for shape in plan.shapes.values())

    def predicted_loss(ranks):
        total = 0.0
        for name, rank in ranks.items():
            weight = linear_weight(model.get_submodule(name)).detach()
            factors = lowrank.compensate.factorize(weight, tiny_stats[name], rank, config, base=base_of(weight, tiny_stats[name], config))
            error = output_error(weight, factors.dense(), tiny_stats[name].xtx) / tiny_stats[name].num_tokens
            total += 0.5 * tiny_stats[name].output_fisher.mean().item() * error
        return total

    uniform = {name: min(uniform_rank, *plan.shapes[name]) for name in plan.ranks}
    assert predicted_loss(plan.ranks) <= predicted_loss(uniform)


@pytest.mark.parametrize("base", ["gptq:4", "wanda:0.5"])
def test_save_load_gives_the_same_logits(base, tiny_stats, sample_ids, tmp_path):
    model = tiny_model("llama")
    report = compensate_(model, tiny_stats, CompensateConfig(base=base, group_size=16), rank=4, progress=False)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(input_ids=sample_ids).logits, loaded(input_ids=sample_ids).logits)


def test_compensation_moves_the_model_back_towards_dense(tiny_stats, sample_ids):
    dense = tiny_model("llama")
    with torch.no_grad():
        reference = dense(input_ids=sample_ids).logits
        distances = []
        for rank in (1, 8):
            model = tiny_model("llama")
            compensate_(model, tiny_stats, CompensateConfig(base="rtn:3", group_size=16), rank=rank, progress=False)
            distances.append((model(input_ids=sample_ids).logits - reference).norm().item())
    assert distances[1] < distances[0]


def test_bad_requests_fail_in_one_line(tiny_stats):
    model = tiny_model("llama")
    with pytest.raises(LowrankError, match="either a correction rank"):
        compensation_ranks(model, tiny_stats, CompensateConfig(), rank=2, budget=0.1)
    with pytest.raises(LowrankError, match="raise --budget to at least"):
        compensation_ranks(model, tiny_stats, CompensateConfig(group_size=16), budget=0.01)
    with pytest.raises(LowrankError, match="base compressor"):
        CompensateConfig(base="gptq:12")
    with pytest.raises(LowrankError, match="no calibration statistics"):
        compensation_ranks(model, {}, CompensateConfig(), rank=2)


def test_a_small_budget_leaves_some_layers_uncorrected_and_they_still_save_load_and_export(tiny_stats, sample_ids, tmp_path):
    from lowrank.compensate.export import ADAPTER_DIR, export_peft_compensation

    model = tiny_model("llama")
    report = compensate_(model, tiny_stats, CompensateConfig(base="gptq:3", group_size=16), budget=0.15, progress=False)
    ranks = report.plan.ranks
    assert min(ranks.values()) == 0 < max(ranks.values())
    assert report.parameters["correction_bits"] <= 0.15 * report.parameters["base_bits"]
    lowrank.save(model, tmp_path / "out", report=report)
    with torch.no_grad():
        assert torch.equal(model(input_ids=sample_ids).logits, lowrank.load(tmp_path / "out")(input_ids=sample_ids).logits)
    export_peft_compensation(model, tmp_path / "peft")
    targets = json.loads((tmp_path / "peft" / ADAPTER_DIR / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(name for name, rank in ranks.items() if rank > 0)
