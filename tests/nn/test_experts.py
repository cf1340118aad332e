import json
import logging

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import tiny_model

import lowrank
from lowrank.errors import LowrankError
from lowrank.models import load_pretrained
from lowrank.nn import LowRankLinear, UnfusedExperts, expert_projection_names, find_fused_experts, fused_state_dict, unfuse_experts

COMMON = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
# Four experts, top-2, hidden 32: gated experts (Qwen2-MoE with a shared expert, Mixtral, Qwen3-MoE) and
# GPT-OSS, whose experts are stored transposed, with biases, and gate with a clamped interleaved GLU.
CONFIGS = {
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32, intermediate_size=64, **COMMON
    ),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64, **COMMON),
    "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=8, **COMMON),
}
NUM_EXPERTS, TOP_K = 4, 2


def moe_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny MoE model with weights large enough that routing and outputs differ visibly."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    return model


def token_batches(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=generator)} for _ in range(count)]


def logits(model, seed=1):
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def compressed(family: str, method: str = "whiten", ratio: float = 0.5):
    model = moe_model(family)
    unfuse_experts(model)
    stats = lowrank.collect_statistics(model, token_batches(), lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, ratio, method=method, stats=stats)
    report = lowrank.compress_(model, plan, method=method, stats=stats, progress=False)
    return model, plan, report


@pytest.mark.parametrize("family", list(CONFIGS))
def test_unfused_experts_compute_what_the_fused_ones_compute(family):
    model = moe_model(family)
    fused = model.model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(0)  # seeded here: the global RNG's state depends on which tests ran before
    hidden = torch.randn(10, 32, generator=generator)
    index = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K] for _ in range(10)])  # two distinct experts per token
    weights = torch.rand(10, TOP_K, generator=generator)
    with torch.no_grad():
        expected_block, expected_logits = fused(hidden, index, weights), logits(model)

    assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and find_fused_experts(model) == []
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, index, weights), expected_block, atol=1e-6, rtol=1e-6)
        # Two blocks of float32 sums in another order: ~1e-6 apart on logits of order 1.
        torch.testing.assert_close(logits(model), expected_logits, atol=1e-5, rtol=1e-5)
    slice_of_expert_1 = fused.gate_up_proj[1].T if fused.is_transposed else fused.gate_up_proj[1]
    assert torch.equal(experts.gate_up_proj[1].weight, slice_of_expert_1)
    assert unfuse_experts(model) == []  # already unfused: nothing to do


def test_expert_statistics_count_only_the_tokens_routed_to_the_expert():
    model = moe_model("qwen2_moe")
    unfuse_experts(model)
    routed = {layer: torch.zeros(NUM_EXPERTS, dtype=torch.long) for layer in range(2)}

    def count(layer):
        def hook(_module, _inputs, outputs):
            routed[layer] += torch.bincount(outputs[2].flatten(), minlength=NUM_EXPERTS)  # (logits, weights, indices)

        return hook

    for layer in range(2):
        model.model.layers[layer].mlp.gate.register_forward_hook(count(layer))
    batches = token_batches()
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        counts = [stats[f"{prefix}.experts.gate_up_proj.{e}"].num_tokens for e in range(NUM_EXPERTS)]
        assert counts == routed[layer].tolist() and sum(counts) == TOP_K * tokens
        assert [stats[f"{prefix}.experts.down_proj.{e}"].num_tokens for e in range(NUM_EXPERTS)] == counts
        assert stats[f"{prefix}.shared_expert.gate_proj"].num_tokens == tokens  # the shared expert sees every token


def test_an_expert_the_router_never_picks_gets_zero_statistics_and_still_compresses(caplog):
    model = moe_model("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4  # expert 3 never wins
    unfuse_experts(model)
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        stats = lowrank.collect_statistics(model, token_batches(), lowrank.find_targets(model), progress=False, gradients=False)
    assert "received no calibration token" in caplog.text
    never = stats["model.layers.0.mlp.experts.gate_up_proj.3"]
    assert never.num_tokens == 0 and not never.xtx.any()
    plan = lowrank.allocate(model, 0.5, method="whiten", stats=stats)
    lowrank.compress_(model, plan, method="whiten", stats=stats, progress=False)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj[3], LowRankLinear)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_whiten_at_half_replaces_every_expert_projection_and_counts_storage(family):
    dense = moe_model(family)
    model, plan, report = compressed(family)
    experts = expert_projection_names(model)
    assert len(experts) == 2 * 2 * NUM_EXPERTS and set(experts) <= set(plan.ranks)
    assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in experts)
    assert model.get_submodule(experts[0]).rank == plan.ranks[experts[0]]

    # Fused experts hold the same weights as the per-expert linears, so the counts start where the dense model is.
    assert report.parameters["model_before"] == lowrank.count_parameters(dense)
    assert report.parameters["model_after"] == lowrank.count_parameters(model)
    fused_blocks = {name.rsplit(".", 2)[0] for name in experts}  # model.layers.N.mlp.experts
    expert_before = sum(parameter.numel() for block in fused_blocks for parameter in dense.get_submodule(block).parameters())
    other_before = sum(parameter.numel() for name in plan.shapes if name not in experts for parameter in dense.get_submodule(name).parameters())
    assert report.parameters["targeted_before"] == expert_before + other_before
    assert report.parameters["targeted_after"] == sum(p.numel() for name in plan.shapes for p in model.get_submodule(name).parameters())
    assert report.parameters["targeted_bits_after"] == 32 * report.parameters["targeted_after"]
    factored = sum(rank * sum(plan.shapes[name]) for name, rank in plan.ranks.items())
    assert factored <= 0.5 * sum(out_features * in_features for out_features, in_features in plan.shapes.values())


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "gpt_oss"])
def test_compressed_moe_save_load_gives_identical_logits(tmp_path, family):
    model, _plan, report = compressed(family)
    lowrank.save(model, tmp_path / "out", report=report)
    saved = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    assert saved["unfused_experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    # The module names as they are: no conversion to the hub layout (Mixtral's block_sparse_moe.experts.N.w1).
    assert "model.layers.0.mlp.experts.gate_up_proj.0.down.weight" in keys and not any("block_sparse_moe" in key for key in keys)

    loaded = lowrank.load(tmp_path / "out")
    assert isinstance(loaded.model.layers[1].mlp.experts, UnfusedExperts)
    assert torch.equal(logits(loaded), logits(model))
    assert lowrank.count_parameters(loaded) == report.parameters["model_after"]


def test_dense_moe_round_trips_through_transformers_format(tmp_path):
    model = moe_model("mixtral")
    expected = logits(model)
    model.save_pretrained(tmp_path / "hub")
    dense = load_pretrained(tmp_path / "hub")  # what the CLI loads: experts unfused
    assert isinstance(dense.model.layers[0].mlp.experts, UnfusedExperts)
    torch.testing.assert_close(logits(dense), expected, rtol=1e-5, atol=1e-6)  # the fused path sums in another order

    lowrank.save(dense, tmp_path / "dense")  # no report: written fused, as transformers writes it
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as weights:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in set(weights.keys())
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not isinstance(again.model.layers[0].mlp.experts, UnfusedExperts)
    assert torch.equal(logits(again), expected)


def test_compressed_experts_have_no_fused_layout():
    model, _, _ = compressed("qwen3_moe")
    with pytest.raises(LowrankError, match="no fused layout"):
        fused_state_dict(model)


def test_sequential_refit_refuses_expert_layers():
    model = moe_model("mixtral")
    unfuse_experts(model)
    batches = token_batches()
    plan = lowrank.allocate(model, 0.5, method="svd")
    with pytest.raises(LowrankError, match="cannot pair expert inputs"):
        lowrank.compress_(model, plan, method="svd", sequential=batches, progress=False)


def test_find_targets_warns_about_fused_experts(caplog):
    model = moe_model("qwen3_moe")
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        targets = lowrank.find_targets(model)
    assert "unfuse_experts" in caplog.text and not any("experts" in name for name in targets)


def test_a_model_without_experts_is_unchanged():
    model = tiny_model("llama")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert unfuse_experts(model) == [] and find_fused_experts(model) == []
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)


def test_unfusing_a_name_that_is_not_fused_experts_is_an_error():
    with pytest.raises(LowrankError, match="not a fused experts module"):
        unfuse_experts(moe_model("mixtral"), ["model.layers.0.mlp"])
