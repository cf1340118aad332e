"""lowrank-quant's bit width chosen per layer by the global allocation (lowrank.allocation.bits, on lowrank.allocation.choices)."""

import pytest
import torch
from tiny_models import tiny_model

import lowrank
from lowrank.allocation.bits import candidate_errors
from lowrank.allocation.choices import budget_grid, loss_increase
from lowrank.allocation.knapsack import budget_for_ratio, max_factored_rank
from lowrank.calibration.calibrate import collect_statistics
from lowrank.linalg.quantize import quantize_groups
from lowrank.methods.lowrank_quant import LowRankQuantConfig, lowrank_rank
from lowrank.nn import LowRankLinear, LowRankQuantLinear

CHOICES = LowRankQuantConfig(bit_choices="2,3,4", group_size=16)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama", seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 128, (4, 16), generator=generator)), "labels": ids} for _ in range(4)]
    return model, collect_statistics(model, batches, lowrank.find_targets(model), gradients=True, progress=False), batches


def test_budget_grid_starts_at_rank_one_and_stays_below_dense():
    for shape in [(32, 32), (64, 32), (16, 32), (1536, 576)]:
        grid = budget_grid(*shape)
        assert grid[0] == 1 and grid == sorted(set(grid)) and grid[-1] <= max_factored_rank(*shape)


def test_loss_increase_is_the_fisher_weighted_output_error():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    delta = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    fisher = torch.rand(5, generator=generator, dtype=torch.float64)
    brute = 0.5 * sum(fisher[o] * sum((delta[o] @ x[t]) ** 2 for t in range(40)) / 40 for o in range(5))
    assert loss_increase(delta, torch.linalg.cholesky(x.T @ x), fisher, 40) == pytest.approx(brute.item(), rel=1e-10)


def test_candidate_errors_equal_a_brute_force_split(calibrated):
    model, stats, _ = calibrated
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight.detach()
    grid = budget_grid(*weight.shape)
    errors = candidate_errors(weight, stats[name], CHOICES, grid)
    w = weight.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    x_root = torch.linalg.cholesky(stats[name].xtx.double() + 1e-9 * torch.eye(w.shape[1], dtype=torch.float64))
    fisher, tokens = stats[name].output_fisher, stats[name].num_tokens
    for i, budget in enumerate(grid):
        plain = w - (u[:, :budget] * s[:budget]) @ vh[:budget]
        assert errors[None][i] == pytest.approx(loss_increase(plain, x_root, fisher, tokens), rel=1e-5)
        for bits in CHOICES.choices:
            inner = lowrank_rank(*w.shape, budget, bits, CHOICES.group_size, 32)
            if inner < 1:
                assert errors[bits][i] is None
                continue
            low = (u[:, :inner] * s[:inner]) @ vh[:inner]
            residual = quantize_groups(w - low, bits, CHOICES.group_size).dequantize(torch.float64)
            assert errors[bits][i] == pytest.approx(loss_increase(w - low - residual, x_root, fisher, tokens), rel=1e-5)
    # More bits at the same budget never help when they leave no rank; somewhere on the grid each width is best.
    assert any(errors[4][i] is not None for i in range(len(grid)))


def test_the_plan_meets_the_budget_and_beats_every_single_width(calibrated):
    model, stats, _ = calibrated
    plan = lowrank.allocate(model, 0.7, method="lowrank-quant", stats=stats, strategy="global", strategy_config=CHOICES)
    budget = budget_for_ratio(plan.shapes, 0.7)
    assert plan.planned_parameters <= budget and plan.achieved_ratio >= 0.69
    assert set(plan.details["layer_options"]) == set(plan.ranks)
    assert {options["bits"] for options in plan.details["layer_options"].values()} <= set(CHOICES.choices)
    singles = {
        bits: lowrank.allocate(model, 0.7, method="lowrank-quant", stats=stats, strategy="global", strategy_config=LowRankQuantConfig(bit_choices=str(bits), group_size=16))
        for bits in CHOICES.choices
    }
    # Every single width's options are among the mixed plan's: its predicted loss is no larger (greedy: within 2 %).
    assert plan.predicted_error <= 1.02 * min(single.predicted_error for single in singles.values())
    assert len({options["bits"] for options in plan.details["layer_options"].values()}) > 1  # the choice is used


def test_compress_applies_each_layers_width_and_saves(calibrated, tmp_path):
    dense, stats, batches = calibrated
    model = tiny_model("llama", seed=0)
    plan = lowrank.allocate(model, 0.7, method="lowrank-quant", stats=stats, strategy="global", strategy_config=CHOICES)
    report = lowrank.compress_(model, plan, method="lowrank-quant", stats=stats, config=CHOICES, progress=False)
    for name, options in plan.details["layer_options"].items():
        module = model.get_submodule(name)
        assert isinstance(module, (LowRankQuantLinear, LowRankLinear))
        if isinstance(module, LowRankQuantLinear):
            assert module.bits == options["bits"]
    assert report.parameters["targeted_bits_after"] <= 32 * budget_for_ratio(plan.shapes, 0.7)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bit_choices_need_global_allocation_gradients_and_the_whole_model(calibrated, tmp_path):
    model, stats, _ = calibrated
    with pytest.raises(lowrank.LowrankError, match="--allocate global"):
        lowrank.allocate(model, 0.7, method="lowrank-quant", stats=stats, strategy="uniform", strategy_config=CHOICES)
    with pytest.raises(lowrank.LowrankError, match="gradient statistics"):
        lowrank.allocate(model, 0.7, method="lowrank-quant", stats=None, strategy="global", strategy_config=CHOICES)
    with pytest.raises(lowrank.LowrankError, match="bit_choices"):
        LowRankQuantConfig(bit_choices="1,4")
    tiny_model("llama", seed=0).save_pretrained(tmp_path / "dense")
    from lowrank.blockwise import compress_blockwise

    with pytest.raises(lowrank.LowrankError, match="without --blockwise"):
        compress_blockwise(tmp_path / "dense", tmp_path / "out", 0.7, method="lowrank-quant", config=CHOICES, strategy="global", batches=[])
    assert not (tmp_path / "out").exists()
    # Without choices the method plans as before (the per-matrix strategies).
    uniform = lowrank.allocate(model, 0.7, method="lowrank-quant", strategy="uniform", strategy_config=LowRankQuantConfig())
    assert uniform.ranks == lowrank.allocate(model, 0.7, method="whiten", strategy="uniform").ranks


def test_plan_cli_shows_each_layers_width(tmp_path, fixture_path, calib_text, capsys):
    from lowrank.cli.main import run

    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text[:20000])
    out = tmp_path / "plan.json"
    code = run(
        [
            "plan", str(fixture_path), "--method", "lowrank-quant", "--allocate", "global", "--option", "bit_choices=2,3,4", "--ratio", "0.85",
            "--calib", str(calib), "--include", r"layers\.0\.", "--num-samples", "2", "--seq-len", "32", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "options" in printed and "bits=" in printed and "predicted loss increase" in printed
    saved = lowrank.allocation.Plan.from_dict(__import__("json").loads(out.read_text()))
    assert len(saved.details["layer_options"]) == len(saved.ranks) == 7
