import pytest
import torch

import lowrank
from lowrank.calibration import InputStatistics, LayerStatistics
from lowrank.linalg import truncated_svd, whitened_svd
from lowrank.linalg.weighted import weighted_energy, weighted_svd


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
