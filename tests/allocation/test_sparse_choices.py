"""lowrank-sparse's sparse share chosen per layer by the global allocation (lowrank.allocation.sparse_choices)."""

import json

import pytest
import torch
from tiny_models import tiny_model

import lowrank
from lowrank.allocation.choices import budget_grid
from lowrank.allocation.knapsack import budget_for_ratio
from lowrank.allocation.sparse_choices import candidate_errors
from lowrank.calibration.calibrate import collect_statistics
from lowrank.methods.lowrank_sparse import LowRankPlusSparseConfig, build, factorize, split_budget
from lowrank.nn import LowRankLinear, LowRankPlusSparseLinear

CHOICES = LowRankPlusSparseConfig(whiten=True, weighted_selection=True, iterations=2, sparse_choices="0,0.25,0.5")
RATIO = 0.5


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama", seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 128, (4, 16), generator=generator)), "labels": ids} for _ in range(4)]
    stats = collect_statistics(model, batches, lowrank.find_targets(model), gradients=True, progress=False)
    plan = lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="global", strategy_config=CHOICES)
    return model, stats, batches, plan


def test_candidate_errors_are_the_output_error_of_the_layer_as_built(calibrated):
    model, stats, batches, _ = calibrated
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    inputs = []
    handle = layer.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            model(batch["input_ids"])
    handle.remove()
    x = torch.cat(inputs)  # (tokens, in): the calibration inputs themselves
    assert x.shape[0] == stats[name].num_tokens
    grid = budget_grid(*layer.weight.shape)
    errors = candidate_errors(layer.weight, stats[name], CHOICES, grid)
    assert sorted(errors) == list(CHOICES.choices)
    fisher = stats[name].output_fisher.double()
    with torch.no_grad():
        dense = layer(x).double()
        for share in CHOICES.choices:
            for i, budget in enumerate(grid):
                config = LowRankPlusSparseConfig(whiten=True, weighted_selection=True, iterations=2, sparse_fraction=share)
                built = build(factorize(layer.weight, stats[name], budget, config), None, layer.weight.dtype)
                # Storage as the method counts it: factors, sparse values, column indices and row pointers within the budget.
                assert built.storage_bits() <= budget * sum(layer.weight.shape) * 32
                if share == 0.0:
                    assert isinstance(built, LowRankLinear) and built.rank == budget
                brute = 0.5 * (fisher * (dense - built(x).double()).pow(2).mean(0)).sum().item()
                assert errors[share][i] == pytest.approx(brute, rel=1e-3)
    # Sparse entries pay off somewhere on the grid, and the curves fall with the budget.
    assert any(errors[0.5][i] < errors[0.0][i] for i in range(len(grid)))
    assert errors[0.0] == sorted(errors[0.0], reverse=True)


def test_the_plan_meets_the_budget_and_beats_every_single_share(calibrated):
    model, stats, _, plan = calibrated
    assert plan.planned_parameters <= budget_for_ratio(plan.shapes, RATIO) and plan.achieved_ratio >= RATIO - 0.01
    assert set(plan.details["layer_options"]) == set(plan.ranks)
    shares = [options["sparse_fraction"] for options in plan.details["layer_options"].values()]
    assert set(shares) <= set(CHOICES.choices) and len(set(shares)) > 1  # the choice is used
    singles = {
        share: lowrank.allocate(
            model, RATIO, method="lowrank-sparse", stats=stats, strategy="global",
            strategy_config=LowRankPlusSparseConfig(whiten=True, weighted_selection=True, iterations=2, sparse_choices=str(share)),
        )  # fmt: skip
        for share in CHOICES.choices
    }
    # Every single share's options are among the mixed plan's: its predicted loss is no larger (greedy: within 2 %).
    assert plan.predicted_error <= 1.02 * min(single.predicted_error for single in singles.values())
    assert plan.predicted_error < max(single.predicted_error for single in singles.values())


def test_compress_applies_each_layers_share_and_saves(calibrated, tmp_path):
    _, stats, batches, plan = calibrated
    model = tiny_model("llama", seed=0)
    report = lowrank.compress_(model, plan, method="lowrank-sparse", stats=stats, config=CHOICES, progress=False)
    sparse_layers = 0
    for name, options in plan.details["layer_options"].items():
        module, (out_features, in_features) = model.get_submodule(name), plan.shapes[name]
        if options["sparse_fraction"] == 0.0:
            assert isinstance(module, LowRankLinear) and module.rank == plan.ranks[name]
        elif isinstance(module, LowRankPlusSparseLinear):  # (else the plain fit was better: the method's fallback)
            sparse_layers += 1
            rank, entries = split_budget(out_features, in_features, plan.ranks[name], options["sparse_fraction"], value_bytes=4)
            assert (module.rank, module.num_nonzero) == (rank, entries)
        assert module.storage_bits() <= plan.ranks[name] * (out_features + in_features) * 32
    assert sparse_layers > 0
    assert report.parameters["targeted_bits_after"] <= 32 * budget_for_ratio(plan.shapes, RATIO)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_sparse_choices_need_global_allocation_gradients_valid_shares_and_the_whole_model(calibrated, tmp_path):
    model, stats, _, _ = calibrated
    with pytest.raises(lowrank.LowrankError, match="--allocate global"):
        lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="uniform", strategy_config=CHOICES)
    with pytest.raises(lowrank.LowrankError, match="gradient statistics"):
        lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=None, strategy="global", strategy_config=CHOICES)
    for bad in ("0,1", "0,-0.25", "a,b", ","):
        with pytest.raises(lowrank.LowrankError, match="sparse_choices"):
            LowRankPlusSparseConfig(sparse_choices=bad)
    tiny_model("llama", seed=0).save_pretrained(tmp_path / "dense")
    from lowrank.blockwise import compress_blockwise

    with pytest.raises(lowrank.LowrankError, match="sparse_choices plans every layer at once"):
        compress_blockwise(tmp_path / "dense", tmp_path / "out", RATIO, method="lowrank-sparse", config=CHOICES, strategy="global", batches=[])
    assert not (tmp_path / "out").exists()
    # Without choices the method plans as before (the per-matrix strategies).
    fixed = lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="global", strategy_config=LowRankPlusSparseConfig(whiten=True))
    assert fixed.ranks == lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="global").ranks
    assert "layer_options" not in fixed.details


def test_plan_cli_shows_each_layers_share(tmp_path, fixture_path, calib_text, capsys):
    from lowrank.cli.main import run

    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text[:20000])
    out = tmp_path / "plan.json"
    common = ["plan", str(fixture_path), "--method", "lowrank-sparse", "--allocate", "global", "--ratio", "0.4", "--calib", str(calib)]
    common += ["--include", r"layers\.0\.self_attn\.[qk]_proj", "--num-samples", "2", "--seq-len", "32"]
    code = run(common + ["--option", "sparse_choices=0,0.5", "--option", "iterations=1", "--option", "whiten=true", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "sparse_fraction=" in printed and "predicted loss increase" in printed
    saved = lowrank.allocation.Plan.from_dict(json.loads(out.read_text()))
    assert len(saved.details["layer_options"]) == len(saved.ranks) == 2
    assert code == 0 and run(common + ["--option", "sparse_choices=0,1.5"]) == 2
    error = capsys.readouterr().err
    assert "sparse_choices" in error and error.count("\n") == 1


def test_method_config_is_how_any_caller_passes_the_options(calibrated):
    # allocate(method_config=) reaches a method that plans itself, leaves strategy_config to the
    # strategy, and is ignored by a method the per-matrix strategies plan: callers need no branch.
    model, stats, _, plan = calibrated
    same = lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="global", method_config=CHOICES)
    assert same.ranks == plan.ranks and same.details["layer_options"] == plan.details["layer_options"]
    plain = LowRankPlusSparseConfig(whiten=True)
    assert (
        lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="energy", method_config=plain).ranks
        == lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="energy").ranks
    )
    whiten = lowrank.get_method("whiten").config_class()
    assert (
        lowrank.allocate(model, RATIO, method="whiten", stats=stats, strategy="global", method_config=whiten).ranks
        == lowrank.allocate(model, RATIO, method="whiten", stats=stats, strategy="global").ranks
    )
    with pytest.raises(lowrank.LowrankError, match="takes a LowRankPlusSparseConfig"):
        lowrank.allocate(model, RATIO, method="lowrank-sparse", stats=stats, strategy="global", method_config=whiten)
