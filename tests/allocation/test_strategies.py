import pytest

import lowrank
from lowrank.allocation import strategy_names
from lowrank.allocation.knapsack import max_factored_rank

RATIOS = [0.2, 0.4, 0.6]


@pytest.fixture(scope="module")
def fisher_stats(fixture_path, calib_text, tokenizer):
    from lowrank.models import load_pretrained

    model = load_pretrained(fixture_path)
    return lowrank.calibrate(model, tokenizer, calib_text, num_samples=8, seq_len=128, gradients=True, progress=False)


@pytest.fixture(scope="module")
def model(fixture_path):
    from lowrank.models import load_pretrained

    return load_pretrained(fixture_path)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("strategy", ["uniform", "energy", "welore", "global"])
def test_budget_is_met_exactly(model, fisher_stats, strategy, ratio):
    plan = lowrank.allocate(model, ratio, method="whiten", stats=fisher_stats, strategy=strategy)
    budget = int((1 - ratio) * plan.dense_parameters)
    assert plan.planned_parameters <= budget
    growable = [sum(plan.shapes[n]) for n, r in plan.ranks.items() if r < max_factored_rank(*plan.shapes[n])]
    if strategy != "uniform":  # uniform rounds each layer down on its own, by design
        assert budget - plan.planned_parameters < max(growable)
    assert plan.predicted_error is not None and plan.predicted_error >= 0


@pytest.mark.parametrize("method", ["whiten", "fisher-whiten"])
def test_global_predicts_no_more_error_than_uniform(model, fisher_stats, method):
    for ratio in RATIOS:
        uniform = lowrank.allocate(model, ratio, method=method, stats=fisher_stats, strategy="uniform")
        best = lowrank.allocate(model, ratio, method=method, stats=fisher_stats, strategy="global")
        assert best.planned_parameters <= int((1 - ratio) * best.dense_parameters)
        assert best.predicted_error <= uniform.predicted_error, ratio


def test_global_without_gradients_is_a_clear_error(model, fixture_stats):
    with pytest.raises(lowrank.LowrankError, match="gradient statistics"):
        lowrank.allocate(model, 0.4, stats=fixture_stats, strategy="global")


def test_every_strategy_is_tested():
    assert set(strategy_names()) == {"uniform", "energy", "welore", "global"}
