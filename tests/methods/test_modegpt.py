"""``modegpt`` (MoDeGPT type I) on a real transformers Llama: the unit's error is the closed-form
Nyström residual measured by forward passes, budgets and counts are exact, it is never worse than its
factored form, and its saves load (lowrank, plain transformers with remote code, and a plain
transformers checkpoint when every MLP keeps the same size)."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import tiny_model

import lowrank
from lowrank.errors import LowrankError
from lowrank.linalg.nystrom import leverage_order, nested_residuals
from lowrank.linalg.weighted import row_weights
from lowrank.methods.modegpt import FactoredForm, MlpUnit, ModegptConfig, _factored_form, compress_modegpt_, find_mlp_units, modegpt_plan, save_transformers
from lowrank.nn import LowRankLinear, find_targets
from lowrank.nn.resized_linear import ResizedLinear as Resized

MLP_ONLY = [r"\.mlp\."]


def calibration_batches(count: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 128, (4, 32), generator=generator)), "labels": ids} for _ in range(count)]


def calibrated(model, gradients: bool = True):
    return lowrank.collect_statistics(model, calibration_batches(), lowrank.find_targets(model), gradients=gradients, progress=False)


def mlp_inputs(model, layer: int) -> torch.Tensor:
    """(tokens, hidden) what the MLP of block ``layer`` reads on the calibration batches (dense model)."""
    captured = []
    handle = model.model.layers[layer].mlp.register_forward_hook(lambda module, args, output: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in calibration_batches():
            model(input_ids=batch["input_ids"])
    handle.remove()
    return torch.cat(captured)


def test_shrunk_mlp_error_is_the_closed_form_nystrom_residual():
    """Forward passes through the dense and the shrunk MLP on the calibration tokens give exactly the
    residual tr(W_d·(C − Ĉ_S)·W_dᵀ) that planning predicted from the statistics alone."""
    dense = tiny_model("llama")
    stats = calibrated(dense, gradients=False)
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.3, method="modegpt", stats=stats, include=MLP_ONLY, strategy_config=ModegptConfig(fallback=False))
    compress_modegpt_(model, plan, stats, ModegptConfig(fallback=False), progress=False)
    for layer in range(2):
        unit = find_mlp_units(dense, lowrank.find_targets(dense))[layer]
        kept = plan.details["modegpt"]["units"][unit.name]["neurons"]
        assert kept == int(0.7 * 64) // 8 * 8 and isinstance(model.get_submodule(unit.down), Resized)
        x = mlp_inputs(dense, layer)
        with torch.no_grad():
            measured = (dense.model.layers[layer].mlp(x).double() - model.model.layers[layer].mlp(x).double()).pow(2).sum().item()
        down = stats[unit.down]
        order = leverage_order(down.xtx, ModegptConfig().ridge)
        predicted = nested_residuals(dense.get_submodule(unit.down).weight, down.xtx, order)[kept].item()
        assert measured == pytest.approx(predicted, rel=1e-3)
        assert down.num_tokens == x.shape[0]


@pytest.fixture(scope="module")
def global_run():
    dense = tiny_model("llama")
    stats = calibrated(dense)
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="global")
    report = compress_modegpt_(model, plan, stats, progress=False)
    return dense, stats, model, plan, report


def test_global_plan_meets_the_budget_and_the_counts_are_exact(global_run):
    _, _, _, plan, report = global_run
    units = plan.details["modegpt"]["units"]
    assert len(units) == 2 and all(entry["structure"] == "modegpt" for entry in units.values())
    assert all(entry["neurons"] % 8 == 0 for entry in units.values())  # multiple_of=8: the fast kernel shapes
    # Independent count from the plan: k·3·hidden per shrunk MLP, rank·(in + out) per factored layer.
    expected = 0
    for name, (out_features, in_features) in plan.shapes.items():
        unit = next((entry for entry in units.values() if name in entry["members"]), None)
        if unit is not None:
            expected += unit["neurons"] * 32
        elif name in plan.ranks:
            expected += plan.ranks[name] * (out_features + in_features)
        else:
            expected += out_features * in_features
    before = sum(out * inp for out, inp in plan.shapes.values())
    assert report.parameters["targeted_before"] == before
    assert report.parameters["targeted_after"] == expected <= int(0.6 * before)
    assert plan.planned_parameters == expected and plan.achieved_ratio == 1 - expected / before  # what `lowrank plan` prints
    assert report.parameters["targeted_bits_after"] == 32 * expected
    assert report.parameters["model_before"] - report.parameters["model_after"] == before - expected


def fisher_weighted_mlp_error(dense, model, stats, layer: int) -> float:
    """½·Σ_o f_o Σ_t Δy_o² / tokens: the MLP's measured predicted-loss error, by forward passes."""
    x = mlp_inputs(dense, layer)
    weights = row_weights(stats[f"model.layers.{layer}.mlp.down_proj"].output_fisher).pow(2)
    with torch.no_grad():
        difference = dense.model.layers[layer].mlp(x).double() - model.model.layers[layer].mlp(x).double()
    return 0.5 * (difference.pow(2) * weights).sum().item() / x.shape[0]


def test_never_worse_than_whiten_at_the_same_parameters(global_run):
    """Predicted: below the best split of the same parameters among the three whitened layers. Measured
    by forward passes on the calibration tokens: each shrunk MLP's loss-weighted output error is
    below that of the same MLP with its three layers whitened at the equal rank its parameters buy."""
    dense, stats, model, plan, _ = global_run
    for layer, (name, entry) in enumerate(plan.details["modegpt"]["units"].items()):
        assert entry["predicted_error"] <= entry["factored_predicted_error"]
        kept = entry["neurons"]
        rank = kept * 32 // (32 + 64)
        whitened = tiny_model("llama")
        members = entry["members"]
        factored_plan = lowrank.Plan(ratio=0.4, strategy="uniform", shapes={n: plan.shapes[n] for n in members}, ranks=dict.fromkeys(members, rank))
        lowrank.compress_(whitened, factored_plan, method="whiten", stats=stats, progress=False)
        shrunk = fisher_weighted_mlp_error(dense, model, stats, layer)
        assert shrunk == pytest.approx(entry["predicted_error"], rel=1e-3)
        assert shrunk < fisher_weighted_mlp_error(dense, whitened, stats, layer)


def test_unit_falls_back_to_its_factored_form_when_that_predicts_less(caplog):
    """Block 0's MLP weights are rank 2: whitened factors of rank ≥ 2 are exact, dropping neurons is not."""
    dense = tiny_model("llama")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = dense.model.layers[0].mlp.get_submodule(name)
            out, inp = layer.weight.shape
            layer.weight.copy_(torch.randn(out, 2, generator=generator) @ torch.randn(2, inp, generator=generator))
    stats = calibrated(dense)
    model = tiny_model("llama")
    model.load_state_dict(dense.state_dict())
    with caplog.at_level(logging.INFO, logger="lowrank.methods.modegpt"):
        plan = modegpt_plan(model, 0.3, stats, strategy="uniform")
    units = plan.details["modegpt"]["units"]
    assert units["model.layers.0.mlp"]["structure"] == "whiten" and units["model.layers.1.mlp"]["structure"] == "modegpt"
    assert "model.layers.0.mlp keeps its 64 neurons and is factored with whiten at ranks" in caplog.text
    report = compress_modegpt_(model, plan, stats, progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, LowRankLinear) and isinstance(model.model.layers[1].mlp.down_proj, Resized)
    ranks = [report.modules[f"model.layers.0.mlp.{name}"]["rank"] for name in ("gate_proj", "up_proj", "down_proj")]
    assert min(ranks) >= 1 and sum(ranks) == int(0.7 * 64) // 8 * 8 * 3 * 32 // (32 + 64)  # every component the 40 neurons' parameters buy (multiple_of=8)


def test_factored_form_splits_the_budget_as_brute_force_does():
    """The best split of R rank-one components among three layers (each ≥ 1) from their error curves, by enumeration."""
    generator = torch.Generator().manual_seed(4)
    unit = MlpUnit("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", hidden=4, neurons=8)
    gains = [torch.rand(6, generator=generator, dtype=torch.float64).sort(descending=True).values * scale for scale in (1.0, 3.0, 0.5)]
    form = FactoredForm(unit, gains)
    total = sum(g.sum().item() for g in gains)
    for kept in range(unit.neurons + 1):
        components = unit.factored_ranks(kept)
        splits = [s for s in itertools.product(range(1, 7), repeat=3) if sum(s) <= components]
        if not splits:
            assert form.errors[kept] == float("inf")
            continue
        best = min(total - sum(g[:r].sum().item() for g, r in zip(gains, split)) for split in splits)
        assert form.errors[kept].item() == pytest.approx(best, abs=1e-12)
        split = form.ranks(kept)
        assert total - sum(g[: split[name]].sum().item() for g, name in zip(gains, unit.members)) == pytest.approx(best, abs=1e-12)


def test_factored_form_errors_are_the_members_whole_errors_at_its_ranks():
    """Gains stop at each layer's largest factored rank; the error beyond it stays in every size's error."""
    model = tiny_model("llama")
    unit = find_mlp_units(model, find_targets(model))[0]
    generator = torch.Generator().manual_seed(5)
    tails = {}
    for name in unit.members:
        out_features, in_features = model.get_submodule(name).weight.shape
        gains = torch.rand(min(out_features, in_features), generator=generator, dtype=torch.float64).sort(descending=True).values
        tails[name] = torch.cat([gains.flip(0).cumsum(0).flip(0), gains.new_zeros(1)])  # error at rank r, 0 at full rank
    form = _factored_form(model, unit, tails)
    finite = [k for k in range(unit.neurons + 1) if form.errors[k] < float("inf")]
    assert finite
    for kept in finite:
        ranks = form.ranks(kept)
        assert form.errors[kept].item() == pytest.approx(sum(tails[name][ranks[name]].item() for name in unit.members), rel=1e-12)


REMOTE_LOADER = """
import sys
sys.modules["lowrank"] = None  # only the directory's own code can run
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_save_load_and_remote_code_give_the_same_logits(global_run, tmp_path):
    _, _, model, _, report = global_run
    lowrank.save(model, tmp_path / "saved", report=report)
    loaded, loaded_report = lowrank.load(tmp_path / "saved", return_report=True)
    input_ids = calibration_batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
    assert loaded_report.parameters == report.parameters and loaded_report.method == "modegpt"
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["lowrank"]["layers"]["model.layers.0.mlp.gate_proj"]["structure"] == "ResizedLinear"
    torch.save(input_ids, tmp_path / "input_ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOADER, str(tmp_path / "saved"), str(tmp_path / "input_ids.pt"), str(tmp_path / "logits.pt")],
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_uniform_mlp_only_model_is_a_plain_transformers_checkpoint(tmp_path):
    model = tiny_model("llama")
    stats = calibrated(model, gradients=False)
    config = ModegptConfig(fallback=False)
    plan = lowrank.allocate(model, 0.25, method="modegpt", stats=stats, include=MLP_ONLY, strategy_config=config)
    compress_modegpt_(model, plan, stats, config, progress=False)
    save_transformers(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / "lowrank_config.json").exists()
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert saved["intermediate_size"] == 48 and "auto_map" not in saved and "lowrank" not in saved
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert all(
        type(layer) is torch.nn.Linear
        for layer in plain.model.layers[0].mlp.children()
        if isinstance(layer, torch.nn.Module) and hasattr(layer, "weight")
    )
    input_ids = calibration_batches(1, seed=6)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    assert model.config.intermediate_size == 64  # the compressed model itself is left as it was


def test_bad_input_is_a_one_line_error(global_run, tmp_path):
    _, stats, model, _, _ = global_run
    fresh = tiny_model("llama")
    plan = lowrank.allocate(fresh, 0.4, method="modegpt", stats=stats)
    with pytest.raises(LowrankError, match="modegpt shrinks whole MLPs"):
        lowrank.get_method("modegpt").factorize(torch.zeros(4, 4), None, 2, ModegptConfig(), "layer")
    with pytest.raises(LowrankError, match="not made for modegpt"):
        compress_modegpt_(fresh, lowrank.allocate(fresh, 0.4, method="whiten"), stats, progress=False)
    with pytest.raises(LowrankError, match="uniform or global"):
        lowrank.allocate(fresh, 0.4, method="modegpt", stats=stats, strategy="energy")
    with pytest.raises(LowrankError, match="selection"):
        lowrank.allocate(fresh, 0.4, method="modegpt", stats=stats, strategy_config=ModegptConfig(selection="random"))
    with pytest.raises(LowrankError, match="calibration statistics"):
        lowrank.allocate(fresh, 0.4, method="modegpt")
    with pytest.raises(LowrankError, match="already compressed"):
        compress_modegpt_(model, plan, stats, progress=False)
    with pytest.raises(LowrankError, match="plain transformers cannot hold"):
        save_transformers(model, tmp_path / "plain")  # its attention layers are factored
    gpt2 = tiny_model("gpt2")
    with pytest.raises(LowrankError, match="no gated MLP"):
        lowrank.allocate(gpt2, 0.4, method="modegpt", stats=calibrated(gpt2, gradients=False))


@pytest.mark.slow
def test_compress_verb_and_cli_run_modegpt(global_run, tmp_path, capsys):
    from shared_data import CALIB, needs_shared

    from lowrank.blockwise import compress_blockwise
    from lowrank.cli.main import run

    dense, stats, model, plan, _ = global_run
    again = tiny_model("llama")
    report = lowrank.compress_(again, plan, method="modegpt", stats=stats, progress=False)  # the same verb as every method
    assert report.method == "modegpt"
    input_ids = calibration_batches(1, seed=7)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(LowrankError, match="without --blockwise"):
        compress_blockwise(tmp_path / "dense", tmp_path / "blockwise", 0.4, method="modegpt", batches=calibration_batches(), progress=False)
    needs_shared()
    fixture = CALIB.parents[1] / "fixtures" / "pycode-llama"
    out = tmp_path / "modegpt-30"
    # No --method: on a causal LM with gated MLPs, in memory, with 64 × 256 calibration tokens, the default recipe is modegpt types I + III.
    code = run(["compress", str(fixture), "--ratio", "0.3", "--calib", str(CALIB), "--num-samples", "64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    loaded, saved = lowrank.load(out, return_report=True)
    assert saved.method == "modegpt" and saved.plan.strategy == "global"
    assert (saved.method_config["factored"], saved.method_config["attention"], saved.method_config["value_metric"]) == ("fisher-whiten", "value", "o_proj")
    assert any(isinstance(module, Resized) for module in loaded.modules())
    assert 0.28 < 1 - saved.parameters["targeted_after"] / saved.parameters["targeted_before"] < 0.32


def test_sparse_fraction_builds_lowrank_sparse_layers_no_worse_than_the_whitened_optimum():
    """The plan is the low-rank one (same sizes); each factored layer spends a quarter of its budget on
    residual entries, stores no more bits, and its calibration output error tr(ΔW·C·ΔWᵀ) is at most
    the whitened rank-r optimum (Eckart–Young on C's root, in numpy)."""
    import numpy as np
    from references import reduced_rank_optimum

    from lowrank.nn import LowRankPlusSparseLinear

    dense = tiny_model("llama")
    stats = calibrated(dense)
    plain, sparse = ModegptConfig(factored="fisher-whiten"), ModegptConfig(factored="fisher-whiten", sparse_fraction=0.25)
    plan = lowrank.allocate(dense, 0.5, method="modegpt", stats=stats, strategy="global", strategy_config=sparse)
    assert plan.ranks == lowrank.allocate(dense, 0.5, method="modegpt", stats=stats, strategy="global", strategy_config=plain).ranks
    reports = {}
    for name, config in (("plain", plain), ("sparse", sparse)):
        model = tiny_model("llama")
        reports[name] = (model, compress_modegpt_(model, plan, stats, config, progress=False))
    model, report = reports["sparse"]
    factored = [name for name, entry in report.modules.items() if entry["structure"] == "LowRankPlusSparseLinear"]
    assert factored and all(reports["plain"][1].modules[name]["structure"] == "LowRankLinear" for name in factored)
    assert report.parameters["targeted_bits_after"] <= reports["plain"][1].parameters["targeted_bits_after"]
    for name in factored:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankPlusSparseLinear) and layer.num_nonzero > 0
        weight = dense.get_submodule(name).weight.detach().double().numpy()
        eigenvalues, eigenvectors = np.linalg.eigh(stats[name].xtx.double().numpy())
        root = eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None)) @ eigenvectors.T  # inputs whose Gram is C
        delta = weight - layer.to_dense().detach().double().numpy()
        error = np.trace(delta @ stats[name].xtx.double().numpy() @ delta.T)
        assert error <= reduced_rank_optimum(root @ weight.T, root, plan.ranks[name]) * (1 + 1e-4), name
    with pytest.raises(LowrankError, match="sparse_fraction"):
        lowrank.allocate(dense, 0.5, method="modegpt", stats=stats, strategy_config=ModegptConfig(sparse_fraction=1.0))


def test_fisher_greedy_predicts_the_full_fisher_loss_of_the_measured_mlp_error():
    """selection=fisher-greedy: each shrunk MLP's planned error is ½·tr(G·EᵀE)/tokens, E the dense minus the
    shrunk MLP's outputs on the calibration tokens (forward passes), G the full output Fisher of down_proj;
    the statistics hold G only where gram_layers asks for it, and a plan without G is a one-line error."""
    from lowrank.methods.modegpt import gram_layers, unit_errors

    dense = tiny_model("llama")
    names = lowrank.find_targets(dense)
    config = ModegptConfig(selection="fisher-greedy", fallback=False)
    asked = gram_layers(dense, names, config)
    assert asked == [unit.down for unit in find_mlp_units(dense, names)] and gram_layers(dense, names, ModegptConfig()) == []
    stats = lowrank.collect_statistics(dense, calibration_batches(), names, gradients=True, progress=False, output_gram=asked)
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.3, method="modegpt", stats=stats, include=MLP_ONLY, strategy="global", strategy_config=config)
    compress_modegpt_(model, plan, stats, config, progress=False)
    for layer, unit in enumerate(find_mlp_units(dense, names)):
        kept = plan.details["modegpt"]["units"][unit.name]["neurons"]
        assert 0 < kept < unit.neurons
        x = mlp_inputs(dense, layer)
        with torch.no_grad():
            error = dense.model.layers[layer].mlp(x).double() - model.model.layers[layer].mlp(x).double()
        down = stats[unit.down]
        fisher = down.output_fisher_matrix
        measured = 0.5 * torch.trace(fisher @ error.T @ error).item() / x.shape[0]
        # The planned curve carries the damping fisher_damp (1e-6 of G's mean diagonal) on top.
        assert unit_errors(dense, unit, stats, config)[kept].item() == pytest.approx(measured, rel=1e-4)
        # Different from the diagonal weighting's order: the off-diagonal Fisher changes which neurons stay.
        assert not torch.equal(fisher, torch.diag(fisher.diagonal()))
    with pytest.raises(LowrankError, match="fisher-greedy.*output_gram"):
        lowrank.allocate(tiny_model("llama"), 0.3, method="modegpt", stats=calibrated(tiny_model("llama")), strategy="global", strategy_config=config)


def test_a_greedy_plan_carries_its_neuron_order_and_compress_keeps_what_it_says():
    """The greedy order (O(n³) per MLP) is computed once: the plan keeps each shrunk MLP's order, through
    its JSON form, and compress builds from it (a reversed order keeps the other neurons, in the one-shot
    and the sequential path alike); leverage plans carry none, and an order that is no permutation is a
    one-line error."""
    from lowrank.allocation.plan import Plan
    from lowrank.methods.modegpt import neuron_order
    from lowrank.nn import linear_weight

    dense = tiny_model("llama")
    stats = calibrated(dense)
    config = ModegptConfig(selection="greedy", fallback=False)
    plan = lowrank.allocate(dense, 0.3, method="modegpt", stats=stats, include=MLP_ONLY, strategy="global", strategy_config=config)
    units = find_mlp_units(dense, lowrank.find_targets(dense))
    entries = plan.details["modegpt"]["units"]
    for unit in units:
        assert entries[unit.name]["order"] == neuron_order(dense, unit, stats, config).tolist()
    leverage = lowrank.allocate(dense, 0.3, method="modegpt", stats=stats, include=MLP_ONLY, strategy="global", strategy_config=ModegptConfig(fallback=False))
    assert all("order" not in entry for entry in leverage.details["modegpt"]["units"].values())

    reversed_plan = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    for entry in reversed_plan.details["modegpt"]["units"].values():
        entry["order"] = entry["order"][::-1]
    model = tiny_model("llama")
    compress_modegpt_(model, reversed_plan, stats, config, progress=False)
    for unit in units:
        entry = reversed_plan.details["modegpt"]["units"][unit.name]
        kept = torch.tensor(sorted(entry["order"][: entry["neurons"]]))
        assert not torch.equal(kept, torch.tensor(sorted(entries[unit.name]["order"][: entry["neurons"]])))
        assert torch.equal(linear_weight(model.get_submodule(unit.gate)).detach(), linear_weight(dense.get_submodule(unit.gate)).detach()[kept])
    # The sequential path refits the kept rows, so it is checked against itself: the order changes what it builds.
    sequential = {}
    for name, used in (("planned", plan), ("reversed", reversed_plan)):
        sequential[name] = tiny_model("llama")
        compress_modegpt_(sequential[name], used, stats, config, progress=False, sequential=calibration_batches())
    for unit in units:
        gates = [linear_weight(model.get_submodule(unit.gate)).detach() for model in sequential.values()]
        assert gates[0].shape == gates[1].shape and not torch.allclose(*gates)

    for entry in reversed_plan.details["modegpt"]["units"].values():
        entry["order"] = entry["order"][1:]
    with pytest.raises(LowrankError, match="not a permutation of its .* neurons; plan again"):
        compress_modegpt_(tiny_model("llama"), reversed_plan, stats, config, progress=False)


@pytest.mark.slow
def test_cli_collects_the_full_fisher_that_fisher_greedy_reads(tmp_path, capsys):
    """``lowrank compress --method modegpt --option selection=fisher-greedy`` and ``lowrank plan`` calibrate
    with the down_proj Fisher matrices (without them the plan would be the one-line error above)."""
    from shared_data import CALIB, needs_shared

    from lowrank.cli.main import run

    from lowrank.models import load_tokenizer
    from tiny_models import tiny_config

    needs_shared()
    # A tiny Llama with the reference model's tokenizer: the greedy order costs O(n³) per MLP, which the
    # reference model's 768 neurons would make seconds.
    fixture = tmp_path / "tiny"
    config = tiny_config("llama")
    config.vocab_size = 8192
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(fixture)
    load_tokenizer(CALIB.parents[1] / "fixtures" / "pycode-llama").save_pretrained(fixture)
    common = ["--calib", str(CALIB), "--num-samples", "8", "--method", "modegpt", "--allocate", "global", "--option", "selection=fisher-greedy"]
    out = tmp_path / "fisher-greedy"
    assert run(["compress", str(fixture), "--ratio", "0.4", *common, "--out", str(out)]) == 0, capsys.readouterr().err
    loaded, saved = lowrank.load(out, return_report=True)
    assert saved.method_config["selection"] == "fisher-greedy"
    assert any(isinstance(module, Resized) for module in loaded.modules())
    assert run(["plan", str(fixture), "--ratio", "0.4", *common]) == 0, capsys.readouterr().err
