import pytest
import torch

import lowrank
from lowrank.allocation import SensitivityConfig, measured_sensitivities, strategy_names
from lowrank.allocation.knapsack import max_factored_rank
from lowrank.calibration import calibration_batches

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


@pytest.fixture(scope="module")
def reference_losses(model, fisher_stats):
    """Per method and layer, the predicted loss of dropping each direction, computed here: ½·σ_i²(D·W·L)/N
    with C = Σ x xᵀ = L Lᵀ over N tokens (a Cholesky factor, so σ(W L) = σ(W C^{1/2}) without lowrank's
    whitening) and D the output weighting: for ``whiten`` the mean output Fisher f̄ (D = √f̄·I), for
    ``fisher-whiten`` D = diag(√(f + 10⁻⁶·f̄))."""
    losses = {"whiten": {}, "fisher-whiten": {}}
    for name, stats in fisher_stats.items():
        scaled = model.get_submodule(name).weight.detach().double() @ torch.linalg.cholesky(stats.xtx.double())
        fisher = stats.output_grad_sq / stats.num_grad_tokens
        for method, rows in (("whiten", fisher.mean().sqrt().expand_as(fisher)), ("fisher-whiten", (fisher + 1e-6 * fisher.mean()).sqrt())):
            losses[method][name] = 0.5 * torch.linalg.svdvals(rows[:, None] * scaled).square().numpy() / stats.num_tokens
    return losses


def reference_error(plan, losses) -> float:
    """Σ over factored layers of the losses of the directions the plan drops (a dense layer drops none)."""
    return float(sum(losses[name][rank:].sum() for name, rank in plan.ranks.items()))


@pytest.fixture(scope="module")
def sensitivity_config(model, fisher_stats, tokenizer, calib_text):
    """Sensitivities measured once, cheaply (one candidate rank, one batch of 2 × 64 tokens), reused per ratio."""
    batches = calibration_batches(tokenizer, calib_text, num_samples=2, seq_len=64, batch_size=2)
    config = SensitivityConfig(ratios=(0.5,), num_batches=1)
    plan = lowrank.allocate(model, 0.4, stats=fisher_stats, strategy="sensitivity", batches=batches, strategy_config=config)
    return SensitivityConfig(sensitivities=measured_sensitivities(plan.details["sensitivity"]))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("strategy", ["uniform", "energy", "welore", "global", "sensitivity"])
def test_budget_is_met_exactly(model, fisher_stats, sensitivity_config, reference_losses, strategy, ratio):
    config = sensitivity_config if strategy == "sensitivity" else None
    plan = lowrank.allocate(model, ratio, method="whiten", stats=fisher_stats, strategy=strategy, strategy_config=config, predict_error=True)
    budget = int((1 - ratio) * plan.dense_parameters)
    assert plan.planned_parameters <= budget
    growable = [sum(plan.shapes[n]) for n, r in plan.ranks.items() if r < max_factored_rank(*plan.shapes[n])]
    if strategy != "uniform":  # uniform rounds each layer down on its own, by design
        assert budget - plan.planned_parameters < max(growable)
    if strategy != "sensitivity":  # (sensitivity predicts from measured losses, checked in test_sensitivity.py)
        assert plan.predicted_error == lowrank.allocate(model, ratio, stats=fisher_stats, strategy=strategy, predict_error=True).predicted_error
        assert plan.predicted_error == pytest.approx(reference_error(plan, reference_losses["whiten"]), rel=1e-6)


@pytest.mark.parametrize("method", ["whiten", "fisher-whiten"])
def test_global_predicts_no_more_error_than_uniform(model, fisher_stats, reference_losses, method):
    for ratio in RATIOS:
        uniform = lowrank.allocate(model, ratio, method=method, stats=fisher_stats, strategy="uniform")
        best = lowrank.allocate(model, ratio, method=method, stats=fisher_stats, strategy="global")
        assert best.planned_parameters <= int((1 - ratio) * best.dense_parameters)
        # Judged by the losses computed here, not by the strategy's own prediction.
        assert reference_error(best, reference_losses[method]) <= reference_error(uniform, reference_losses[method]), ratio
        assert best.predicted_error == pytest.approx(reference_error(best, reference_losses[method]), rel=1e-6)


def test_the_error_is_predicted_when_free_or_asked_for(model, fisher_stats):
    assert lowrank.allocate(model, 0.4, stats=fisher_stats).predicted_error is None  # uniform: curves not computed
    assert lowrank.allocate(model, 0.4, stats=fisher_stats, predict_error=True).predicted_error > 0
    assert lowrank.allocate(model, 0.4, stats=fisher_stats, strategy="global").predicted_error > 0  # global's own curves


def test_global_without_gradients_is_a_clear_error(model, fixture_stats):
    with pytest.raises(lowrank.LowrankError, match="gradient statistics"):
        lowrank.allocate(model, 0.4, stats=fixture_stats, strategy="global")


def test_every_strategy_is_tested():
    assert set(strategy_names()) == {"uniform", "energy", "welore", "global", "sensitivity"}
