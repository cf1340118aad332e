"""``lowrank-quant``'s orders (LoftQ alternation, SVDQuant's low-rank first, EoRA's quantize first, best of
the three), its GPTQ residual and its dense-and-sparse outliers, each checked against a reference written
here from scratch: round-to-nearest and the whitened rank-r optimum by hand, outliers by sorting every entry."""

import json

import pytest
import torch
from method_helpers import (
    assert_same_logits,
    budget_bits,
    compress_save_load,
    one_thread,  # noqa: F401  (fixture)
    weight_bits,
)

import lowrank
from lowrank.calibration import LayerStatistics
from lowrank.configs import config_from_dict, config_to_dict, parse_overrides
from lowrank.linalg import LowRankFactors, output_error
from lowrank.linalg.gptq import gptq_quantize
from lowrank.linalg.quantize import quantized_bits
from lowrank.methods.lowrank_quant import LowRankQuantConfig, build, factorize, lowrank_rank, outlier_count
from lowrank.nn import LowRankQuantLinear
from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors, LowRankQuantSparseFactors, LowRankQuantSparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")

OUT, IN, BITS, GROUP, INNER = 24, 64, 3, 16, 4


def rtn(matrix: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest by hand: per row and group of columns, the range [min(x, 0), max(x, 0)] in 2^bits − 1
    steps of a float16-rounded scale, an integer zero point; returns the dequantized matrix."""
    result = torch.empty_like(matrix)
    levels = 2**bits - 1
    for row in range(matrix.shape[0]):
        for start in range(0, matrix.shape[1], group):
            values = matrix[row, start : start + group]
            low, high = min(values.min().item(), 0.0), max(values.max().item(), 0.0)
            scale = float(torch.tensor(max((high - low) / levels, 2.0**-14)).half())
            zero = min(max(round(-low / scale), 0), levels)
            codes = ((values / scale).round() + zero).clamp(0, levels)
            result[row, start : start + group] = (codes - zero) * scale
    return result


def best_rank(matrix: torch.Tensor, xtx: torch.Tensor | None, rank: int) -> torch.Tensor:
    """The rank-r matrix closest to ``matrix`` in ‖(·)X‖_F (or Frobenius): SVD of matrix·C^½, C^½ from eigh."""
    if xtx is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    values, vectors = torch.linalg.eigh(xtx.double())
    root = (vectors * values.sqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(matrix @ root, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(root)


def error(weight, approximation, xtx):
    return output_error(weight, approximation, xtx) if xtx is not None else (weight - approximation).pow(2).sum().item()


def case(seed: int = 0):
    """A weight with a decaying spectrum (as trained layers have) and full-rank calibration statistics."""
    generator = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(OUT, IN, generator=generator, dtype=torch.float64), full_matrices=False)
    weight = (u * torch.logspace(0.5, -1, OUT, dtype=torch.float64)) @ vh
    stats = LayerStatistics.zeros(IN)
    stats.inputs.update(torch.randn(400, IN, generator=generator, dtype=torch.float64) * torch.logspace(-0.5, 0.5, IN, dtype=torch.float64))
    return weight.float(), stats


def plan_rank(inner: int = INNER, num_outliers: int = 0) -> int:
    """The plan rank whose budget holds the residual (and outliers) plus exactly rank ``inner``."""
    rank = inner
    while lowrank_rank(OUT, IN, rank, BITS, GROUP, 32, num_outliers) < inner:
        rank += 1
    assert lowrank_rank(OUT, IN, rank, BITS, GROUP, 32, num_outliers) == inner
    return rank


def reference(order: str, weight: torch.Tensor, xtx: torch.Tensor | None, iterations: int = 3) -> torch.Tensor:
    """Each order written out by hand, with the plain rank-R fit as the candidate to beat."""
    target = weight.double()
    candidates = [best_rank(target, xtx, plan_rank())]
    if order == "lowrank-first":
        low = best_rank(target, xtx, INNER)
        candidates.append(low + rtn(target - low, BITS, GROUP))
    elif order == "quantize-first":
        quantized = rtn(target, BITS, GROUP)
        candidates.append(quantized + best_rank(target - quantized, xtx, INNER))
    else:
        low = best_rank(target, xtx, INNER)
        for _ in range(iterations):
            quantized = rtn(target - low, BITS, GROUP)
            low = best_rank(target - quantized, xtx, INNER)
            candidates.append(low + quantized)
    return min(candidates, key=lambda candidate: error(target, candidate, xtx))


@pytest.mark.parametrize("whiten", [False, True], ids=["frobenius", "whitened"])
@pytest.mark.parametrize("order", ["alternate", "lowrank-first", "quantize-first"])
def test_each_order_equals_its_reference(order, whiten):
    weight, stats = case()
    xtx = stats.xtx if whiten else None
    factors = factorize(weight, stats, plan_rank(), LowRankQuantConfig(bits=BITS, group_size=GROUP, iterations=3, whiten=whiten, order=order))
    assert isinstance(factors, LowRankQuantFactors) and factors.up.shape[1] == INNER  # the split, not the plain fallback
    expected = reference(order, weight, xtx)
    torch.testing.assert_close(factors.dense(), expected, atol=1e-9, rtol=1e-9)


def test_orders_differ_and_best_keeps_the_least_error_per_layer():
    weight, stats = case(seed=3)
    errors = {}
    for order in ("alternate", "lowrank-first", "quantize-first", "best"):
        factors = factorize(weight, stats, plan_rank(), LowRankQuantConfig(bits=BITS, group_size=GROUP, whiten=True, order=order))
        errors[order] = output_error(weight, factors.dense(), stats.xtx)
    assert len({round(errors[order], 9) for order in ("alternate", "lowrank-first", "quantize-first")}) == 3  # three different results
    assert errors["best"] == min(errors.values())
    # The alternation's first refit is optimal for its Q, so it never loses to SVDQuant's single pass.
    assert errors["alternate"] <= errors["lowrank-first"]


def test_quantize_first_with_gptq_is_gptq_plus_the_whitened_optimum():
    weight, stats = case(seed=1)
    factors = factorize(
        weight, stats, plan_rank(), LowRankQuantConfig(bits=BITS, group_size=GROUP, whiten=True, order="quantize-first", quantizer="gptq")
    )
    quantized = gptq_quantize(weight.double(), stats.xtx, BITS, GROUP).dequantize()
    expected = quantized + best_rank(weight.double() - quantized, stats.xtx, INNER)
    torch.testing.assert_close(factors.dense(), expected, atol=1e-9, rtol=1e-9)
    rtn_first = factorize(weight, stats, plan_rank(), LowRankQuantConfig(bits=BITS, group_size=GROUP, whiten=True, order="quantize-first"))
    assert output_error(weight, factors.dense(), stats.xtx) < output_error(weight, rtn_first.dense(), stats.xtx)


@pytest.mark.parametrize("selection", ["magnitude", "sensitivity"])
def test_outliers_are_the_top_entries_of_the_residual_by_brute_force(selection):
    weight, stats = case(seed=2)
    count = outlier_count(OUT, IN, 0.02)
    assert count == 30
    config = LowRankQuantConfig(bits=BITS, group_size=GROUP, whiten=True, order="lowrank-first", outliers=0.02, outlier_selection=selection)
    factors = factorize(weight, stats, plan_rank(num_outliers=count), config)
    assert isinstance(factors, LowRankQuantSparseFactors) and factors.up.shape[1] == INNER

    residual = weight.double() - best_rank(weight.double(), stats.xtx, INNER)
    channel = stats.xtx.double().diagonal().sqrt()
    score = {(i, j): abs(residual[i, j].item()) * (channel[j].item() if selection == "sensitivity" else 1.0) for i in range(OUT) for j in range(IN)}
    chosen = sorted(score, key=score.get, reverse=True)[:count]
    assert set(zip(factors.rows.tolist(), factors.cols.tolist())) == set(chosen)
    rows, cols = torch.tensor([p[0] for p in chosen]), torch.tensor([p[1] for p in chosen])
    rest = residual.clone()
    rest[rows, cols] = 0
    quantized = rtn(rest, BITS, GROUP)
    assert torch.equal(quantized[rows, cols], torch.zeros(count, dtype=torch.float64))  # the outliers' own codes stand for 0
    torch.testing.assert_close(factors.residual.dequantize(), quantized, atol=1e-9, rtol=0)
    by_position = dict(zip(zip(factors.rows.tolist(), factors.cols.tolist()), factors.values.tolist()))
    torch.testing.assert_close(torch.tensor([by_position[p] for p in chosen], dtype=torch.float64), residual[rows, cols], atol=1e-9, rtol=0)


@pytest.mark.parametrize("order", ["alternate", "lowrank-first", "quantize-first"])
def test_outliers_pay_for_planted_spikes_with_rank(order):
    # 40 huge entries spoil the quantization groups they sit in; keeping them exactly is worth more than
    # the low-rank direction they cost.
    generator = torch.Generator().manual_seed(4)
    weight, _ = case(seed=4)
    positions = torch.randperm(OUT * IN, generator=generator)[:40]
    weight.view(-1)[positions] = 40.0 * torch.sign(torch.randn(40, generator=generator))
    rank = plan_rank(inner=6)
    plain = factorize(weight, None, rank, LowRankQuantConfig(bits=BITS, group_size=GROUP, order=order))
    split = factorize(weight, None, rank, LowRankQuantConfig(bits=BITS, group_size=GROUP, order=order, outliers=40 / (OUT * IN)))
    assert isinstance(split, LowRankQuantSparseFactors) and (split.up.shape[1], plain.up.shape[1]) == (5, 6)
    assert error(weight.double(), split.dense(), None) < 0.5 * error(weight.double(), plain.dense(), None)
    if order == "quantize-first":  # outliers taken from W itself: exactly the planted ones
        assert set((split.rows * IN + split.cols).tolist()) == set(positions.tolist())


CONFIGS = [
    {"order": "alternate"},
    {"order": "lowrank-first"},
    {"order": "quantize-first"},
    {"order": "best", "quantizer": "gptq"},
    {"order": "alternate", "outliers": 0.01},
    {"order": "quantize-first", "outliers": 0.02, "quantizer": "gptq", "outlier_selection": "sensitivity"},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, rank, bits, group_size", [((64, 128), 40, 4, 64), ((128, 64), 30, 3, 32), ((48, 40), 14, 3, 16)])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda options: "-".join(f"{value}" for value in options.values()))
def test_stored_bits_stay_within_the_budget(options, shape, rank, bits, group_size, dtype):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(*shape, generator=generator).to(dtype)
    stats = LayerStatistics.zeros(shape[1])
    stats.inputs.update(torch.randn(200, shape[1], generator=generator, dtype=torch.float64))
    config = LowRankQuantConfig(bits=bits, group_size=group_size, whiten=True, **options)
    layer = build(factorize(weight, stats, rank, config), None, dtype)
    assert weight_bits(layer) <= budget_bits(*shape, rank, dtype)
    value = torch.finfo(dtype).bits
    count = outlier_count(*shape, config.outliers)
    assert layer.rank == lowrank_rank(*shape, rank, bits, group_size, value, count)
    outliers = count * (value + 16) + (shape[0] + 1) * 32 if count else 0
    assert layer.storage_bits() == layer.rank * sum(shape) * value + quantized_bits(*shape, bits, group_size) + outliers
    assert isinstance(layer, LowRankQuantSparseLinear if count else LowRankQuantLinear)


def test_storage_counted_by_hand_on_a_small_layer():
    # 8 × 40 at 3 bits in groups of 16 (3 groups a row), rank 2, 5 outliers, float32, no bias:
    codes = 8 * 40 * 3  # 320 codes, a multiple of 8, 3 bits each
    zeros = 24 * 3  # 24 groups, a multiple of 8, a 3-bit zero point each
    scales = 24 * 16  # a float16 scale per group
    factors = 2 * (8 + 40) * 32
    outliers = 5 * (32 + 16) + (8 + 1) * 32  # value + int16 column index each, int32 row pointers
    assert codes + zeros + scales + factors + outliers == 5016
    generator = torch.Generator().manual_seed(6)
    quantized = lowrank.linalg.quantize.quantize_groups(torch.randn(8, 40, generator=generator), 3, 16)
    rows, cols = torch.tensor([0, 0, 3, 7, 7]), torch.tensor([1, 39, 20, 0, 5])
    layer = LowRankQuantSparseLinear.from_factors(
        LowRankQuantSparseFactors(
            torch.randn(8, 2, generator=generator), torch.randn(2, 40, generator=generator), quantized, rows, cols, torch.randn(5)
        ),
        None,
        torch.float32,
    )
    assert layer.storage_bits() == 5016
    assert sum(t.numel() * t.element_size() * 8 for t in layer.state_dict().values()) == 5016  # every stored tensor, counted as stored


@pytest.mark.parametrize("options", CONFIGS + [{"order": "best", "outliers": 0.01}], ids=lambda options: "-".join(f"{v}" for v in options.values()))
def test_never_worse_than_the_plain_whitened_fit_at_the_same_budget(options):
    weight, stats = case(seed=7)
    rank = plan_rank()
    plain = output_error(weight, best_rank(weight.double(), stats.xtx, rank), stats.xtx)
    factors = factorize(weight, stats, rank, LowRankQuantConfig(bits=BITS, group_size=GROUP, whiten=True, **options))
    assert output_error(weight, factors.dense(), stats.xtx) <= plain * (1 + 1e-9)
    # An exactly low-rank weight is better kept as plain factors: the method falls back to them.
    low = weight.double()[:, :3] @ torch.randn(3, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    fallback = factorize(low.float(), stats, rank, LowRankQuantConfig(bits=BITS, group_size=GROUP, whiten=True, **options))
    assert isinstance(fallback, LowRankFactors)


def test_old_configs_load_and_new_options_are_checked():
    saved = {"version": 1, "bits": 3, "group_size": 64, "iterations": 5, "whiten": True, "precision": "float64"}  # written before the orders
    config = config_from_dict(LowRankQuantConfig, saved)
    assert (config.order, config.quantizer, config.outliers) == ("alternate", "rtn", 0.0)
    assert config_from_dict(LowRankQuantConfig, json.loads(json.dumps(config_to_dict(config)))) == config
    assert parse_overrides(LowRankQuantConfig, ["order=best", "outliers=0.005", "quantizer=gptq"]).outliers == 0.005
    for options, message in [
        ({"order": "svdquant"}, "order must be one of"),
        ({"quantizer": "awq"}, "quantizer must be one of"),
        ({"outliers": 1.0}, r"outliers must be a fraction in \[0, 1\)"),
        ({"outliers": float("nan")}, "outliers must be"),
        ({"outlier_selection": "fisher"}, "outlier_selection must be one of"),
    ]:
        with pytest.raises(lowrank.LowrankError, match=message) as raised:
            config_from_dict(LowRankQuantConfig, {**saved, **options})
        assert "\n" not in str(raised.value)
    for options in ({"quantizer": "gptq"}, {"outliers": 0.01, "outlier_selection": "sensitivity"}):
        with pytest.raises(lowrank.LowrankError, match="needs calibration statistics; pass --calib"):
            factorize(torch.randn(16, 32), None, 12, LowRankQuantConfig(group_size=16, **options))
    with pytest.raises(lowrank.LowrankError, match="with 256 outliers.*smaller outliers fraction"):
        factorize(torch.randn(64, 64), None, 6, LowRankQuantConfig(outliers=0.0625), name="layer")


@pytest.mark.parametrize(
    "family, dtype, options",
    [
        ("llama", torch.float32, {"outliers": 0.02, "order": "best", "quantizer": "gptq", "whiten": True}),
        ("opt", torch.bfloat16, {"outliers": 0.02, "order": "lowrank-first", "bits": 3}),
    ],
    ids=["llama-best-gptq-outliers", "opt-bfloat16-outliers"],
)
def test_compress_save_load_with_outliers_gives_the_same_logits(tmp_path, family, dtype, options):
    config = LowRankQuantConfig(group_size=32, **options)
    model, loaded, report = compress_save_load(tmp_path, family, "lowrank-quant", config, ratio=0.3, dtype=dtype)
    structures = {spec["structure"] for spec in report.modules.values()}
    assert "LowRankQuantSparseLinear" in structures
    assert all(spec["num_nonzero"] > 0 for spec in report.modules.values() if spec["structure"] == "LowRankQuantSparseLinear")
    assert_same_logits(model, loaded)
    assert lowrank.load(tmp_path / "out", return_report=True)[1].method_config == config_to_dict(config)
