"""Sequential compression with closed-form refit (compress_(..., sequential=batches))."""

import pytest
import torch

import lowrank
from lowrank.calibration import calibration_batches
from tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_refit_never_raises_the_calibration_error(family):
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=generator)} for _ in range(4)]
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, 0.5, stats=stats)
    report = lowrank.compress_(model, plan, method="whiten", stats=stats, sequential=batches, progress=False)
    assert set(report.refit_errors) == set(plan.ranks)
    for name, errors in report.refit_errors.items():
        assert errors["refit"] <= errors["without_refit"] * (1 + 1e-5) + 1e-9, name
    # The first block sees dense inputs: refit changes nothing there.
    first = [n for n in plan.ranks if ".0." in n and ("q_proj" in n or "c_attn" in n)]
    assert first and all(report.refit_errors[n]["refit"] == pytest.approx(report.refit_errors[n]["without_refit"], rel=1e-4) for n in first)


def test_sequential_fixture_round_trip(tmp_path, dense_model, tokenizer, calib_text, fixture_stats):
    batches = calibration_batches(tokenizer, calib_text, num_samples=8, seq_len=64, batch_size=4)
    plan = lowrank.allocate(dense_model, 0.4, stats=fixture_stats)
    report = lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, sequential=batches, progress=False)
    later = [errors for name, errors in report.refit_errors.items() if ".5." in name]
    assert any(errors["refit"] < errors["without_refit"] * 0.999 for errors in later)  # refit helps deep layers
    lowrank.save(dense_model, tmp_path / "out")
    x = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        assert torch.equal(lowrank.load(tmp_path / "out")(x).logits, dense_model(x).logits)


def test_whiten_refit_is_a_method_name(tmp_path):
    model = tiny_model("llama")
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))} for _ in range(2)]
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, 0.5, stats=stats)
    with pytest.raises(lowrank.LowrankError, match="block by block"):
        lowrank.compress_(model, plan, method="whiten-refit", stats=stats, progress=False)
    report = lowrank.compress_(model, plan, method="whiten-refit", stats=stats, sequential=batches, progress=False)
    assert report.method == "whiten-refit" and set(report.refit_errors) == set(plan.ranks)
