"""Squared output gradients (the output Fisher) against autograd of a loss written here."""

import pytest
import torch
import torch.nn.functional as F

import lowrank
from tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_grad_sq_equals_autograd_of_the_summed_loss(family):
    model = tiny_model(family)
    names = lowrank.find_targets(model)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (2, 2, 12))]
    stats = lowrank.collect_statistics(model, batches, names, gradients=True, progress=False)
    # Reference: Σ over tokens of (∂L/∂y)², L the summed next-token cross-entropy computed from the
    # logits here, ∂L/∂y by torch.autograd.grad with respect to every layer's output (captured by hooks).
    expected = {name: torch.zeros(1, dtype=torch.float64) for name in names}
    for batch in batches:
        outputs = {}
        handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)) for name in names]
        logits = model(input_ids=batch["input_ids"]).logits
        for handle in handles:
            handle.remove()
        ids = batch["input_ids"]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        gradients = torch.autograd.grad(loss, [outputs[name] for name in names])
        for name, gradient in zip(names, gradients):
            expected[name] = expected[name] + gradient.double().reshape(-1, gradient.shape[-1]).pow(2).sum(0)
    for name in names:
        torch.testing.assert_close(stats[name].output_grad_sq, expected[name], rtol=1e-5, atol=1e-12)
        assert stats[name].num_grad_tokens == 2 * 2 * 12


def _summed_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("weight_gradients", [False, True])
@pytest.mark.parametrize("micro_batch", [1, 2, None])
def test_micro_batches_and_the_output_only_pass_change_no_statistic(weight_gradients, micro_batch):
    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (2, 3, 12))]
    # What each layer's weight requires while the statistics pass runs: the output-only pass must
    # form no weight gradient at all (no saved inputs, no (out, in) gradient per layer).
    requires = set()
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o: requires.add(m.weight.requires_grad)) for n in names]
    stats = lowrank.collect_statistics(
        model, batches, names, gradients=True, progress=False, weight_gradients=weight_gradients, micro_batch=micro_batch
    )
    for handle in handles:
        handle.remove()
    assert requires == {weight_gradients}
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # flags restored
    # Independent reference: autograd of the summed loss of each whole batch.
    for name in names:
        layer = model.get_submodule(name)
        expected = torch.zeros(layer.weight.shape[0], dtype=torch.float64)
        for batch in batches:
            (gradient,) = torch.autograd.grad(_summed_loss(model, batch["input_ids"]), [layer.weight])
            expected += gradient.double().pow(2).sum(dim=1)
        if weight_gradients:
            # Squared per whole batch, however the batch was split for the backward passes.
            torch.testing.assert_close(stats[name].weight_grad_sq, expected, rtol=1e-4, atol=1e-10)
        else:
            assert stats[name].weight_grad_sq is None
        assert stats[name].num_grad_tokens == 2 * 3 * 12


def test_micro_batches_of_padded_lines_mask_each_piece():
    from lowrank.calibration.formats import collect_masked_statistics

    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    ids = torch.randint(0, 128, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = mask[3, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    # The default micro-batch (2 rows) splits the batch: each piece must be masked with its own rows.
    whole = collect_masked_statistics(model, batches, names, gradients=True, progress=False)
    one_by_one = [{key: value[row : row + 1] for key, value in batches[0].items()} for row in range(4)]
    separate = collect_masked_statistics(model, one_by_one, names, gradients=True, progress=False)
    for name in names:
        scale = whole[name].xtx.abs().max().item()
        torch.testing.assert_close(whole[name].xtx, separate[name].xtx, rtol=1e-5, atol=1e-6 * scale)
        assert whole[name].num_tokens == separate[name].num_tokens == int(mask.sum())
        torch.testing.assert_close(whole[name].output_grad_sq, separate[name].output_grad_sq, rtol=1e-4, atol=1e-10)


def test_output_grad_gram_equals_autograd_and_is_kept_by_save_and_load(tmp_path):
    """Σ (∂L/∂y)(∂L/∂y)ᵀ of the asked layers against autograd of the summed loss; its diagonal is
    output_grad_sq; layers not asked for have none; the file round trip keeps it bit for bit."""
    from lowrank.calibration.statistics import load_statistics, save_statistics

    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    asked = [name for name in names if name.endswith("down_proj") or name.endswith("o_proj")]
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (2, 2, 12))]
    stats = lowrank.collect_statistics(model, batches, names, gradients=True, progress=False, output_gram=asked)
    expected = {name: 0 for name in asked}
    for batch in batches:
        outputs = {}
        handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)) for name in asked]
        loss = _summed_loss(model, batch["input_ids"])
        for handle in handles:
            handle.remove()
        for name, gradient in zip(asked, torch.autograd.grad(loss, [outputs[name] for name in asked])):
            flat = gradient.double().reshape(-1, gradient.shape[-1])
            expected[name] = expected[name] + flat.T @ flat
    for name in names:
        if name not in asked:
            assert stats[name].output_grad_gram is None and stats[name].output_fisher_matrix is None
            continue
        torch.testing.assert_close(stats[name].output_grad_gram, expected[name], rtol=1e-5, atol=1e-12)
        # output_grad_sq squares in float32, the Gram multiplies in float64: equal up to float32 rounding.
        torch.testing.assert_close(stats[name].output_grad_gram.diagonal(), stats[name].output_grad_sq, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(stats[name].output_fisher_matrix, expected[name] / (2 * 2 * 12), rtol=1e-5, atol=1e-12)
    save_statistics(stats, tmp_path / "stats.safetensors")
    loaded = load_statistics(tmp_path / "stats.safetensors")
    assert all(torch.equal(loaded[name].output_grad_gram, stats[name].output_grad_gram) for name in asked)
    assert all(loaded[name].output_grad_gram is None for name in names if name not in asked)
