"""Every registered method, whatever file it came from: what the pipeline promises for each.

A new method needs no edit here: the table is ``lowrank.method_names()``. For each method on a tiny
Llama: compress at 0.4 within the storage budget, save → load gives identical logits, and the
``nested`` capability is honest (the rank-r factors are the first r components of the factors at a
larger rank, so ``--elastic`` models resize by truncation).
"""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.compress import storage_bits
from method_helpers import assert_same_logits, one_thread  # noqa: F401  (fixture)
from tiny_models import tiny_model

METHODS = lowrank.method_names()


def _statistics(model, spec):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids} if spec.needs_gradients else {"input_ids": ids})
    return lowrank.collect_statistics(model, batches, lowrank.find_targets(model), gradients=spec.needs_gradients, progress=False), batches


@pytest.mark.parametrize("method", METHODS)
def test_every_method_compresses_within_budget_and_round_trips(method, tmp_path, one_thread):  # noqa: F811
    spec = lowrank.get_method(method)
    model = tiny_model("llama")
    stats, batches = _statistics(model, spec)
    plan = lowrank.allocate(model, 0.4, method=method, stats=stats)
    if getattr(spec, "compress", None) is not None:  # a method that shrinks whole modules (modegpt) has its own verb
        report = spec.compress(model, plan, stats, None, progress=False)
    else:
        report = lowrank.compress_(model, plan, method=method, stats=stats, sequential=batches if spec.sequential else None, progress=False)
    counts = report.parameters
    assert counts["targeted_bits_after"] == sum(storage_bits(model.get_submodule(name)) for name in plan.shapes)
    assert counts["targeted_bits_after"] < counts["targeted_bits_before"]
    lowrank.save(model, tmp_path / "out", report=report)
    assert_same_logits(model, lowrank.load(tmp_path / "out"))


@pytest.mark.parametrize("method", [name for name in METHODS if lowrank.get_method(name).nested])
def test_nested_methods_truncate_to_their_smaller_ranks(method, one_thread):  # noqa: F811
    spec = lowrank.get_method(method)
    model = tiny_model("llama")
    stats, _ = _statistics(model, spec)
    name = lowrank.find_targets(model)[0]
    weight = lowrank.nn.linear_weight(model.get_submodule(name)).detach()
    large = spec.factorize(weight, stats[name] if stats else None, 12, spec.config_class())
    small = spec.factorize(weight, stats[name] if stats else None, 5, spec.config_class())
    torch.testing.assert_close(large.up[:, :5] @ large.down[:5], small.dense(), rtol=1e-9, atol=1e-10)
