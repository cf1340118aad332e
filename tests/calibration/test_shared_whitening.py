"""Layers that read one input (q/k/v, gate/up) share its statistics, and so one whitening per pass
over the layers; it is released after the last of them, so one input's matrices are alive at a time."""

from __future__ import annotations

import pytest
import torch

import lowrank
from tiny_models import tiny_model


@pytest.mark.parametrize("method", ["whiten", "fisher-whiten"])
def test_one_whitening_per_shared_input(method, monkeypatch):
    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (2, 2, 16))]
    stats = lowrank.collect_statistics(model, batches, names, gradients=True, progress=False)  # global reads the Fisher
    inputs = {id(stats[name].inputs) for name in names}
    assert len(inputs) == 4 * 2 < len(names)  # per block: attention in, o_proj in, MLP in, down_proj in
    calls = []
    import lowrank.linalg.whiten as whiten

    whitening = whiten.whitening
    monkeypatch.setattr(whiten, "whitening", lambda matrix, *args, **kwargs: calls.append(matrix.shape) or whitening(matrix, *args, **kwargs))
    plan = lowrank.allocate(model, 0.5, method=method, stats=stats, strategy="global")
    assert len(calls) == len(inputs)  # the loss curves whiten each input once
    lowrank.compress_(model, plan, method=method, stats=stats, progress=False)
    assert len(calls) == 2 * len(inputs)
    assert all(not layer.inputs._cache for layer in stats.values())  # nothing left holding n×n matrices


def test_a_whitening_is_released_after_every_layer_reading_the_input_fetched_it():
    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    stats = lowrank.collect_statistics(model, [{"input_ids": torch.randint(0, 128, (2, 16))}], names, progress=False)
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    computed = []
    compute = lambda: computed.append(1) or object()  # noqa: E731
    first = q.cached("key", compute)
    assert k.cached("key", compute) is first and q.cached("key", compute) is first and len(computed) == 1
    assert v.cached("key", compute) is first and not q.inputs._cache  # v was the last reader: released
    assert v.cached("key", compute) is not first and len(computed) == 2  # a new pass computes it again


def test_a_pass_over_some_layers_releases_after_the_last_of_them():
    from lowrank.calibration.statistics import one_pass

    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    stats = lowrank.collect_statistics(model, [{"input_ids": torch.randint(0, 128, (2, 16))}], names, progress=False)
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    with one_pass(stats, [f"model.layers.0.self_attn.{p}_proj" for p in "qk"]):  # v stays dense
        first = q.whitening()
        assert k.whitening() is first  # shared, then released: v will never ask
        assert not q.inputs._cache
        q.whitening()
    assert not q.inputs._cache and q.inputs._readers is None  # emptied on exit
    assert q.whitening() is k.whitening() is v.whitening()  # outside a pass: every consumer counts
    assert not q.inputs._cache
