import pytest
import torch

import lowrank
from lowrank.calibration import LayerStatistics
from lowrank.cli.main import run
from lowrank.linalg import output_error, truncated_svd, whitened_svd
from lowrank.methods.lowrank_sparse import LowRankPlusSparseConfig, build, factorize, split_budget
from lowrank.nn import LowRankLinear, LowRankPlusSparseLinear
from lowrank.nn.lowrank_sparse_linear import LowRankSparseFactors
from method_helpers import one_thread  # noqa: F401  (fixture)
from method_helpers import assert_same_logits, budget_bits, compress_save_load, weight_bits
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_plus_outliers(out_features, in_features, generator, rank=3, outliers=20, dtype=torch.float64):
    """A rank-``rank`` matrix plus a few large entries: the structure this method is for."""
    low = torch.randn(out_features, rank, generator=generator, dtype=dtype) @ torch.randn(rank, in_features, generator=generator, dtype=dtype)
    spikes = torch.randperm(out_features * in_features, generator=generator)[:outliers]
    sparse = torch.zeros(out_features * in_features, dtype=dtype)
    sparse[spikes] = 20 * torch.randn(outliers, generator=generator, dtype=dtype)
    return low + sparse.view(out_features, in_features)


def make_weight(kind, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(*shape, generator=generator)
    if kind == "exactly low rank":  # the sparse part cannot help: the method must fall back to SVD
        return torch.randn(shape[0], 4, generator=generator) @ torch.randn(4, shape[1], generator=generator)
    if kind == "decaying spectrum":
        u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=generator), full_matrices=False)
        return (u * torch.logspace(1, -2, min(shape))) @ vh
    return low_rank_plus_outliers(*shape, generator, dtype=torch.float32)


CASES = [  # (weight kind, shape, rank, config)
    ("gaussian", (48, 32), 8, LowRankPlusSparseConfig()),
    ("gaussian", (32, 48), 12, LowRankPlusSparseConfig(sparse_fraction=0.5)),
    ("exactly low rank", (40, 40), 4, LowRankPlusSparseConfig()),
    ("decaying spectrum", (64, 32), 6, LowRankPlusSparseConfig(iterations=2)),
    ("outliers", (64, 48), 5, LowRankPlusSparseConfig()),
    ("outliers", (48, 64), 5, LowRankPlusSparseConfig(sparse_fraction=0.1, iterations=1)),
]


@pytest.mark.parametrize("kind, shape, rank, config", CASES)
def test_frobenius_error_never_exceeds_plain_svd_at_the_same_budget(kind, shape, rank, config):
    weight = make_weight(kind, shape)
    error = (weight.double() - factorize(weight, None, rank, config).dense()).norm()
    svd_error = (weight.double() - truncated_svd(weight, rank).dense()).norm()
    assert error <= svd_error * (1 + 1e-12)


def test_outliers_are_captured_far_better_than_by_svd():
    weight = low_rank_plus_outliers(64, 48, torch.Generator().manual_seed(0), rank=3, outliers=20)
    svd_error = (weight - truncated_svd(weight, 5).dense()).norm()
    errors = [(weight - factorize(weight, None, 5, LowRankPlusSparseConfig(iterations=steps)).dense()).norm() for steps in (1, 5, 20)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05 * svd_error


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_full_budget_reproduces_the_weight(shape):
    weight = torch.randn(*shape)
    factors = factorize(weight, None, min(shape), LowRankPlusSparseConfig())
    torch.testing.assert_close(factors.dense(), weight.double(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, rank, fraction", [((64, 48), 5, 0.25), ((48, 64), 20, 0.5), ((96, 32), 3, 0.9), ((32, 32), 1, 0.25)])
def test_stored_size_stays_within_the_budget(shape, rank, fraction, dtype):
    weight = low_rank_plus_outliers(*shape, torch.Generator().manual_seed(0), outliers=200).to(dtype)
    layer = build(factorize(weight, None, rank, LowRankPlusSparseConfig(sparse_fraction=fraction)), None, dtype)
    if isinstance(layer, LowRankPlusSparseLinear):
        assert weight_bits(layer) <= budget_bits(*shape, rank, dtype)
        assert (layer.rank, layer.num_nonzero) == split_budget(*shape, rank, fraction, weight.element_size())
        assert layer.sparse_col_indices.dtype == torch.int16  # a sparse entry costs its value and a 16-bit index
    else:
        assert isinstance(layer, LowRankLinear) and layer.rank == rank


def test_split_counts_index_bytes():
    assert split_budget(256, 256, 64, 0.25, value_bytes=4) == (48, (64 * 512 * 4 - 48 * 512 * 4 - 4 * 257) // 6)
    assert split_budget(256, 256, 64, 0.25, value_bytes=2) == (48, (64 * 512 * 2 - 48 * 512 * 2 - 4 * 257) // 4)


def statistics_with_busy_channels(in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    stats = LayerStatistics.zeros(in_features)
    scales = torch.ones(in_features, dtype=torch.float64)
    scales[: in_features // 4] = 10.0
    stats.inputs.update(torch.randn(400, in_features, generator=generator, dtype=torch.float64) * scales)
    return stats


def test_whitened_variant_never_exceeds_whitened_svd_output_error():
    weight, stats = make_weight("gaussian", (48, 32)), statistics_with_busy_channels(32)
    config = LowRankPlusSparseConfig(whiten=True, weighted_selection=True)
    error = output_error(weight, factorize(weight, stats, 8, config).dense(), stats.xtx)
    assert error <= output_error(weight, whitened_svd(weight, stats.xtx, 8).dense(), stats.xtx) * (1 + 1e-12)


def test_weighted_selection_lowers_the_output_error_of_the_whitened_variant():
    weight, stats = make_weight("outliers", (64, 48), seed=3), statistics_with_busy_channels(48)
    plain = factorize(weight, stats, 4, LowRankPlusSparseConfig(whiten=True))
    weighted = factorize(weight, stats, 4, LowRankPlusSparseConfig(whiten=True, weighted_selection=True))
    assert isinstance(weighted, LowRankSparseFactors)
    assert (weighted.cols < 12).float().mean() > 0.25  # the first 12 of 48 channels are 10× larger
    assert output_error(weight, weighted.dense(), stats.xtx) < output_error(weight, plain.dense(), stats.xtx)


def test_data_aware_options_without_statistics_are_a_clear_error():
    with pytest.raises(lowrank.LowrankError, match="needs calibration statistics"):
        factorize(torch.randn(8, 8), None, 2, LowRankPlusSparseConfig(whiten=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_module_applies_its_dense_weight(dtype, bias):
    weight = low_rank_plus_outliers(24, 16, torch.Generator().manual_seed(0))
    factors = factorize(weight, None, 4, LowRankPlusSparseConfig())
    layer = LowRankPlusSparseLinear.from_factors(factors, torch.randn(24) if bias else None, dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    expected = x.float() @ layer.to_dense().float().T + (layer.up.bias.float() if bias else 0)
    torch.testing.assert_close(layer(x).float(), expected, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=1e-2)
    torch.testing.assert_close(layer.to_dense().double(), factors.dense().to(dtype).double(), atol=0.5 if dtype == torch.bfloat16 else 1e-5, rtol=0.02)
    layer(x).sum().backward()
    assert layer.sparse_values.grad is not None and layer.sparse_values.grad.abs().sum() > 0
    assert "num_nonzero=" in repr(layer) and set(layer.spec()) == {"rank", "num_nonzero"}


def outlier_weight(out_features, in_features, generator):
    return 0.02 * low_rank_plus_outliers(out_features, in_features, generator, rank=2, outliers=40, dtype=torch.float32)


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("opt", torch.float32), ("opt", torch.bfloat16)])
def test_compress_save_load_gives_the_same_logits(tmp_path, family, dtype):
    model, loaded, report = compress_save_load(tmp_path, family, "lowrank-sparse", LowRankPlusSparseConfig(), make_weight=outlier_weight, dtype=dtype)
    structures = {spec["structure"] for spec in report.modules.values()}
    assert structures == {"LowRankPlusSparseLinear"}
    assert_same_logits(model, loaded)


def test_fixture_round_trip(tmp_path, dense_model, tokenizer):
    plan = lowrank.allocate(dense_model, 0.4, method="lowrank-sparse", include=[r"layers\.0\."])
    report = lowrank.compress_(dense_model, plan, method="lowrank-sparse", config=LowRankPlusSparseConfig(iterations=2), progress=False)
    assert any(isinstance(m, LowRankPlusSparseLinear) for m in dense_model.modules())
    lowrank.save(dense_model, tmp_path / "out", report=report, tokenizer=tokenizer)
    assert_same_logits(dense_model, lowrank.load(tmp_path / "out"), vocab_size=8192)


def test_cli_compress(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "compressed"
    code = run(["compress", str(tmp_path / "tiny"), "--method", "lowrank-sparse", "--ratio", "0.5", "--option", "sparse_fraction=0.3", "--option", "iterations=2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    loaded, report = lowrank.load(out, return_report=True)
    assert report.method_config["sparse_fraction"] == 0.3
    assert all(isinstance(loaded.get_submodule(name), (LowRankPlusSparseLinear, LowRankLinear)) for name in report.modules)
