import pytest
import torch

from lowrank.linalg import lowrank_parameters, rank_for_ratio, truncated_svd


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_full_rank_reproduces_weight(shape):
    weight = torch.randn(*shape)
    factors = truncated_svd(weight, min(shape))
    torch.testing.assert_close(factors.dense().float(), weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncation_error_is_eckart_young(rank):
    weight = torch.randn(40, 30, dtype=torch.float64)
    singular_values = torch.linalg.svdvals(weight)
    error = (weight - truncated_svd(weight, rank).dense()).pow(2).sum()
    assert error.item() == pytest.approx(singular_values[rank:].pow(2).sum().item(), rel=1e-10)


def test_factors_are_balanced_and_shaped():
    factors = truncated_svd(torch.randn(20, 10), 4)
    assert factors.up.shape == (20, 4) and factors.down.shape == (4, 10)
    assert factors.up.dtype == torch.float64
    # Balanced split: both factors carry √σ, so their column/row norms match.
    torch.testing.assert_close(factors.up.norm(dim=0), factors.down.norm(dim=1))


def test_low_precision_input_is_factorized_in_float64():
    weight = torch.randn(16, 12).to(torch.bfloat16)
    factors = truncated_svd(weight, 12)
    torch.testing.assert_close(factors.dense(), weight.double(), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("out_features", "in_features", "ratio", "expected"),
    [(256, 256, 0.5, 64), (768, 256, 0.4, 115), (256, 256, 0.0, None), (2, 2, 0.1, None), (256, 768, 0.99, 1)],
)
def test_rank_for_ratio(out_features, in_features, ratio, expected):
    assert rank_for_ratio(out_features, in_features, ratio) == expected


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4, 0.6, 0.9])
def test_rank_for_ratio_removes_at_least_ratio(ratio):
    for out_features, in_features in [(256, 256), (768, 256), (100, 7)]:
        rank = rank_for_ratio(out_features, in_features, ratio)
        if rank is not None:
            assert lowrank_parameters(out_features, in_features, rank) <= (1 - ratio) * out_features * in_features or rank == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_rank_for_ratio_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError):
        rank_for_ratio(10, 10, ratio)
