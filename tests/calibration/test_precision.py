"""Float32 per-batch XᵀX summed in a float32 accumulator gives the statistics, factors and
perplexity of an all-float64 accumulation, to tolerances that still tell two different calibration
samples apart.

The reference is computed here, independently of the package: hooks capture every targeted
layer's inputs and sum ``x.double().T @ x.double()`` — what calibration did before it switched to
float32 products and float32 sums. The fixture runs use one window per batch, so the float32 sum
takes 16 additions (a default calibration takes 8 to 64).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank.calibration import InputStatistics, LayerStatistics, calibration_batches
from lowrank.calibration.statistics import add_gram_, full_float32_matmul
from tiny_models import tiny_model

# On the fixture (16 × 128 windows, one per batch, whiten at 0.4) float32 products and sums must
# match float64 ones within these relative tolerances, while a second calibration sample (seed 1)
# must differ by more: the slow tests below assert both.
GRAM_TOLERANCE = 1e-6
ERROR_TOLERANCE = 1e-6
PERPLEXITY_TOLERANCE = 1e-5


def float64_reference(model, batches, names) -> dict[str, LayerStatistics]:
    """Statistics the way calibration computed them before: float64 products, float64 sums."""
    sums = {name: None for name in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            counts[name] += x.shape[0]

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return {
        name: LayerStatistics(InputStatistics(xtx=sums[name], abs_sum=torch.zeros(sums[name].shape[0], dtype=torch.float64), num_tokens=counts[name]))
        for name in names
    }


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_add_gram_is_within_the_float32_bound_and_sums_in_float64():
    torch.manual_seed(0)
    x, y = torch.randn(3000, 48), torch.randn(3000, 40)
    total = add_gram_(torch.zeros(48, 40, dtype=torch.float64), x, y)
    exact = x.double().T @ y.double()
    # Each entry within a few float32 roundings of the sum of the magnitudes it adds up.
    assert ((total - exact).abs() <= 1e-6 * (x.double().abs().T @ y.double().abs())).all()
    assert total.dtype == torch.float64
    # A float32 GEMM, not float64: the result is not bit-identical to the float64 product.
    assert not torch.equal(total, exact)


def test_reduced_precision_matmul_settings_do_not_reach_the_statistics():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with full_float32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_half_precision_inputs_are_accumulated_in_float32_from_their_values():
    x = torch.randn(256, 16).to(torch.bfloat16)
    total = add_gram_(torch.zeros(16, 16, dtype=torch.float64), x)
    # A float32 sum of 256 exact products: ~1e-6 from float64, in an order that depends on the thread
    # count (one thread gave 1.5e-6 on an entry of 0.24); the same product in bfloat16 is up to 1 off.
    torch.testing.assert_close(total, x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


def test_tiny_model_statistics_match_the_float64_reference():
    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(3)]
    reference = float64_reference(model, batches, names)
    stats = lowrank.collect_statistics(model, batches, names, progress=False)
    for name in names:
        assert relative_difference(stats[name].xtx, reference[name].xtx) <= GRAM_TOLERANCE
        assert stats[name].xtx.dtype == torch.float32  # half the memory of float64 sums


def test_float64_models_keep_float64_sums():
    model = tiny_model("llama").double()
    names = lowrank.find_targets(model)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(2)]
    stats = lowrank.collect_statistics(model, batches, names, progress=False)
    reference = float64_reference(model, batches, names)
    for name in names:
        assert stats[name].xtx.dtype == torch.float64
        assert relative_difference(stats[name].xtx, reference[name].xtx) <= 1e-12


@pytest.fixture(scope="module")
def fixture_runs(fixture_path, tokenizer, calib_text, eval_text):
    """Statistics, whitened factors at ratio 0.4 and perplexity: new accumulation, float64 reference,
    and the new accumulation on a different calibration sample (seed 1)."""
    from lowrank.models import load_pretrained

    dense = load_pretrained(fixture_path)
    names = lowrank.find_targets(dense)
    runs = {}
    for label, seed in (("float32", 0), ("float64", 0), ("other sample", 1)):
        batches = calibration_batches(tokenizer, calib_text, num_samples=16, seq_len=128, seed=seed, batch_size=1)
        if label == "float64":
            stats = float64_reference(dense, batches, names)
        else:
            stats = lowrank.collect_statistics(dense, batches, names, progress=False)
        model = copy.deepcopy(dense)
        plan = lowrank.allocate(model, 0.4, method="whiten", stats=stats)
        lowrank.compress_(model, plan, method="whiten", stats=stats, progress=False)
        perplexity = lowrank.perplexity(model, tokenizer, eval_text, max_windows=8, progress=False)
        runs[label] = {"stats": stats, "model": model, "perplexity": perplexity}
    runs["dense"] = dense
    return runs


def layer_errors(runs, label) -> dict[str, float]:
    """Whitened output error of every compressed layer, measured on the float64 reference statistics."""
    dense, reference = runs["dense"], runs["float64"]["stats"]
    errors = {}
    for name in reference:
        weight = dense.get_submodule(name).weight.detach()
        approximation = runs[label]["model"].get_submodule(name).to_dense()
        errors[name] = lowrank.linalg.output_error(weight, approximation, reference[name].xtx)
    return errors


@pytest.mark.slow
def test_fixture_statistics_equal_float64_and_differ_from_another_sample(fixture_runs):
    new, old, other = (fixture_runs[label]["stats"] for label in ("float32", "float64", "other sample"))
    for name in old:
        assert relative_difference(new[name].xtx, old[name].xtx) <= GRAM_TOLERANCE, name
        # The tolerance tells samples apart: 16 other windows move XᵀX by far more.
        assert relative_difference(other[name].xtx, old[name].xtx) > 100 * GRAM_TOLERANCE, name


@pytest.mark.slow
def test_fixture_factors_and_perplexity_equal_float64(fixture_runs):
    new, old, other = layer_errors(fixture_runs, "float32"), layer_errors(fixture_runs, "float64"), layer_errors(fixture_runs, "other sample")
    for name in old:
        assert abs(new[name] - old[name]) <= ERROR_TOLERANCE * old[name], name
    # Factors fit to another sample have visibly larger errors on this one.
    assert sum(abs(other[name] - old[name]) > ERROR_TOLERANCE * old[name] for name in old) > len(old) // 2
    perplexities = {label: fixture_runs[label]["perplexity"] for label in ("float32", "float64", "other sample")}
    assert abs(perplexities["float32"] - perplexities["float64"]) <= PERPLEXITY_TOLERANCE * perplexities["float64"], perplexities
    assert abs(perplexities["other sample"] - perplexities["float64"]) > PERPLEXITY_TOLERANCE * perplexities["float64"], perplexities
