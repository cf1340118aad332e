import math

import pytest
import torch

import lowrank
from lowrank.errors import LowrankError
from lowrank.linalg import output_error, whitened_spectrum
from lowrank.nn import LowRankLinear


def test_whiten_error_is_the_discarded_energy_and_beats_svd_on_every_layer(dense_model, fixture_stats):
    plan = lowrank.allocate(dense_model, 0.4, stats=fixture_stats)
    originals = {name: dense_model.get_submodule(name).weight.detach().clone() for name in plan}
    whitened = lowrank.get_method("whiten")
    plain = lowrank.get_method("svd")
    for name, rank in plan.items():
        weight, xtx = originals[name], fixture_stats[name].xtx
        whitened_error = output_error(weight, whitened.factorize(weight, fixture_stats[name], rank, whitened.config_class()).dense(), xtx)
        plain_error = output_error(weight, plain.factorize(weight, None, rank, plain.config_class()).dense(), xtx)
        discarded = whitened_spectrum(weight, xtx)[rank:].pow(2).sum().item()
        assert whitened_error == pytest.approx(discarded, rel=1e-6), name
        assert whitened_error <= plain_error, name


def test_ratio_zero_leaves_the_model_unchanged(dense_model, tokenizer, eval_text, fixture_stats):
    before = lowrank.perplexity(dense_model, tokenizer, eval_text, progress=False)
    plan = lowrank.allocate(dense_model, 0.0, stats=fixture_stats)
    report = lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, progress=False)
    assert len(plan) == 0 and report.parameters["model_after"] == report.parameters["model_before"]
    assert lowrank.perplexity(dense_model, tokenizer, eval_text, progress=False) == before


def test_parameter_bookkeeping_is_exact(dense_model, fixture_stats):
    plan = lowrank.allocate(dense_model, 0.3, stats=fixture_stats)
    report = lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, progress=False)
    counted = sum(p.numel() for name in plan.shapes for p in dense_model.get_submodule(name).parameters())
    unique = {p.data_ptr(): p.numel() for p in dense_model.parameters()}
    assert report.parameters["targeted_after"] == counted == plan.planned_parameters  # the fixture's linears have no bias
    assert report.parameters["model_after"] == sum(unique.values())
    assert report.parameters["model_before"] - report.parameters["model_after"] == report.parameters["targeted_before"] - counted
    assert 0.3 <= 1 - counted / report.parameters["targeted_before"] < 0.31
    assert report.parameters["targeted_bits_after"] == 32 * counted  # float32 factors, no other storage
    assert report.parameters["targeted_bits_before"] == 32 * report.parameters["targeted_before"]
    for name, rank in plan.items():
        layer = dense_model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == rank


def test_whiten_beats_svd_in_perplexity(fixture_path, tokenizer, eval_text, fixture_stats):
    from lowrank.models import load_pretrained

    results = {}
    for method in ("svd", "whiten"):
        model = load_pretrained(fixture_path)
        plan = lowrank.allocate(model, 0.4, stats=fixture_stats)
        lowrank.compress_(model, plan, method=method, stats=fixture_stats, progress=False)
        results[method] = lowrank.perplexity(model, tokenizer, eval_text, progress=False)
    assert math.isfinite(results["whiten"]) and results["whiten"] < results["svd"]


def test_nan_weight_is_named_and_leaves_the_model_untouched(dense_model, fixture_stats):
    name = "model.layers.2.mlp.up_proj"
    with torch.no_grad():
        dense_model.get_submodule(name).weight[0, 0] = float("nan")
    plan = lowrank.allocate(dense_model, 0.4, stats=fixture_stats)
    with pytest.raises(LowrankError, match=name.replace(".", r"\.")):
        lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in dense_model.modules())


def test_data_aware_method_without_statistics_is_a_clear_error(dense_model):
    plan = lowrank.allocate(dense_model, 0.4)
    with pytest.raises(LowrankError, match="needs calibration statistics"):
        lowrank.compress_(dense_model, plan, method="whiten", progress=False)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_ratio_out_of_range_is_a_clear_error(dense_model, ratio):
    with pytest.raises(LowrankError, match=r"ratio must be in \[0, 1\)"):
        lowrank.allocate(dense_model, ratio)
