import pytest
import torch

import lowrank
from lowrank.calibration import InputStatistics, LayerStatistics
from lowrank.linalg import truncated_svd, whitened_svd
from lowrank.linalg.weighted import row_weights, weighted_energy, weighted_svd


def statistics(in_features=12, out_features=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, in_features, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, in_features, dtype=torch.float64)
    fisher = torch.rand(out_features, generator=generator, dtype=torch.float64) ** 4
    inputs = InputStatistics(xtx=x.T @ x, abs_sum=x.abs().sum(0), num_tokens=200)
    return LayerStatistics(inputs, output_grad_sq=fisher * 200, weight_grad_sq=fisher, num_grad_tokens=200), x, fisher


@pytest.mark.parametrize("method", ["fwsvd", "fisher-whiten"])
def test_full_rank_reproduces_weight(method):
    stats, _, _ = statistics()
    weight = torch.randn(10, 12, dtype=torch.float64)
    spec = lowrank.get_method(method)
    torch.testing.assert_close(spec.factorize(weight, stats, 10, spec.config_class()).dense(), weight, atol=1e-8, rtol=1e-8)


def test_weighted_svd_reduces_to_svd_and_whiten():
    weight = torch.randn(10, 12, dtype=torch.float64)
    stats, _, _ = statistics()
    torch.testing.assert_close(weighted_svd(weight, 4).dense(), truncated_svd(weight, 4).dense())
    white = lowrank.linalg.whitening(stats.xtx)
    torch.testing.assert_close(weighted_svd(weight, 4, white=white).dense(), whitened_svd(weight, stats.xtx, 4).dense())


def test_fisher_whiten_minimizes_the_weighted_output_error():
    stats, x, fisher = statistics()
    weight = torch.randn(10, 12, dtype=torch.float64)
    spec = lowrank.get_method("fisher-whiten")
    weights = fisher.sqrt()

    def weighted_error(approximation):
        return (weights[:, None] * ((weight - approximation) @ x.T)).pow(2).sum().item()

    for rank in (2, 5):
        mine = weighted_error(spec.factorize(weight, stats, rank, spec.config_class(fisher_damp=0.0)).dense())
        white = lowrank.linalg.whitening(stats.xtx)
        assert mine == pytest.approx(weighted_energy(weight, weights, white)[rank:].sum().item(), rel=1e-6)
        assert mine <= weighted_error(whitened_svd(weight, stats.xtx, rank).dense()) * (1 + 1e-9)


def test_fisher_methods_need_gradients(dense_model, fixture_stats):
    plan = lowrank.allocate(dense_model, 0.4)
    with pytest.raises(lowrank.LowrankError, match="gradient statistics"):
        lowrank.compress_(dense_model, plan, method="fisher-whiten", stats=fixture_stats, progress=False)
    assert not any(isinstance(m, lowrank.LowRankLinear) for m in dense_model.modules())


@pytest.mark.parametrize("method", ["whiten", "fisher-whiten"])
def test_fewer_tokens_than_inputs_factor_on_the_output_side_at_the_optimum(method, caplog):
    # 9 tokens for 16 inputs: XᵀX is singular by construction. The layer (8 ≤ 16 outputs) is factored
    # from D·W·XᵀX·Wᵀ·D without any root, so no damping (and no logged damping) and the exact optimum
    # on the data; its loss curve is exactly what the factors lose.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(9, 16, generator=generator, dtype=torch.float64)
    fisher = torch.rand(8, generator=generator, dtype=torch.float64) + 0.1
    stats = LayerStatistics(InputStatistics(xtx=x.T @ x, abs_sum=x.abs().sum(0), num_tokens=9), output_grad_sq=fisher * 9, num_grad_tokens=9)
    assert stats.output_side(8) and not stats.output_side(17)
    weight = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    spec = lowrank.get_method(method)
    config = spec.config_class()
    d = row_weights(stats.output_fisher, config.fisher_damp) if method == "fisher-whiten" else torch.ones(8, dtype=torch.float64)
    singular = torch.linalg.svdvals(d[:, None] * weight @ x.T).square()  # Eckart–Young on D·W·X
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False, dtype=torch.float64))
    model[0].weight.data.copy_(weight)
    curve = lowrank.allocation.curves.loss_curves(model, ["0"], {"0": stats}, method)["0"]
    with caplog.at_level("INFO", logger="lowrank.linalg.whiten"):
        for rank in (2, 5):
            factors = spec.factorize(weight, stats, rank, config)
            error = (d[:, None] * (weight - factors.dense()) @ x.T).square().sum().item()
            assert error == pytest.approx(singular[rank:].sum().item(), rel=1e-9, abs=1e-12 * singular[0].item())
            scale = 0.5 / 9 if method == "fisher-whiten" else 0.5 * fisher.mean().item() / 9
            assert curve[rank:].sum().item() == pytest.approx(error * scale, rel=1e-9, abs=1e-12 * singular[0].item())
    assert "damped" not in caplog.text
