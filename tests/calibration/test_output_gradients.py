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
