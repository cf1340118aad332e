import pytest
import torch

import lowrank
from lowrank.calibration import LayerStatistics
from lowrank.cli.main import run
from lowrank.linalg import output_error, truncated_svd, whitened_svd
from lowrank.linalg.quantize import pack_bits, quantize_groups, quantized_bits, unpack_bits
from lowrank.methods.lowrank_quant import LowRankQuantConfig, build, factorize, lowrank_rank
from lowrank.nn import LowRankQuantLinear
from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors
from method_helpers import one_thread  # noqa: F401  (fixture)
from method_helpers import assert_same_logits, budget_bits, compress_save_load, weight_bits
from tiny_models import tiny_model


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 8, 13, 1000])
def test_packing_round_trips_at_the_stated_width(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // 8) * bits
    assert torch.equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits, group_size", [(4, 64), (3, 64), (4, 128), (3, 32), (2, 16)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size):
    weight = torch.randn(8, 200, generator=torch.Generator().manual_seed(0))
    quantized = quantize_groups(weight, bits, group_size)
    step = quantized.scales.double().repeat_interleave(group_size, dim=1)[:, :200]
    assert ((quantized.dequantize() - weight.double()).abs() <= step / 2 + 1e-7).all()
    assert int(quantized.codes.max()) <= 2**bits - 1 and quantized.scales.dtype == torch.float16


@pytest.mark.parametrize("shape", [(24, 64), (64, 24)])
@pytest.mark.parametrize("bits", [3, 4])
def test_full_budget_reproduces_the_weight(shape, bits):
    # A budget that pays for the residual plus a full-rank low-rank part reproduces W exactly.
    weight = torch.randn(*shape)
    rank = min(shape) + 16
    assert lowrank_rank(*shape, rank, bits, 64, 32) == min(shape)
    factors = factorize(weight, None, rank, LowRankQuantConfig(bits=bits))
    torch.testing.assert_close(factors.dense(), weight.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_alternation_beats_one_shot_and_plain_svd(bits):
    generator = torch.Generator().manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(64, 128, generator=generator), full_matrices=False)
    weight = (u * torch.logspace(1, -1, 64)) @ vh  # a decaying spectrum, as trained layers have
    errors = {steps: (weight.double() - factorize(weight, None, 40, LowRankQuantConfig(bits=bits, iterations=steps)).dense()).norm() for steps in (1, 5)}
    assert errors[5] < errors[1]
    assert errors[5] < 0.2 * (weight.double() - truncated_svd(weight, 40).dense()).norm()
    assert errors[5] < (weight.double() - quantize_groups(weight, bits, 64).dequantize()).norm()  # the low-rank part helps too

pytestmark = pytest.mark.usefixtures("one_thread")


def test_whitened_variant_lowers_the_output_error():
    generator = torch.Generator().manual_seed(1)
    stats = LayerStatistics.zeros(128)
    stats.inputs.update(torch.randn(500, 128, generator=generator, dtype=torch.float64) * torch.logspace(-1, 1, 128, dtype=torch.float64))
    weight = torch.randn(64, 128, generator=generator)
    plain = factorize(weight, stats, 40, LowRankQuantConfig())
    white = factorize(weight, stats, 40, LowRankQuantConfig(whiten=True))
    assert output_error(weight, white.dense(), stats.xtx) < output_error(weight, plain.dense(), stats.xtx)
    assert output_error(weight, white.dense(), stats.xtx) < output_error(weight, whitened_svd(weight, stats.xtx, 40).dense(), stats.xtx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, rank, bits, group_size", [((64, 128), 40, 4, 64), ((128, 64), 30, 3, 64), ((96, 96), 20, 4, 128), ((48, 40), 12, 3, 16)])
def test_stored_bits_stay_within_the_budget(shape, rank, bits, group_size, dtype):
    weight = torch.randn(*shape).to(dtype)
    layer = build(factorize(weight, None, rank, LowRankQuantConfig(bits=bits, group_size=group_size)), None, dtype)
    assert isinstance(layer, LowRankQuantLinear) and (layer.bits, layer.group_size) == (bits, group_size)
    assert weight_bits(layer) <= budget_bits(*shape, rank, dtype)
    value_bits = torch.finfo(dtype).bits
    assert layer.rank == lowrank_rank(*shape, rank, bits, group_size, value_bits)
    assert layer.storage_bits() == layer.rank * sum(shape) * value_bits + quantized_bits(*shape, bits, group_size)
    assert layer.spec()["bits_per_weight"] == pytest.approx(layer.storage_bits() / (shape[0] * shape[1]), abs=1e-4)


def test_too_small_a_budget_is_a_clear_error():
    with pytest.raises(lowrank.LowrankError, match="bits per weight"):
        factorize(torch.randn(64, 64).bfloat16(), None, 4, LowRankQuantConfig(bits=4), name="layer")
    with pytest.raises(lowrank.LowrankError, match="bits in 2..8"):
        factorize(torch.randn(64, 64), None, 40, LowRankQuantConfig(bits=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_applies_its_dense_weight(dtype):
    factors = factorize(torch.randn(24, 40), None, 20, LowRankQuantConfig(bits=3, group_size=16))
    assert isinstance(factors, LowRankQuantFactors)
    layer = LowRankQuantLinear.from_factors(factors, torch.randn(24), dtype)
    x = torch.randn(3, 5, 40, dtype=dtype)
    torch.testing.assert_close(layer(x).float(), x.float() @ layer.to_dense().float().T + layer.up.bias.float(), atol=1e-4 if dtype == torch.float32 else 0.2, rtol=1e-2)
    torch.testing.assert_close(layer.residual(torch.float64), factors.residual.dequantize(), atol=1e-12, rtol=0)
    assert layer.residual_codes.dtype == torch.uint8 and layer.residual_codes.numel() == 24 * 40 * 3 // 8
    assert "bits=3" in repr(layer)


@pytest.mark.parametrize(
    "family, dtype, bits, group_size",
    [("llama", torch.float32, 4, 16), ("gpt2", torch.float32, 3, 16), ("opt", torch.bfloat16, 4, 16), ("llama", torch.float32, 4, 32), ("opt", torch.bfloat16, 8, 32)],
    ids=["llama", "gpt2", "opt-bfloat16", "llama-int4-kernel", "opt-bfloat16-8bit-kernel"],
)
def test_compress_save_load_gives_the_same_logits(tmp_path, family, dtype, bits, group_size):
    # group size 16 dequantizes per call; 32 runs the int4 kernel (the run-time form is built again after
    # loading). bfloat16 rows use OPT: a Llama cast by .to(bfloat16) has bfloat16 rotary buffers, a loaded one float32.
    model, loaded, report = compress_save_load(tmp_path, family, "lowrank-quant", LowRankQuantConfig(bits=bits, group_size=group_size), ratio=0.3, dtype=dtype)
    specs = list(report.modules.values())
    assert {spec["structure"] for spec in specs} == {"LowRankQuantLinear"} and all(spec["bits"] == bits for spec in specs)
    assert_same_logits(model, loaded)


def test_fixture_round_trip(tmp_path, dense_model, tokenizer):
    plan = lowrank.allocate(dense_model, 0.6, method="lowrank-quant", include=[r"layers\.1\."])
    report = lowrank.compress_(dense_model, plan, method="lowrank-quant", config=LowRankQuantConfig(iterations=1), progress=False)
    lowrank.save(dense_model, tmp_path / "out", report=report, tokenizer=tokenizer)
    assert_same_logits(dense_model, lowrank.load(tmp_path / "out"), vocab_size=8192)


def test_cli_compress(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "compressed"
    code = run(["compress", str(tmp_path / "tiny"), "--method", "lowrank-quant", "--ratio", "0.3", "--option", "bits=3", "--option", "group_size=16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert {spec["bits"] for spec in lowrank.load(out, return_report=True)[1].modules.values()} == {3}
