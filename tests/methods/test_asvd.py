import math

import pytest
import torch

import lowrank
from lowrank.calibration import LayerStatistics
from lowrank.calibration.statistics import InputStatistics
from lowrank.linalg import output_error, truncated_svd, whitened_svd
from lowrank.methods.asvd import ASVDConfig, channel_scales, factorize
from lowrank.nn import LowRankLinear
from method_helpers import one_thread  # noqa: F401  (fixture)
from method_helpers import assert_same_logits, compress_save_load

pytestmark = pytest.mark.usefixtures("one_thread")


def random_statistics(in_features: int, seed: int = 0) -> LayerStatistics:
    """Statistics of real inputs whose channels differ in scale by up to 100×."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, in_features, dtype=torch.float64)
    stats = LayerStatistics.zeros(in_features)
    stats.inputs.update(torch.randn(500, in_features, generator=generator, dtype=torch.float64) * scales)
    return stats


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
@pytest.mark.parametrize("rank", [1, 5, 16])
def test_alpha_zero_is_exactly_plain_svd(shape, rank):
    weight = torch.randn(*shape)
    factors = factorize(weight, random_statistics(shape[1]), rank, ASVDConfig(alpha=0.0))
    plain = truncated_svd(weight, rank)
    assert torch.equal(factors.up, plain.up) and torch.equal(factors.down, plain.down)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_full_rank_reproduces_the_weight(alpha):
    weight = torch.randn(20, 12)
    factors = factorize(weight, random_statistics(12), 12, ASVDConfig(alpha=alpha))
    torch.testing.assert_close(factors.dense(), weight.double(), atol=1e-10, rtol=0)


def test_alpha_one_on_independent_channels_is_the_whitened_optimum():
    # For independent Gaussian channels E|x_j| = σ_j·sqrt(2/π) and C = diag(σ²)·N, so W·diag(E|x|) is
    # W·C^{1/2} up to a constant factor: ASVD with alpha = 1 must equal whitened SVD.
    sigma, tokens = torch.logspace(-1, 1, 16, dtype=torch.float64), 1000
    stats = LayerStatistics(InputStatistics(xtx=torch.diag(sigma**2) * tokens, abs_sum=sigma * math.sqrt(2 / math.pi) * tokens, num_tokens=tokens))
    weight = torch.randn(24, 16, dtype=torch.float64)
    asvd = factorize(weight, stats, 6, ASVDConfig(alpha=1.0)).dense()
    torch.testing.assert_close(asvd, whitened_svd(weight, stats.xtx, 6).dense(), atol=1e-10, rtol=1e-10)


def test_scaling_lowers_the_output_error_on_uneven_channels():
    weight, stats = torch.randn(32, 32), random_statistics(32)
    errors = {alpha: output_error(weight, factorize(weight, stats, 8, ASVDConfig(alpha=alpha)).dense(), stats.xtx) for alpha in (0.0, 0.5, 1.0)}
    assert errors[1.0] < errors[0.5] < errors[0.0]


def test_channels_never_active_keep_a_finite_scale():
    scales = channel_scales(torch.tensor([0.0, 4.0, 0.0, 1.0], dtype=torch.float64), 0.5)
    assert scales.tolist() == [1.0, 2.0, 1.0, 1.0]
    stats = LayerStatistics.zeros(4)
    factors = factorize(torch.randn(6, 4), stats, 2, ASVDConfig())  # no token seen at all
    assert torch.isfinite(factors.dense()).all()


def test_asvd_beats_svd_on_the_fixture(dense_model, fixture_stats):
    plan = lowrank.allocate(dense_model, 0.4, stats=fixture_stats)
    totals = {"svd": 0.0, "asvd": 0.0}
    for name, rank in plan.items():
        weight, xtx = dense_model.get_submodule(name).weight.detach(), fixture_stats[name].xtx
        totals["svd"] += output_error(weight, truncated_svd(weight, rank).dense(), xtx)
        totals["asvd"] += output_error(weight, factorize(weight, fixture_stats[name], rank, ASVDConfig()).dense(), xtx)
    assert totals["asvd"] < totals["svd"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compress_save_load_gives_the_same_logits(tmp_path, family):
    model, loaded, report = compress_save_load(tmp_path, family, "asvd", ASVDConfig(alpha=0.5))
    assert report.method_config["alpha"] == 0.5
    assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in report.modules)
    assert_same_logits(model, loaded)
