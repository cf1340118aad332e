"""``modegpt`` with the cross-layer correction (``sequential=``, ``anchor=``), on a tiny Llama.

The references are independent of the library's refit: least squares on the activations captured
from the finished model by forward hooks, and the one-shot model itself at α = 1.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import calibrated_tiny, token_batches

import lowrank
from lowrank.calibration.paired import collect_paired_statistics
from lowrank.errors import LowrankError
from lowrank.linalg.cross_layer import weighted_shifted_error
from lowrank.methods.modegpt import ModegptConfig
from lowrank.nn.resized_linear import ResizedLinear

RATIO = 0.5
# fallback=False: every MLP and value/output unit shrinks, so each kind of refit is exercised.
CONFIG = ModegptConfig(factored="fisher-whiten", attention="value", value_metric="o_proj", fallback=False)


@pytest.fixture(scope="module")
def setting():
    dense, stats = calibrated_tiny("llama")
    plan = lowrank.allocate(dense, RATIO, method="modegpt", stats=stats, strategy="global", strategy_config=CONFIG)
    return dense, stats, plan, token_batches()


_COMPRESSED: dict = {}


def _compressed(setting, anchor):
    """The tiny Llama compressed with ``anchor`` (``None``: one-shot), once per anchor; tests only read it."""
    if anchor not in _COMPRESSED:
        dense, stats, plan, batches = setting
        model = copy.deepcopy(dense)
        sequential = None if anchor is None else batches
        report = lowrank.compress_(model, plan, method="modegpt", stats=stats, config=CONFIG, sequential=sequential, anchor=anchor, progress=False)
        _COMPRESSED[anchor] = model, report
    return _COMPRESSED[anchor]


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=batch["input_ids"]).logits for batch in batches])


def _down_inputs(model, name, batches) -> torch.Tensor:
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    try:
        _logits(model, batches)
    finally:
        handle.remove()
    return torch.cat(captured).double()


def test_anchor_one_is_the_one_shot_model(setting):
    one_shot, _ = _compressed(setting, None)
    corrected, report = _compressed(setting, 1.0)
    torch.testing.assert_close(_logits(corrected, setting[3]), _logits(one_shot, setting[3]), rtol=1e-4, atol=1e-5)
    assert report.refit_errors  # every refit layer was measured
    assert report.parameters["targeted_after"] == _compressed(setting, None)[1].parameters["targeted_after"]


def test_down_projection_is_the_least_squares_fit_of_the_dense_output_on_the_compressed_activations(setting):
    dense, _, _, batches = setting
    model, report = _compressed(setting, 0.0)
    name = "model.layers.1.mlp.down_proj"  # the second block: its inputs are shifted by the first
    layer = model.get_submodule(name)
    assert isinstance(layer, ResizedLinear) and "fell_back" not in report.refit_errors[name]
    dense_inputs, compressed_inputs = _down_inputs(dense, name, batches), _down_inputs(model, name, batches)
    targets = dense_inputs @ dense.get_submodule(name).weight.detach().double().T
    expected = np.linalg.lstsq(compressed_inputs.numpy(), targets.numpy(), rcond=None)[0].T
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), expected, rtol=1e-3, atol=1e-5)


def _dense_weight(layer) -> torch.Tensor:
    return (layer.weight if isinstance(layer, (torch.nn.Linear, ResizedLinear)) else layer.to_dense()).detach().double()


@pytest.mark.parametrize("anchor", [0.0, 0.5])
def test_no_refit_reproduces_the_dense_output_worse_than_the_one_shot_fit(setting, anchor):
    # Judged on the calibration tokens, per output weighted by the loss's Fisher information, against
    # the same layer of the one-shot model (same kept neurons, same ranks), on the inputs the finished
    # corrected model feeds it.
    dense, stats, _, batches = setting
    one_shot, _ = _compressed(setting, None)
    model, report = _compressed(setting, anchor)
    members = {name for entry in report.plan.details["modegpt"]["units"].values() for name in entry["members"]}
    assert members <= set(report.refit_errors)  # gate, up and down of every shrunk MLP
    assert any(name.endswith("q_proj") for name in report.refit_errors)  # and the factored attention layers
    paired = collect_paired_statistics(dense, model, list(report.refit_errors), batches)
    for name in report.refit_errors:
        weight, fisher = dense.get_submodule(name).weight.detach().double(), stats[name].output_fisher
        corrected, uncorrected = _dense_weight(model.get_submodule(name)), _dense_weight(one_shot.get_submodule(name))
        if corrected.shape[0] < weight.shape[0]:  # a shrunk gate/up: the one-shot fit is the kept dense rows themselves
            rows = [int(torch.nonzero((weight == row).all(1))[0]) for row in uncorrected]
            weight, fisher = weight[rows], fisher[rows]
        assert weighted_shifted_error(weight, corrected, paired[name], fisher) <= weighted_shifted_error(weight, uncorrected, paired[name], fisher) * (1 + 1e-6), name


def test_saved_and_loaded_logits_are_the_same(setting, tmp_path):
    model, report = _compressed(setting, 0.5)
    lowrank.save(model, tmp_path / "corrected", report=report)
    loaded = lowrank.load(tmp_path / "corrected")
    torch.testing.assert_close(_logits(loaded, setting[3][:1]), _logits(model, setting[3][:1]), rtol=0, atol=0)


def test_bad_input_is_a_one_line_error(setting):
    dense, stats, plan, batches = setting
    with pytest.raises(LowrankError, match="anchor takes a value in"):
        lowrank.get_method("modegpt").compress(copy.deepcopy(dense), plan, stats, CONFIG, False, sequential=None, anchor=0.5)
    with pytest.raises(LowrankError, match="anchor takes a value in"):
        lowrank.compress_(copy.deepcopy(dense), plan, method="modegpt", stats=stats, config=CONFIG, sequential=batches, anchor=1.5, progress=False)
    shared = lowrank.allocate(dense, RATIO, method="basis-sharing", stats=stats)
    with pytest.raises(LowrankError, match="no sequential refit"):
        lowrank.compress_(copy.deepcopy(dense), shared, method="basis-sharing", stats=stats, sequential=batches, progress=False)
