"""``basis-sharing --allocate global``: the all-rank curve against building the layers, the split of a
group's parameters against enumeration, the budget, never more predicted loss than ``fisher-whiten``
+ ``global``, the predicted loss equal to the built model's, save → load, the CLI, refusals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from method_helpers import assert_same_logits, one_thread  # noqa: F401  (fixture)
from tiny_models import tiny_model

import lowrank
from lowrank.allocation.choices import loss_increase
from lowrank.allocation.knapsack import budget_for_ratio
from lowrank.errors import LowrankError
from lowrank.linalg import whitening
from lowrank.linalg.basis_sharing import shared_input_basis, shared_input_errors
from lowrank.linalg.weighted import row_weights
from lowrank.methods.basis_sharing import BasisSharingConfig, SeparateForm
from lowrank.nn import linear_weight
from lowrank.nn.shared_basis_linear import SharedBasisLinear

LAYERS = r"layers\.[0-3]\.(self_attn\.k_proj|mlp\.up_proj|mlp\.down_proj)"


def test_the_all_rank_curve_equals_building_the_layers_and_measuring():
    generator = torch.Generator().manual_seed(0)
    outs, width, tokens = (5, 7, 4), 9, 60
    weights = [torch.randn(out, width, generator=generator, dtype=torch.float64) for out in outs]
    mixes = [torch.randn(width, width, generator=generator, dtype=torch.float64) for _ in outs]
    inputs = [torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mix for mix in mixes]  # each layer its own inputs
    fishers = [torch.rand(out, generator=generator, dtype=torch.float64) + 0.05 for out in outs]
    covariances = [x.T @ x for x in inputs]
    weights_out = [row_weights(f, 0.0) for f in fishers]  # √f exactly
    largest = width
    basis = shared_input_basis(weights, covariances, largest, output_weights=weights_out).basis
    whites = [whitening(c, symmetric=False) for c in covariances]
    curve = shared_input_errors(weights, whites, basis, weights_out, [0.5 / tokens] * len(outs))
    assert curve.shape == (largest + 1,) and torch.all(curve[1:] <= curve[:-1] + 1e-12)
    for rank in (0, 1, 3, 6, largest):
        if rank == 0:
            measured = sum(0.5 * (f * (x @ w.T).pow(2).mean(0)).sum().item() for w, x, f in zip(weights, inputs, fishers))
        else:
            built = shared_input_basis(weights, covariances, rank, output_weights=weights_out)  # the layers compress would build
            measured = sum(
                0.5 * (f * (x @ (w - built.dense(i)).T).pow(2).mean(0)).sum().item() for i, (w, x, f) in enumerate(zip(weights, inputs, fishers))
            )
        assert curve[rank].item() == pytest.approx(measured, rel=1e-7, abs=1e-12), rank
    # Layers reading the same inputs: the Fisher-weighted basis is the exact optimum, below the unweighted one.
    same = [covariances[0]] * len(outs)
    weighted = shared_input_errors(
        weights, [whites[0]] * len(outs), shared_input_basis(weights, same, largest, output_weights=weights_out).basis, weights_out
    )
    unweighted = shared_input_errors(weights, [whites[0]] * len(outs), shared_input_basis(weights, same, largest).basis, weights_out)
    assert torch.all(weighted <= unweighted * (1 + 1e-9) + 1e-9 * weighted[0]) and weighted[3] < unweighted[3] * 0.99


def test_the_separate_split_is_the_best_split_by_enumeration():
    generator = torch.Generator().manual_seed(1)
    gains = [torch.rand(7, generator=generator, dtype=torch.float64).sort(descending=True).values for _ in range(3)]
    form = SeparateForm(["a", "b", "c"], gains, component=10, largest=5)  # ranks 6 and 7 cost more than dense: not offered
    step = 7  # parameters per shared rank: k·7 buys ⌊k·7 / 10⌋ components
    errors = form.errors(step, 20)
    total = sum(g.sum().item() for g in gains)
    for k in range(21):
        components = k * step // 10
        splits = [s for s in itertools.product(range(1, 6), repeat=3) if sum(s) <= components]
        if not splits:
            assert errors[k] == float("inf")
            continue
        best = min(total - sum(g[:r].sum().item() for g, r in zip(gains, s)) for s in splits)
        assert errors[k].item() == pytest.approx(best, abs=1e-12)
        ranks = form.ranks(k * step)
        assert sum(ranks.values()) <= components
        assert total - sum(g[: ranks[n]].sum().item() for g, n in zip(gains, "abc")) == pytest.approx(best, abs=1e-12)


def _batches(count: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, 128, (2, 24), generator=generator)} for _ in range(count)]
    return [batch | {"labels": batch["input_ids"]} for batch in batches]


def _gradient_stats(model):
    return lowrank.collect_statistics(model, _batches(), lowrank.find_targets(model), gradients=True, progress=False)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model = tiny_model("llama")
    return model, _gradient_stats(model)


def _measured_loss(dense, model, stats, names) -> float:
    """½·Σ_o f_o·E[Δy_o²] of the built layers on the calibration inputs (f damped as fisher-whiten damps it)."""
    total = 0.0
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, lowrank.nn.ReplacementLinear):
            continue
        delta = linear_weight(dense.get_submodule(name)).detach().double() - module.to_dense().detach().double()
        root = torch.linalg.cholesky(stats[name].xtx.double() + 1e-12 * torch.eye(delta.shape[1], dtype=torch.float64))
        total += loss_increase(delta, root, row_weights(stats[name].output_fisher, 1e-6).square(), stats[name].num_tokens)
    return total


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_budget_met_prediction_exact_and_never_above_fisher_whiten_global(tiny, ratio, one_thread):  # noqa: F811
    dense, stats = tiny
    plan = lowrank.allocate(dense, ratio, method="basis-sharing", stats=stats, strategy="global")
    reference = lowrank.allocate(dense, ratio, method="fisher-whiten", stats=stats, strategy="global")
    assert plan.predicted_error <= reference.predicted_error * (1 + 1e-9)
    assert plan.planned_parameters <= budget_for_ratio(plan.shapes, ratio)
    model = copy.deepcopy(dense)
    report = lowrank.compress_(model, plan, method="basis-sharing", stats=stats, progress=False)
    by_hand = sum(p.numel() for p in {id(p): p for name in plan.shapes for p in model.get_submodule(name).parameters()}.values())
    assert report.parameters["targeted_after"] == by_hand == plan.planned_parameters  # each basis once; no biases
    assert _measured_loss(dense, model, stats, plan.shapes) == pytest.approx(plan.predicted_error, rel=1e-4)


def test_identical_blocks_share_and_save_load_gives_the_same_logits(tmp_path, one_thread):  # noqa: F811
    model = tiny_model("llama")
    with torch.no_grad():  # block 1 a copy of block 0: one basis serves both, at half the price
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
            model.model.layers[1].get_submodule(name).weight.copy_(model.model.layers[0].get_submodule(name).weight)
    dense = copy.deepcopy(model)
    stats = _gradient_stats(model)
    plan = lowrank.allocate(model, 0.5, method="basis-sharing", stats=stats, strategy="global")
    groups = plan.details["basis_sharing"]["groups"]
    shared = [name for name, entry in groups.items() if entry["structure"] == "basis-sharing"]
    assert "model.layers.0-1.self_attn.q_proj" in shared and "model.layers.0-1.mlp.up_proj" in shared
    assert plan.details["layer_options"]["model.layers.1.mlp.up_proj"] == {"group": "model.layers.0-1.mlp.up_proj", "structure": "basis-sharing"}
    report = lowrank.compress_(model, plan, method="basis-sharing", stats=stats, progress=False)
    up = model.model.layers[1].mlp.up_proj
    assert isinstance(up, SharedBasisLinear) and up.basis is model.model.layers[0].mlp.up_proj.basis
    assert report.parameters["targeted_after"] <= budget_for_ratio(plan.shapes, 0.5)
    assert _measured_loss(dense, model, stats, plan.shapes) == pytest.approx(plan.predicted_error, rel=1e-4)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded, saved = lowrank.load(tmp_path / "out", return_report=True)
    assert_same_logits(model, loaded)
    assert saved.parameters == report.parameters and lowrank.count_parameters(loaded) == report.parameters["model_after"]


def test_bad_input_is_a_one_line_error(tiny):
    dense, stats = tiny
    plain = lowrank.collect_statistics(dense, _batches(1), lowrank.find_targets(dense), progress=False)
    cases = [
        (lambda: lowrank.allocate(dense, 0.4, method="basis-sharing", stats=plain, strategy="global"), "needs gradient statistics"),
        (
            lambda: lowrank.allocate(
                dense, 0.4, method="basis-sharing", stats=stats, strategy="global", strategy_config=BasisSharingConfig(share_outputs="o_proj")
            ),
            "input-side groups only",
        ),
        (
            lambda: lowrank.allocate(dense, 0.4, method="basis-sharing", stats=stats, strategy_config=BasisSharingConfig(factored="fisher-whiten")),
            "--allocate global only",
        ),
        (lambda: lowrank.allocate(dense, 0.4, method="basis-sharing", stats=stats, strategy_config=BasisSharingConfig(factored="svd")), "factored"),
        (lambda: lowrank.allocate(dense, 0.4, method="basis-sharing", stats=stats, strategy="energy"), "uniform or global"),
    ]
    for call, message in cases:
        with pytest.raises(LowrankError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_cli_plan_prints_the_groups_and_compress_global_saves(tmp_path, capsys):
    from shared_data import CALIB, FIXTURE

    from lowrank.cli.main import run as cli

    if not FIXTURE.is_dir():
        pytest.skip(f"reference model not found at {FIXTURE}")
    common = ["--method", "basis-sharing", "--allocate", "global", "--ratio", "0.4", "--calib", str(CALIB), "--num-samples", "4", "--seq-len", "64",
              "--include", LAYERS]  # fmt: skip
    assert cli(["plan", str(FIXTURE), *common]) == 0
    printed = capsys.readouterr().out
    assert "group=model.layers.0-1.self_attn.k_proj" in printed and "predicted loss increase" in printed
    out = tmp_path / "shared-global"
    code = cli(["compress", str(FIXTURE), *common, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    loaded, saved = lowrank.load(out, return_report=True)
    assert saved.method == "basis-sharing" and saved.plan.strategy == "global"
    assert 1 - saved.parameters["targeted_after"] / saved.parameters["targeted_before"] >= 0.4
    shared = [module for module in loaded.modules() if isinstance(module, SharedBasisLinear)]
    groups = saved.plan.details["basis_sharing"]["groups"]
    assert len(shared) == 2 * sum(entry["structure"] == "basis-sharing" for entry in groups.values())
