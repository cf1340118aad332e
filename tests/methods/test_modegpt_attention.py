"""``modegpt`` with ``attention="value"`` (MoDeGPT type III) on a tiny grouped-query Llama: the closed
form is the best rank-k value→output map (against the SVD of the full map and alternating least
squares), the built layers compute exactly that map inside the attention (GQA layout), counts are
exact, units of different sizes save and load with the same logits, and the factored fallback is
the best split by enumeration and is taken whenever it predicts less. In o_proj's metric
(``value_metric="o_proj"``) the predicted error is the block's output error measured by forward passes."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import calibrated_tiny, tiny_model, token_batches

import lowrank
from lowrank.errors import LowrankError
from lowrank.linalg.value_output import nested_output_errors, refit_output, value_output_decomposition
from lowrank.linalg.weighted import row_weights
from lowrank.methods.modegpt import ModegptConfig, compress_modegpt_
from lowrank.methods.modegpt_attention import AttentionUnit, PairFactoredForm, find_attention_units, pair_factored_form
from lowrank.nn import find_targets
from lowrank.nn.head_resized_linear import HeadPaddedLinear, HeadSlicedLinear, HeadWeight

VALUE = ModegptConfig(attention="value", factored="fisher-whiten")


batches = token_batches


@pytest.fixture(scope="module")
def calibrated():
    return calibrated_tiny("llama")


def alternating_least_squares(m: torch.Tensor, x: torch.Tensor, kept: int, seed: int, steps: int = 200) -> float:
    """min over O' (rows × k), P (k × in) of ‖(M − O'·P)·X‖², by alternating exact solves from a random start."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(kept, m.shape[1], generator=generator, dtype=torch.float64)
    c = x @ x.T
    for _ in range(steps):
        o = m @ c @ p.T @ torch.linalg.pinv(p @ c @ p.T)
        p = torch.linalg.pinv(o) @ m  # min_P ‖(M − O P) X‖ for any X: P = O⁺ M
    return ((m - o @ p) @ x).pow(2).sum().item()


@pytest.mark.parametrize("tokens", [20, 4])  # a full-rank and a singular input correlation
def test_closed_form_is_the_best_rank_k_map(tokens):
    """E(k) = Σ_{i>k} σ_i² of the whole weighted map D̃·M·X (Eckart–Young on the big matrix, no QR
    trick, X itself as the root), the factors reach it, and no alternating-least-squares start beats it."""
    generator = torch.Generator().manual_seed(1)
    group, out, head_dim, inputs = 2, 5, 4, 6
    outputs = torch.randn(group * out, head_dim, generator=generator, dtype=torch.float64)
    value = torch.randn(head_dim, inputs, generator=generator, dtype=torch.float64)
    x = torch.randn(inputs, tokens, generator=generator, dtype=torch.float64)
    weights = torch.rand(out, generator=generator, dtype=torch.float64) + 0.1
    stacked_weights = weights.repeat(group)[:, None]
    m = outputs @ value
    sigma = torch.linalg.svdvals(stacked_weights * m @ x)
    symmetric_root = torch.linalg.cholesky(x @ x.T + 1e-300 * torch.eye(inputs, dtype=torch.float64)) if tokens >= inputs else x
    for root in (x, symmetric_root):
        decomposition = value_output_decomposition(outputs, value, root, weights)
        for kept in range(head_dim + 1):
            expected = sigma[kept:].pow(2).sum().item()
            factors = decomposition.factors(kept)
            assert factors.value.shape == (kept, inputs) and factors.outputs.shape == (group * out, kept)
            achieved = (stacked_weights * (m - factors.outputs @ factors.value) @ x).pow(2).sum().item()
            assert decomposition.errors()[kept].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert achieved == pytest.approx(expected, rel=1e-9, abs=1e-9)
            if 0 < kept < head_dim:
                best_search = min(alternating_least_squares(stacked_weights * m, x, kept, seed) for seed in range(4))
                assert achieved <= best_search * (1 + 1e-9) + 1e-9


def test_head_layers_are_the_reduced_map_inside_the_attention():
    """The padded v_proj and sliced o_proj inside a real LlamaAttention give the same output as a
    dense attention holding their to_dense() weights, which are zero outside the kept dimensions."""
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(2)
    value = HeadPaddedLinear.from_factors(HeadWeight(torch.randn(2 * 3, 32, generator=generator), 2, 8), None, torch.float32)
    output = HeadSlicedLinear.from_factors(HeadWeight(torch.randn(32, 4 * 3, generator=generator), 4, 8), None, torch.float32)
    reference = tiny_model("llama")
    with torch.no_grad():
        reference.model.layers[0].self_attn.v_proj.weight.copy_(value.to_dense())
        reference.model.layers[0].self_attn.o_proj.weight.copy_(output.to_dense())
    attention.v_proj, attention.o_proj = value, output
    assert value.to_dense().shape == (16, 32) and (value.to_dense().unflatten(0, (2, 8))[:, 3:] == 0).all()
    assert output.to_dense().shape == (32, 32) and (output.to_dense().unflatten(1, (4, 8))[:, :, 3:] == 0).all()
    input_ids = batches(1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5)


def v_proj_inputs(model, layer: int) -> torch.Tensor:
    """(in, tokens) what v_proj of block ``layer`` reads on the calibration batches."""
    captured = []
    handle = model.model.layers[layer].self_attn.v_proj.register_forward_hook(lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches():
            model(input_ids=batch["input_ids"])
    handle.remove()
    return torch.cat(captured).double().T


def unit_objective(dense, value_dense: torch.Tensor, output_dense: torch.Tensor, layer: int, weights: torch.Tensor) -> float:
    """½·Σ_j Σ_t ‖D·(O_j·V_{g(j)} − O'_j·V'_{g(j)})·x_t‖² / tokens, by brute force over the query heads
    (query head j reads key/value head j // 2 in the tiny model's 4 : 2 grouping)."""
    x = v_proj_inputs(dense, layer)
    attention = dense.model.layers[layer].self_attn
    v, o = attention.v_proj.weight.double(), attention.o_proj.weight.double()
    total = 0.0
    for j in range(4):
        g = j // 2
        original = o[:, j * 8 : (j + 1) * 8] @ v[g * 8 : (g + 1) * 8]
        new = output_dense.double()[:, j * 8 : (j + 1) * 8] @ value_dense.double()[g * 8 : (g + 1) * 8]
        total += (weights[:, None] * (original - new) @ x).pow(2).sum().item()
    return 0.5 * total / x.shape[1]


def test_plan_counts_and_predicted_error_are_exact(calibrated):
    """Uniform at 0.4: every head keeps ⌊0.6·8⌋ = 4 value dims; the report's counts match an independent
    count, and each unit's predicted error is its objective measured by brute force on v_proj's inputs."""
    dense, stats = calibrated
    model = tiny_model("llama")
    config = ModegptConfig(attention="value", factored="fisher-whiten", fallback=False)
    plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="uniform", strategy_config=config)
    report = compress_modegpt_(model, plan, stats, config, progress=False)
    attention = plan.details["modegpt"]["attention"]
    assert sorted(attention) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    expected = 0
    for name, (out_features, in_features) in plan.shapes.items():
        unit = next((entry for entry in attention.values() if name in entry["members"]), None)
        mlp = next((entry for entry in plan.details["modegpt"]["units"].values() if name in entry["members"]), None)
        if unit is not None:
            assert unit["head_dim"] == 4
            expected += 2 * 4 * 32 if name.endswith("v_proj") else 32 * 4 * 4  # kv_heads·k·hidden, hidden·heads·k
        elif mlp is not None:
            expected += mlp["neurons"] * 32
        else:
            expected += plan.ranks[name] * (out_features + in_features)
    assert report.parameters["targeted_after"] == plan.planned_parameters == expected
    assert report.parameters["targeted_bits_after"] == 32 * expected
    assert report.parameters["model_before"] - report.parameters["model_after"] == report.parameters["targeted_before"] - expected
    for layer, (name, entry) in enumerate(attention.items()):
        attention_module = model.get_submodule(name)
        assert isinstance(attention_module.v_proj, HeadPaddedLinear) and isinstance(attention_module.o_proj, HeadSlicedLinear)
        weights = row_weights(stats[f"{name}.o_proj"].output_fisher, config.fisher_damp)
        measured = unit_objective(dense, attention_module.v_proj.to_dense(), attention_module.o_proj.to_dense(), layer, weights)
        assert measured == pytest.approx(entry["predicted_error"], rel=1e-4)


def o_proj_output_error(dense, shrunk_value, shrunk_output, layer: int, weights: torch.Tensor) -> float:
    """½·Σ_t ‖D·(o_proj output of the dense attention − that with only v_proj, o_proj swapped)‖² / tokens, by forward passes."""
    swapped = tiny_model("llama")
    swapped.load_state_dict(dense.state_dict())
    attention = swapped.model.layers[layer].self_attn
    attention.v_proj, attention.o_proj = shrunk_value, shrunk_output
    outputs = []
    for model in (dense, swapped):
        captured = []
        handle = model.model.layers[layer].self_attn.o_proj.register_forward_hook(lambda m, args, out: captured.append(out.reshape(-1, out.shape[-1])))
        with torch.no_grad():
            for batch in batches():
                model(input_ids=batch["input_ids"])
        handle.remove()
        outputs.append(torch.cat(captured).double())
    return 0.5 * (weights * (outputs[0] - outputs[1])).pow(2).sum().item() / outputs[0].shape[0]


def test_o_proj_metric_predicts_the_attention_output_error_exactly(calibrated):
    """value_metric="o_proj": the predicted error is the block's real output error on the calibration
    tokens (attention weights unchanged), measured by forward passes, and below MoDeGPT's v_proj-metric
    reduction measured the same way (it is the least-squares optimum for its T in that metric)."""
    dense, stats = calibrated
    measured = {}
    for metric in ("o_proj", "v_proj"):
        config = ModegptConfig(attention="value", factored="fisher-whiten", fallback=False, value_metric=metric)
        model = tiny_model("llama")
        plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="uniform", strategy_config=config)
        compress_modegpt_(model, plan, stats, config, progress=False)
        for layer, (name, entry) in enumerate(plan.details["modegpt"]["attention"].items()):
            module = model.get_submodule(name)
            weights = row_weights(stats[f"{name}.o_proj"].output_fisher, config.fisher_damp)
            measured[metric, layer] = o_proj_output_error(dense, module.v_proj, module.o_proj, layer, weights)
            if metric == "o_proj":
                assert measured[metric, layer] == pytest.approx(entry["predicted_error"], rel=1e-3)
    for layer in range(2):
        assert measured["o_proj", layer] < measured["v_proj", layer]


@pytest.mark.parametrize("tokens", [40, 6])  # a full-rank and a singular o_proj input correlation
def test_nested_errors_equal_a_refit_at_every_k(tokens):
    # One Cholesky factorization for every k against an independent pseudo-inverse refit per k,
    # with two query heads sharing each key/value head's basis (grouped-query attention).
    generator = torch.Generator().manual_seed(tokens)
    heads, head_dim, out = 4, 6, 10
    output = torch.randn(out, heads * head_dim, generator=generator, dtype=torch.float64)
    z = torch.randn(heads * head_dim, tokens, generator=generator, dtype=torch.float64)
    shared = [torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64) for _ in range(2)]
    bases = [shared[j // 2] for j in range(heads)]
    weights = torch.rand(out, generator=generator, dtype=torch.float64) + 0.1
    errors = nested_output_errors(output, z @ z.T, bases, weights)
    expected = [refit_output(output, z @ z.T, [basis[:kept] * 3.0 for basis in bases], weights)[1] for kept in range(head_dim + 1)]
    torch.testing.assert_close(errors, torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=1e-8 * expected[0])
    assert errors[0] == pytest.approx(((weights[:, None] * output) @ z).pow(2).sum().item())


def test_units_of_different_sizes_save_and_load_with_the_same_logits(calibrated, tmp_path):
    dense, stats = calibrated
    model = tiny_model("llama")
    config = ModegptConfig(attention="value", factored="fisher-whiten", fallback=False)
    plan = lowrank.allocate(model, 0.3, method="modegpt", stats=stats, strategy="uniform", strategy_config=config)
    details = plan.details["modegpt"]
    for (name, entry), kept in zip(details["attention"].items(), (3, 6)):
        entry["head_dim"] = kept
        plan.ranks.update(dict.fromkeys(entry["members"], kept))
    for (name, entry), kept in zip(details["units"].items(), (40, 52)):
        entry["neurons"] = kept
        plan.ranks.update(dict.fromkeys(entry["members"], kept))
    report = compress_modegpt_(model, plan, stats, config, progress=False)
    assert model.model.layers[0].self_attn.v_proj.kept == 3 and model.model.layers[1].self_attn.o_proj.kept == 6
    lowrank.save(model, tmp_path / "saved", report=report)
    loaded, loaded_report = lowrank.load(tmp_path / "saved", return_report=True)
    assert loaded.model.layers[0].self_attn.v_proj.spec() == {"heads": 2, "head_dim": 8, "kept": 3}
    assert loaded_report.parameters == report.parameters
    input_ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
        # and generation with a KV cache runs at the reduced value dims
        generated = loaded.generate(input_ids[:1, :8], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, model.generate(input_ids[:1, :8], max_new_tokens=4, do_sample=False))


def test_pair_factored_form_splits_the_budget_as_brute_force_does():
    """Unequal costs (grouped-query attention): the best (v rank, o rank) within each size's parameters, by enumeration."""
    generator = torch.Generator().manual_seed(4)
    unit = AttentionUnit("attn", "attn.v_proj", "attn.o_proj", hidden=6, heads=4, kv_heads=2, head_dim=3)
    gains = [torch.rand(5, generator=generator, dtype=torch.float64).sort(descending=True).values * scale for scale in (1.0, 2.0)]
    costs = (6 + 6, 6 + 12)
    form = PairFactoredForm(unit, gains, costs)
    total = sum(g.sum().item() for g in gains)
    for kept in range(unit.head_dim + 1):
        splits = [(a, b) for a, b in itertools.product(range(1, 6), repeat=2) if a * costs[0] + b * costs[1] <= kept * unit.step]
        if not splits:
            assert form.errors[kept] == float("inf")
            continue
        best = min(total - gains[0][:a].sum().item() - gains[1][:b].sum().item() for a, b in splits)
        assert form.errors[kept].item() == pytest.approx(best, abs=1e-12)
        ranks = form.ranks(kept)
        a, b = ranks["attn.v_proj"], ranks["attn.o_proj"]
        assert a * costs[0] + b * costs[1] <= kept * unit.step
        assert total - gains[0][:a].sum().item() - gains[1][:b].sum().item() == pytest.approx(best, abs=1e-12)


def test_pair_factored_form_errors_are_the_members_whole_errors_at_its_ranks():
    """Gains stop at each layer's largest factored rank; the error beyond it stays in every size's error."""
    model = tiny_model("llama")
    unit = find_attention_units(model, find_targets(model))[0]
    generator = torch.Generator().manual_seed(5)
    tails = {}
    for name in unit.members:
        gains = torch.rand(min(model.get_submodule(name).weight.shape), generator=generator, dtype=torch.float64).sort(descending=True).values
        tails[name] = torch.cat([gains.flip(0).cumsum(0).flip(0), gains.new_zeros(1)])  # error at rank r
    form = pair_factored_form(model, unit, tails)
    finite = [k for k in range(unit.head_dim + 1) if form.errors[k] < float("inf")]
    assert finite
    for kept in finite:
        ranks = form.ranks(kept)
        assert form.errors[kept].item() == pytest.approx(sum(tails[name][ranks[name]].item() for name in unit.members), rel=1e-12)


def test_never_worse_than_the_factored_pair():
    """Block 0's value heads have rank 2 each, so at 4 kept dims type III is exact while the factored
    pair is only nearly so; block 1 is random, and there (a tiny random model attends almost uniformly, which
    shrinks o_proj's real inputs far below v_proj's) the factored pair predicts less. Each unit keeps the
    form that predicts less, and a shrunk unit's objective, measured by brute force, is that prediction."""
    dense = tiny_model("llama")
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        v = dense.model.layers[0].self_attn.v_proj.weight
        v.copy_(torch.cat([torch.randn(8, 2, generator=generator) @ torch.randn(2, 32, generator=generator) for _ in range(2)]))
    stats = lowrank.collect_statistics(dense, batches(), lowrank.find_targets(dense), gradients=True, progress=False)
    model = tiny_model("llama")
    model.load_state_dict(dense.state_dict())
    plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="uniform", strategy_config=VALUE)
    compress_modegpt_(model, plan, stats, VALUE, progress=False)
    units = plan.details["modegpt"]["attention"]
    first, second = units["model.layers.0.self_attn"], units["model.layers.1.self_attn"]
    assert first["structure"] == "modegpt" and first["head_dim"] == 4 and first["predicted_error"] < 1e-12 <= first["factored_predicted_error"]
    module = model.model.layers[0].self_attn
    assert isinstance(module.v_proj, HeadPaddedLinear)
    weights = row_weights(stats["model.layers.0.self_attn.o_proj"].output_fisher, VALUE.fisher_damp)
    assert unit_objective(dense, module.v_proj.to_dense(), module.o_proj.to_dense(), 0, weights) < 1e-12
    assert second["structure"] == "fisher-whiten" and second["factored_predicted_error"] < second["predicted_error"]
    assert type(model.model.layers[1].self_attn.v_proj).__name__ == "LowRankLinear"
    ranks = [plan.ranks[name] for name in second["members"]]
    assert ranks[0] * (16 + 32) + ranks[1] * (32 + 32) <= 4 * (2 + 4) * 32  # within the 4 value dims' parameters


def test_bad_input_is_a_one_line_error(calibrated):
    _, stats = calibrated
    model = tiny_model("llama")
    with pytest.raises(LowrankError, match="attention must be one of"):
        lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy_config=ModegptConfig(attention="qk"))
    with pytest.raises(LowrankError, match="value_metric must be one of"):
        lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy_config=ModegptConfig(attention="value", value_metric="x"))
    with pytest.raises(LowrankError, match="kept ≤ head_dim"):
        HeadPaddedLinear.empty(32, 16, False, {"heads": 2, "head_dim": 8, "kept": 9})
    with pytest.raises(LowrankError, match="takes heads, head_dim and kept"):
        HeadSlicedLinear.empty(32, 32, False, {"heads": 4})
    assert find_attention_units(tiny_model("qwen2"), lowrank.find_targets(tiny_model("qwen2"))) == []  # v_proj has a bias
