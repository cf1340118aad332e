"""adapt_ on tiny real models: step-0 equality for every init, full rank, freezing, merging, warnings.

Step-0 equality on the fixture is checked in test_finetune.py, before each fine-tune.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_model

import lowrank
from lowrank.adapt import (
    CovarianceConfig,
    LoraLinear,
    MinorConfig,
    PrincipalConfig,
    RandomConfig,
    SingularValueConfig,
    SingularValueLinear,
    adapt_,
    adapter_layers,
    merge_adapters_,
)
from lowrank.errors import LowrankError

CONFIGS = [
    ("principal", PrincipalConfig(rank=4)),
    ("principal-randomized", PrincipalConfig(rank=4, svd="randomized", power_iterations=2)),
    ("minor", MinorConfig(rank=4)),
    ("covariance-instruction", CovarianceConfig(rank=4, mode="instruction")),
    ("covariance-knowledge", CovarianceConfig(rank=4, mode="knowledge")),
    ("singular-value", SingularValueConfig(rank=4, update_rank=2)),
    ("random", RandomConfig(rank=4)),
]
IDS = [row[0] for row in CONFIGS]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name,config", CONFIGS, ids=IDS)
def test_step_zero_equality_on_tiny_models(family, name, config, sample_ids, tiny_stats, adapt_quietly):
    model = tiny_model(family)
    stats = tiny_stats(model)
    with torch.no_grad():
        before = model(input_ids=sample_ids).logits
    report = adapt_quietly(model, config, stats)
    with torch.no_grad():
        after = model(input_ids=sample_ids).logits
    assert len(adapter_layers(model)) == len(report.layers) > 0
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()


def test_full_rank_principal_leaves_a_zero_base_and_singular_value_reproduces_the_weight(adapt_quietly):
    model = tiny_model("llama")
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in lowrank.find_targets(model)}
    adapt_quietly(model, PrincipalConfig(rank=64))
    for name, layer in adapter_layers(model).items():
        assert layer.base_layer.weight.abs().max() < 1e-5
        assert torch.allclose(layer.lora_B.weight @ layer.lora_A.weight, weights[name], atol=1e-5)
    model = tiny_model("llama")
    adapt_quietly(model, SingularValueConfig(rank=64, update_rank=0))
    for name, layer in adapter_layers(model).items():
        assert layer.base_layer.weight.abs().max() < 1e-5
        assert torch.allclose(layer.merged_weight(), weights[name], atol=1e-5)


def test_only_adapters_train_and_counts_are_exact(adapt_quietly):
    model = tiny_model("llama")
    report = adapt_quietly(model, PrincipalConfig(rank=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    expected = sum(4 * (layer.base_layer.in_features + layer.base_layer.out_features) for layer in adapter_layers(model).values())
    assert report.trainable_parameters == expected

    model = tiny_model("llama")
    report = adapt_quietly(model, SingularValueConfig(rank=4, update_rank=2))
    layers = adapter_layers(model).values()
    assert all(isinstance(layer, SingularValueLinear) for layer in layers)
    assert report.trainable_parameters == sum(2 * 4 + 2 * (layer.lora_A.in_features + layer.lora_B.out_features) for layer in layers)


def test_base_changing_inits_warn_and_random_does_not():
    with pytest.warns(UserWarning, match="base weights are no longer the original"):
        adapt_(tiny_model("llama"), MinorConfig(rank=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = adapt_(tiny_model("llama"), RandomConfig(rank=2))
    assert not report.base_changed


def test_merge_gives_plain_layers_and_the_same_outputs(sample_ids, adapt_quietly):
    model = tiny_model("llama")
    adapt_quietly(model, PrincipalConfig(rank=4))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.weight.mul_(1.5)  # a change the merge must carry
        adapted = model(input_ids=sample_ids).logits
    merge_adapters_(model)
    assert not adapter_layers(model)
    assert not any(isinstance(module, LoraLinear) for module in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=sample_ids).logits, adapted, atol=1e-5)


def test_adapters_on_a_compressed_model_target_the_factors(sample_ids, adapt_quietly):
    model = tiny_model("llama")
    plan = lowrank.allocate(model, 0.4, method="svd")
    lowrank.compress_(model, plan, method="svd", progress=False)
    with torch.no_grad():
        before = model(input_ids=sample_ids).logits
    report = adapt_quietly(model, PrincipalConfig(rank=2))
    assert report.layers and all(name.endswith((".up", ".down")) for name in report.layers)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=sample_ids).logits, before, atol=1e-5)


@pytest.mark.parametrize(
    "config,stats,message",
    [
        (MinorConfig(rank=4, svd="randomized"), None, "randomized SVD cannot find"),
        (CovarianceConfig(rank=4, mode="knowledge", svd="randomized"), None, "randomized SVD cannot find"),
        (CovarianceConfig(rank=4, mode="sideways"), None, "unknown covariance mode"),
        (CovarianceConfig(rank=4), None, "needs calibration statistics"),
        (PrincipalConfig(rank=0), None, "rank must be"),
        (PrincipalConfig(rank=4, svd="lanczos"), None, "unknown svd"),
    ],
)
def test_bad_configs_are_one_line_errors(config, stats, message):
    with pytest.raises(LowrankError, match=message):
        adapt_(tiny_model("llama"), config, stats=stats)


def test_adapting_twice_is_refused(adapt_quietly):
    model = tiny_model("llama")
    adapt_quietly(model, RandomConfig(rank=2))
    with pytest.raises(LowrankError, match="already has adapters"):
        adapt_(model, RandomConfig(rank=2))
