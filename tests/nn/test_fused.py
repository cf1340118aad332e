"""Fused sibling ``down`` matmuls: a run-time optimization that never changes what a layer computes."""

import copy

import pytest
import torch

import lowrank
import lowrank.nn.layout as layout
from lowrank.nn import LowRankLinear
from lowrank.nn.fused import SharedInputGroup, find_shared_inputs, fuse_shared_inputs_, unfuse_shared_inputs_
from tiny_models import tiny_model


def compressed(family: str = "llama") -> torch.nn.Module:
    return compressed_with_report(family)[0]


def compressed_with_report(family: str = "llama") -> tuple[torch.nn.Module, lowrank.CompressionReport]:
    model = tiny_model(family)
    return model, lowrank.compress_(model, lowrank.allocate(model, 0.4, method="svd"), method="svd", progress=False)


def siblings(seed: int = 0) -> tuple[list[LowRankLinear], SharedInputGroup]:
    torch.manual_seed(seed)
    layers = [LowRankLinear.from_linear(torch.nn.Linear(24, out), rank) for out, rank in ((16, 6), (8, 3), (8, 4))]
    group = SharedInputGroup(layers)
    for layer in layers:
        layer.shared_input = group
    return layers, group


def unfused(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    return layer.up(layer.down(x))


@pytest.mark.parametrize("family, groups_per_block", [("llama", 2), ("qwen2", 2), ("opt", 1)])
def test_finds_the_layers_that_read_the_same_tensor(family, groups_per_block):
    model = compressed(family)
    groups = find_shared_inputs(model)
    assert len(groups) == groups_per_block * 2  # two blocks
    names = {tuple(name.rsplit(".", 1)[1] for name in group) for group in groups}
    expected = {"llama": {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}, "opt": {("q_proj", "k_proj", "v_proj")}}
    assert names == expected.get(family, expected["llama"])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_logits_and_generation_are_unchanged(family):
    model = compressed(family)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
        greedy = model.generate(x[:1], max_new_tokens=6, do_sample=False)
    fuse_shared_inputs_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=1e-6, rtol=1e-6)
        assert torch.equal(model.generate(x[:1], max_new_tokens=6, do_sample=False), greedy)


def test_one_stacked_matmul_per_input():
    layers, group = siblings()
    x = torch.randn(2, 24)
    with torch.no_grad():
        outputs = [layer(x) for layer in layers]
    assert group.computations == 1
    for layer, output in zip(layers, outputs):
        torch.testing.assert_close(output, unfused(layer, x))
    assert group.stacked_weight() is group.stacked_weight()


def test_a_different_input_is_never_served_a_cached_slice():
    layers, group = siblings()
    x, other = torch.randn(2, 24), torch.randn(2, 24)
    with torch.no_grad():
        layers[0](x)
        torch.testing.assert_close(layers[1](other), unfused(layers[1], other))  # not x's slice
        x.mul_(2)  # same tensor, changed in place: its cached product is stale
        torch.testing.assert_close(layers[2](x), unfused(layers[2], x))
        torch.testing.assert_close(layers[0](x), unfused(layers[0], x))
        torch.testing.assert_close(layers[0](x), unfused(layers[0], x))  # twice in a row: recomputed, not stale
    assert group.computations >= 4


def test_a_changed_weight_restacks():
    layers, _ = siblings()
    x = torch.randn(1, 24)
    with torch.no_grad():
        layers[0](x)
        layers[1].down.weight.mul_(-3)
        for layer in layers:
            torch.testing.assert_close(layer(x), unfused(layer, x))


def test_gradients_bypass_the_fusion():
    layers, group = siblings()
    x = torch.randn(3, 24, requires_grad=True)
    sum(layer(x).square().sum() for layer in layers).backward()
    got = [x.grad.clone()] + [layer.down.weight.grad.clone() for layer in layers]
    assert group.computations == 0
    x.grad = None
    for layer in layers:
        layer.zero_grad()
    sum(unfused(layer, x).square().sum() for layer in layers).backward()
    for a, b in zip(got, [x.grad] + [layer.down.weight.grad for layer in layers]):
        torch.testing.assert_close(a, b)


def test_save_load_and_copies_are_unaffected(tmp_path):
    model, report = compressed_with_report()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        unfused_logits = model(x).logits
    fuse_shared_inputs_(model)
    with torch.no_grad():
        logits = model(x).logits
    state = model.state_dict()
    assert list(state) == list(keys) and all(torch.equal(state[k], keys[k]) for k in keys)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    assert all(m.shared_input is None for m in loaded.modules() if isinstance(m, LowRankLinear))
    copied = copy.deepcopy(model)
    groups = {id(m.shared_input) for m in copied.modules() if isinstance(m, LowRankLinear) and m.shared_input is not None}
    assert len(groups) == 4 and not groups & {id(m.shared_input) for m in model.modules() if isinstance(m, LowRankLinear)}
    assert all(member in set(copied.modules()) for m in copied.modules() if getattr(m, "shared_input", None) for member in m.shared_input.members)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, unfused_logits)  # the saved model is the unfused one, exactly
        assert torch.equal(copied(x).logits, logits)
    torch.testing.assert_close(logits, unfused_logits, atol=1e-6, rtol=1e-6)
    unfuse_shared_inputs_(model)
    assert all(m.shared_input is None for m in model.modules() if isinstance(m, LowRankLinear))


@pytest.mark.skipif(not layout.ONEDNN_PACKING, reason="no oneDNN bfloat16 path (torch without oneDNN, or a CPU without AVX-512)")
def test_bfloat16_stacked_weight_is_packed_once_with_unchanged_outputs(monkeypatch):
    monkeypatch.setattr(layout, "PACKED_MIN_MULTIPLY_ADDS", 0)  # these layers are smaller than what packs
    layers, group = siblings()
    for layer in layers:
        layer.to(torch.bfloat16)
    inputs = [torch.randn(1, 1, 24).bfloat16(), torch.randn(1, 1, 24).bfloat16(), torch.randn(2, 7, 24).bfloat16()]
    with torch.no_grad():
        for x in inputs:
            for layer in layers:
                torch.testing.assert_close(layer(x), unfused(layer, x))  # bfloat16 tolerance
        assert group._packed.builds == 1 and group._packed.value.is_mkldnn and group.computations == 3
        assert all(m.__dict__["_packed_weight"].builds == 1 for layer in layers for m in (layer.up,))  # the up factors too, once
        layers[1].down.weight.mul_(2)  # restacked, and so repacked
        torch.testing.assert_close(layers[1](inputs[0]), unfused(layers[1], inputs[0]))
    assert group._packed.builds == 2
