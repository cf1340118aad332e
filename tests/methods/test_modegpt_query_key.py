"""``modegpt`` with ``attention="query_key"`` (MoDeGPT type II) on a tiny grouped-query Llama: the padded
q/k layers inside a real ``LlamaAttention`` (eager and SDPA, rotary applied) give exactly the attention
of the kept rows, the unit's predicted cost is the output error measured by forward passes, counts are
exact, save → load gives the same logits, and the unit falls back to factored q/k where that predicts less."""

from __future__ import annotations

import pytest
import torch
from tiny_models import calibrated_tiny, tiny_model, token_batches

import lowrank
from lowrank.errors import LowrankError
from lowrank.linalg.weighted import row_weights
from lowrank.methods.modegpt import ModegptConfig, _factored_tails, compress_modegpt_
from lowrank.methods.modegpt_attention import pair_factored_form
from lowrank.methods.modegpt_query_key import find_query_key_units, query_key_errors
from lowrank.nn.head_resized_linear import HeadScatteredLinear, HeadWeight

QUERY_KEY = ModegptConfig(attention="query_key", factored="fisher-whiten", fallback=False)


batches = token_batches


@pytest.fixture(scope="module")
def calibrated():
    return calibrated_tiny("llama")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_scattered_query_key_are_the_kept_rows_inside_the_attention(implementation):
    """Each key head keeps different rotary pairs (i, i + 4); its two query heads keep the same. The model
    with the padded layers gives the logits of a dense one whose q/k rows outside the pairs are zero, and
    zeroing only those query rows gives them too (zero query pairs remove the pairs' rotated products); with
    a dimension kept without its rotary partner (i < 4 kept, i + 4 dropped) zeroing the query rows alone does
    not: the rotation mixes the kept query dimension with the dropped key one."""
    generator = torch.Generator().manual_seed(2)
    dims = torch.tensor([[1, 3, 5, 7], [0, 2, 4, 6]])  # key head 0 keeps pairs 1 and 3, head 1 pairs 0 and 2
    query = HeadScatteredLinear.from_factors(
        HeadWeight(torch.randn(4 * 4, 32, generator=generator), 4, 8, dims.repeat_interleave(2, 0)), None, torch.float32
    )
    key = HeadScatteredLinear.from_factors(HeadWeight(torch.randn(2 * 4, 32, generator=generator), 2, 8, dims), None, torch.float32)
    model, reference, query_only, unpaired, unpaired_query_only = (tiny_model("llama") for _ in range(5))
    for m in (model, reference, query_only, unpaired, unpaired_query_only):
        m.set_attn_implementation(implementation)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        for m in (reference, query_only, unpaired):
            m.model.layers[0].self_attn.q_proj.weight.copy_(query.to_dense())
        reference.model.layers[0].self_attn.k_proj.weight.copy_(key.to_dense())
        query_only.model.layers[0].self_attn.k_proj.weight.copy_(key.to_dense() + torch.randn(16, 32, generator=generator) * (key.to_dense() == 0))
        for projection, heads in (("q_proj", 4), ("k_proj", 2)):
            random = torch.randn(heads * 8, 32, generator=generator)
            for m in (unpaired, unpaired_query_only):
                weight = getattr(m.model.layers[0].self_attn, projection).weight
                weight.copy_(random)
                if projection == "q_proj" or m is unpaired:
                    weight.view(heads, 8, 32)[:, 4:] = 0  # dimensions 0-3 kept, their partners 4-7 dropped
    attention.q_proj, attention.k_proj = query, key
    rows = query.to_dense().unflatten(0, (4, 8)).abs().sum(-1) > 0
    assert rows.tolist() == [[i in dims[j // 2].tolist() for i in range(8)] for j in range(4)]
    input_ids = batches(1, seed=3)[0]["input_ids"]
    mixed = mixed_values(model, input_ids)
    torch.testing.assert_close(mixed, mixed_values(reference, input_ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed, mixed_values(query_only, input_ids), rtol=1e-5, atol=1e-6)
    unpaired_mixed = mixed_values(unpaired, input_ids)
    assert (unpaired_mixed - mixed_values(unpaired_query_only, input_ids)).abs().max() > 1e-2 * unpaired_mixed.abs().max()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)


def mixed_values(model, input_ids: torch.Tensor) -> torch.Tensor:
    """What block 0's attention hands o_proj (the attention-weighted values): sensitive to every logit."""
    captured = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return captured[0]


def projection_outputs(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, q_out), (tokens, k_out) of block ``layer`` on the calibration batches."""
    captured: dict[str, list] = {"q": [], "k": []}
    attention = model.model.layers[layer].self_attn
    handles = [
        attention.q_proj.register_forward_hook(lambda m, args, out: captured["q"].append(out.reshape(-1, out.shape[-1]))),
        attention.k_proj.register_forward_hook(lambda m, args, out: captured["k"].append(out.reshape(-1, out.shape[-1]))),
    ]
    with torch.no_grad():
        for batch in batches():
            model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return torch.cat(captured["q"]).double(), torch.cat(captured["k"]).double()


def measured_cost(dense, stats, shrunk_attention, layer: int, fisher_damp: float) -> float:
    """½·(Σ_t ‖√F_q·Δq_t‖² + Σ_t ‖√F_k·Δk_t‖²) / 2 / tokens, by forward passes of the dense model with only
    this block's q_proj and k_proj swapped for the shrunk ones."""
    swapped = tiny_model("llama")
    swapped.load_state_dict(dense.state_dict())
    attention = swapped.model.layers[layer].self_attn
    attention.q_proj, attention.k_proj = shrunk_attention.q_proj, shrunk_attention.k_proj
    (q, k), (q_new, k_new) = projection_outputs(dense, layer), projection_outputs(swapped, layer)
    name = f"model.layers.{layer}.self_attn"
    query_weights = row_weights(stats[f"{name}.q_proj"].output_fisher, fisher_damp)
    key_weights = row_weights(stats[f"{name}.k_proj"].output_fisher, fisher_damp)
    errors = (query_weights * (q - q_new)).pow(2).sum() + (key_weights * (k - k_new)).pow(2).sum()
    return 0.5 * errors.item() / 2 / q.shape[0]


def test_plan_counts_and_predicted_cost_are_exact(calibrated):
    """Uniform at 0.4: every head keeps ⌊0.6·4⌋ = 2 of its 4 rotary pairs; the report's parameters and
    bits match an independent count (the masks: one byte per head dimension), and each unit's predicted
    cost is the one measured on q_proj's and k_proj's outputs in forward passes."""
    dense, stats = calibrated
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="uniform", strategy_config=QUERY_KEY)
    report = compress_modegpt_(model, plan, stats, QUERY_KEY, progress=False)
    units = plan.details["modegpt"]["query_key"]
    assert sorted(units) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    expected, masks = 0, 0
    for name, (out_features, in_features) in plan.shapes.items():
        unit = next((entry for entry in units.values() if name in entry["members"]), None)
        mlp = next((entry for entry in plan.details["modegpt"]["units"].values() if name in entry["members"]), None)
        if unit is not None:
            assert unit["pairs"] == 2 and unit["head_dim"] == 4 and plan.ranks[name] == 4
            heads = 4 if name.endswith("q_proj") else 2
            expected += heads * 4 * 32
            masks += heads * 8
        elif mlp is not None:
            expected += mlp["neurons"] * 32
        else:
            expected += plan.ranks[name] * (out_features + in_features)
    assert report.parameters["targeted_after"] == plan.planned_parameters == expected
    assert report.parameters["targeted_bits_after"] == 32 * expected + 8 * masks
    for layer, (name, entry) in enumerate(units.items()):
        attention = model.get_submodule(name)
        assert isinstance(attention.q_proj, HeadScatteredLinear) and isinstance(attention.k_proj, HeadScatteredLinear)
        assert torch.equal(attention.q_proj.kept_mask, attention.k_proj.kept_mask.repeat_interleave(2, 0))
        assert (attention.k_proj.kept_mask[:, :4] == attention.k_proj.kept_mask[:, 4:]).all()  # whole rotary pairs
        assert measured_cost(dense, stats, attention, layer, QUERY_KEY.fisher_damp) == pytest.approx(entry["predicted_error"], rel=1e-4)


def test_units_of_different_sizes_save_and_load_with_the_same_logits(calibrated, tmp_path):
    _, stats = calibrated
    model = tiny_model("llama")
    config = ModegptConfig(attention="all", factored="fisher-whiten", fallback=False)
    plan = lowrank.allocate(model, 0.3, method="modegpt", stats=stats, strategy="uniform", strategy_config=config)
    for entry, pairs in zip(plan.details["modegpt"]["query_key"].values(), (1, 3)):
        entry.update(pairs=pairs, head_dim=2 * pairs)
        plan.ranks.update(dict.fromkeys(entry["members"], 2 * pairs))
    report = compress_modegpt_(model, plan, stats, config, progress=False)
    assert model.model.layers[0].self_attn.q_proj.kept == 2 and model.model.layers[1].self_attn.k_proj.kept == 6
    assert type(model.model.layers[0].self_attn.v_proj).__name__ == "HeadPaddedLinear"  # type III beside it
    lowrank.save(model, tmp_path / "saved", report=report)
    loaded, loaded_report = lowrank.load(tmp_path / "saved", return_report=True)
    assert loaded.model.layers[1].self_attn.k_proj.spec() == {"heads": 2, "head_dim": 8, "kept": 6}
    assert torch.equal(loaded.model.layers[1].self_attn.k_proj.kept_mask, model.model.layers[1].self_attn.k_proj.kept_mask)
    assert loaded_report.parameters == report.parameters
    input_ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
        generated = loaded.generate(input_ids[:1, :8], max_new_tokens=4, do_sample=False)  # with a KV cache
        assert torch.equal(generated, model.generate(input_ids[:1, :8], max_new_tokens=4, do_sample=False))


def test_never_worse_than_the_factored_pair():
    """Block 0's q/k rows are zero outside two rotary pairs per head, so keeping those is exact while the
    factored pair (rank ≥ 16 for q_proj) is not; block 1's q_proj and k_proj have rank 2, which the factored
    pair holds (nearly) exactly from one pair's parameters on while dropping pairs costs. Block 0 is shrunk;
    block 1, dominated, leaves the unit and its layers are factored at their own ranks."""
    dense = tiny_model("llama")
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for projection, heads in (("q_proj", 4), ("k_proj", 2)):
            weight = getattr(dense.model.layers[0].self_attn, projection).weight
            weight.view(heads, 8, 32)[:, [1, 2, 5, 6]] = 0  # keep pairs (0, 4) and (3, 7)
            weight = getattr(dense.model.layers[1].self_attn, projection).weight
            weight.copy_(torch.randn(heads * 8, 2, generator=generator) @ torch.randn(2, 32, generator=generator))
    stats = lowrank.collect_statistics(dense, batches(), lowrank.find_targets(dense), gradients=True, progress=False)
    model = tiny_model("llama")
    model.load_state_dict(dense.state_dict())
    config = ModegptConfig(attention="query_key", factored="fisher-whiten")
    plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="uniform", strategy_config=config)
    compress_modegpt_(model, plan, stats, config, progress=False)
    units = plan.details["modegpt"]["query_key"]
    first, second = units["model.layers.0.self_attn"], units["model.layers.1.self_attn"]
    assert first["structure"] == "modegpt" and first["pairs"] == 2 and first["predicted_error"] < 1e-12 < first["factored_predicted_error"]
    assert model.model.layers[0].self_attn.k_proj.kept_mask[0].tolist() == [True, False, False, True] * 2
    assert measured_cost(dense, stats, model.model.layers[0].self_attn, 0, config.fisher_damp) < 1e-12
    # Block 1 is dominated (factored predicts less at every size): q_proj and k_proj are sized as two layers.
    assert second["structure"] == "fisher-whiten" and second["dominated"] and second["pairs"] is None
    assert all(type(model.get_submodule(name)).__name__ == "LowRankLinear" and plan.ranks[name] >= 1 for name in second["members"])
    unit = find_query_key_units(dense, second["members"])[0]
    curves = _factored_tails(dense, list(unit.members), stats, "fisher-whiten")
    shrunk, factored = query_key_errors(dense, unit, stats, config.fisher_damp), pair_factored_form(dense, unit, curves)
    assert (factored.errors[1:-1] <= shrunk[1:-1]).all() and (shrunk[1:-1] > 1e-9).all()


def test_bad_input_is_a_one_line_error(calibrated):
    _, stats = calibrated
    with pytest.raises(LowrankError, match="attention must be one of factored, value, query_key, all"):
        lowrank.allocate(tiny_model("llama"), 0.4, method="modegpt", stats=stats, strategy_config=ModegptConfig(attention="qk"))
    with pytest.raises(LowrankError, match="needs the kept positions"):
        HeadScatteredLinear.from_factors(HeadWeight(torch.ones(4, 3), 2, 4), None, torch.float32)
    with pytest.raises(LowrankError, match="ascend strictly"):
        HeadScatteredLinear.from_factors(HeadWeight(torch.ones(4, 3), 2, 4, torch.tensor([[2, 0], [1, 3]])), None, torch.float32)
    qwen = tiny_model("qwen2")
    assert find_query_key_units(qwen, lowrank.find_targets(qwen)) == []  # q_proj and k_proj have biases


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_global_plans_are_never_worse_with_query_key_units(calibrated, ratio):
    """Per-unit fallback alone let the pair steps of q/k units cost the knapsack a worse plan (on this
    model at 0.3–0.6, as on SmolLM2 at 0.4): the plan with them is kept only if it predicts no more."""
    dense, stats = calibrated
    predicted = {}
    for attention in ("factored", "query_key", "value", "all"):
        config = ModegptConfig(attention=attention, factored="fisher-whiten")
        plan = lowrank.allocate(dense, ratio, method="modegpt", stats=stats, strategy="global", strategy_config=config)
        predicted[attention] = plan.predicted_error
    assert predicted["query_key"] <= predicted["factored"] and predicted["all"] <= predicted["value"]


def test_a_plan_that_leaves_query_key_out_is_the_plan_without_them_from_one_set_of_curves(calibrated, monkeypatch):
    """The plan without q/k units is sized from the curves already made (the factored tails once per plan),
    and is exactly the plan made without type II from the start."""
    import lowrank.methods.modegpt as modegpt

    dense, stats = calibrated
    calls = []
    monkeypatch.setattr(modegpt, "_factored_tails", lambda *args: calls.append(args[1]) or _factored_tails(*args))
    left_out = 0
    for ratio in (0.3, 0.4, 0.5, 0.6):
        for attention, without in (("query_key", "factored"), ("all", "value")):
            calls.clear()
            plan = lowrank.allocate(dense, ratio, method="modegpt", stats=stats, strategy="global",
                                    strategy_config=ModegptConfig(attention=attention, factored="fisher-whiten"))  # fmt: skip
            assert len(calls) == 1
            if "query_key_left_out" not in plan.details["modegpt"]:
                continue
            left_out += 1
            reference = lowrank.allocate(dense, ratio, method="modegpt", stats=stats, strategy="global",
                                         strategy_config=ModegptConfig(attention=without, factored="fisher-whiten"))  # fmt: skip
            assert plan.ranks == reference.ranks and plan.predicted_error == reference.predicted_error
            assert plan.details["planned_parameters"] == reference.details["planned_parameters"]
            details = {key: value for key, value in plan.details["modegpt"].items() if key != "query_key_left_out"}
            assert details == reference.details["modegpt"]
            assert plan.details["modegpt"]["query_key_left_out"]["predicted_error"] > plan.predicted_error
    assert left_out > 0
