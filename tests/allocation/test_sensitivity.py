"""The ``sensitivity`` strategy: measured loss increases per matrix, knapsack on the scaled curves."""

import json

import pytest
import torch
from shared_data import CALIB, needs_shared
from tiny_models import tiny_model

import lowrank
from lowrank.allocation import SensitivityConfig, measured_sensitivities
from lowrank.allocation.knapsack import max_factored_rank
from lowrank.allocation.sensitivity import fit_sensitivity
from lowrank.calibration import calibration_batches
from lowrank.cli.main import run

CHEAP = SensitivityConfig(ratios=(0.5,), num_batches=1)


def random_batches(count=2, size=2, length=16, vocab=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (size, length), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def assert_budget_met_exactly(plan, ratio):
    budget = int((1 - ratio) * plan.dense_parameters)
    assert plan.planned_parameters <= budget
    steps = [sum(plan.shapes[name]) for name, rank in plan.ranks.items() if rank < max_factored_rank(*plan.shapes[name])]
    if steps:  # the greedy's last pass leaves no single rank step that would still fit
        assert budget - plan.planned_parameters < min(steps)


def test_fit_is_the_least_squares_slope_through_the_origin():
    assert fit_sensitivity([1.0, 2.0, 4.0], [0.5, 1.0, 2.0]) == pytest.approx(0.5)
    assert fit_sensitivity([1.0, 3.0], [2.0, 3.0]) == pytest.approx((2 + 9) / (1 + 9))
    assert fit_sensitivity([1.0], [-0.1]) < 0  # the floor is applied by the caller, not hidden here
    assert fit_sensitivity([], []) == 0.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_budget_is_met_exactly_on_tiny_models(family, ratio):
    model = tiny_model(family)
    plan = lowrank.allocate(model, ratio, strategy="sensitivity", batches=random_batches(), strategy_config=SensitivityConfig(ratios=(0.3, 0.7)))
    assert_budget_met_exactly(plan, ratio)
    details = plan.details["sensitivity"]
    assert set(details["matrices"]) == set(plan.shapes)
    assert all(item["scale"] > 0 and len(item["points"]) == 2 for item in details["matrices"].values())
    assert plan.predicted_error is not None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weights_are_restored_bit_exactly(family):
    model = tiny_model(family)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lowrank.allocate(model, 0.5, strategy="sensitivity", batches=random_batches())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_weights_are_restored_when_a_measurement_fails():
    model = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calls = []

    def fail_on_third_forward(*_args):
        calls.append(1)
        if len(calls) == 3:  # after the dense pass and the first truncated one: a weight is replaced
            raise RuntimeError("interrupted")

    handle = model.register_forward_hook(fail_on_third_forward)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            lowrank.allocate(model, 0.5, strategy="sensitivity", batches=random_batches(count=1), strategy_config=CHEAP)
    finally:
        handle.remove()
    assert len(calls) == 3
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_missing_batches_is_a_clear_error():
    with pytest.raises(lowrank.LowrankError, match="calibration batches.*--calib"):
        lowrank.allocate(tiny_model("llama"), 0.4, strategy="sensitivity")


def test_known_sensitivities_are_reused_without_batches():
    model = tiny_model("llama")
    measured = lowrank.allocate(model, 0.4, strategy="sensitivity", batches=random_batches(), strategy_config=CHEAP)
    stats = lowrank.collect_statistics(model, random_batches()[:1], list(measured.shapes), progress=False)
    reused = lowrank.allocate(
        model,
        0.4,
        strategy="sensitivity",
        stats=stats,
        strategy_config=SensitivityConfig(sensitivities=measured_sensitivities(measured.details["sensitivity"])),
    )
    assert reused.ranks == measured.ranks
    assert reused.predicted_error == pytest.approx(measured.predicted_error)


@needs_shared
def test_sensitivity_is_larger_where_the_same_error_hurts_the_loss_more(dense_model, tokenizer, calib_text):
    """v_proj·c and o_proj/c compute the same function (attention is linear in v, no biases), but a
    unit of v_proj's whitened error then moves the loss 1/c² as much: s must scale by 1/c²."""
    include = [r"layers\.0\.self_attn\.[vo]_proj"]
    batches = calibration_batches(tokenizer, calib_text, num_samples=4, seq_len=128, batch_size=4)
    config = SensitivityConfig(ratios=(0.5, 0.8), num_batches=1)

    def fitted(model):
        plan = lowrank.allocate(model, 0.4, strategy="sensitivity", include=include, batches=batches, strategy_config=config)
        return {name.split(".")[-1]: item["sensitivity"] for name, item in plan.details["sensitivity"]["matrices"].items()}

    original = fitted(dense_model)
    attention = dense_model.model.layers[0].self_attn
    with torch.no_grad():
        attention.v_proj.weight.mul_(0.1)
        attention.o_proj.weight.mul_(10.0)
    scaled = fitted(dense_model)
    assert original["v_proj"] > 0
    assert scaled["v_proj"] == pytest.approx(100 * original["v_proj"], rel=0.05)
    assert scaled["o_proj"] == pytest.approx(original["o_proj"], rel=0.05)


@needs_shared
def test_plan_cli_shows_the_measured_sensitivities(tmp_path, fixture_path, capsys):
    out = tmp_path / "plan.json"
    code = run(
        [
            "plan", str(fixture_path), "--ratio", "0.4", "--allocate", "sensitivity", "--calib", str(CALIB), "--include", r"layers\.[01]\.",
            "--num-samples", "1", "--seq-len", "32", "--batch-size", "1", "--sensitivity-ratios", "0.3,0.7", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "measured Δloss at rank" in printed and "predicted loss increase" in printed
    saved = json.loads(out.read_text())
    matrices = saved["details"]["sensitivity"]["matrices"]
    assert len(matrices) == 14 and all(len(item["points"]) == 2 and "fisher_scale" in item for item in matrices.values())
    plan = lowrank.allocation.Plan.from_dict(saved)
    assert_budget_met_exactly(plan, 0.4)


@needs_shared
def test_plan_cli_without_calibration_is_a_clear_error(fixture_path, capsys):
    assert run(["plan", str(fixture_path), "--allocate", "sensitivity"]) == 2
    assert "pass --calib FILE" in capsys.readouterr().err


@needs_shared
def test_compress_cli_allocates_by_sensitivity(tmp_path, fixture_path, capsys):
    out = tmp_path / "sensitive"
    code = run(
        [
            "compress", str(fixture_path), "--method", "whiten", "--ratio", "0.4", "--allocate", "sensitivity", "--calib", str(CALIB),
            "--include", r"layers\.0\.", "--num-samples", "1", "--seq-len", "32", "--batch-size", "1", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "lowrank_config.json").read_text())
    assert saved["allocation"] == "sensitivity" and len(saved["plan"]["details"]["sensitivity"]["matrices"]) == 7
