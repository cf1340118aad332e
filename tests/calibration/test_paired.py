"""Paired statistics (dense vs compressed inputs of the same tokens) against sums of captured activations."""

import torch

from lowrank.calibration.paired import BlockStream, collect_paired_statistics, input_stages
from tiny_models import tiny_model


def _captured_inputs(model, names, batches):
    """Each layer's inputs over all batches, (tokens × in), captured by hooks written here."""
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: captured[name].append(i[0].detach().reshape(-1, i[0].shape[-1])))
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts).double() for name, parts in captured.items()}


def _within_round_off(actual, left, right):
    # Float32 products summed in float64: each entry within 1e-6 of the magnitudes it sums.
    return ((actual - left.T @ right).abs() <= 1e-6 * (left.abs().T @ right.abs())).all()


def test_paired_statistics_equal_hand_computed_sums():
    dense = tiny_model("llama")
    model = tiny_model("llama")
    with torch.no_grad():  # "compress" block 0 of the second model: its block-1 inputs shift
        for parameter in model.model.layers[0].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    names = [name for name, module in model.named_modules() if name.startswith("model.layers.1.") and isinstance(module, torch.nn.Linear)]
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (3, 2, 16))]
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    stats = collect_paired_statistics(dense, model, names, batches, stop_after="model.layers.1")
    handle.remove()
    assert head_calls == []  # the passes stopped after block 1
    x, shifted = _captured_inputs(dense, names, batches), _captured_inputs(model, names, batches)
    assert set(stats) == set(names) == set(x)
    for name in names:
        assert not torch.allclose(x[name], shifted[name])  # the inputs really differ
        assert _within_round_off(stats[name].shifted_xtx, shifted[name], shifted[name]), name
        assert _within_round_off(stats[name].cross, x[name], shifted[name]), name  # Σ x x̃ᵀ: dense on the left
        assert _within_round_off(stats[name].dense_xtx, x[name], x[name]), name
        torch.testing.assert_close(stats[name].shifted_abs_sum, shifted[name].abs().sum(0))
        assert stats[name].num_tokens == 3 * 2 * 16


def test_a_block_stream_gives_the_statistics_of_whole_model_passes():
    """Carried forward through a perturbed block 0, the stream's statistics of block 1's layers, and
    their stages, equal the whole-model passes'."""
    dense = tiny_model("llama")
    model = tiny_model("llama")
    with torch.no_grad():
        for parameter in model.model.layers[0].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    names = [name for name, module in model.named_modules() if name.startswith("model.layers.1.") and isinstance(module, torch.nn.Linear)]
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (3, 2, 16))]
    stream = BlockStream.for_models(dense, model, batches)
    assert stream.holds("model.layers.1") and not stream.holds("lm_head")
    stream.seek(dense, model, "model.layers.1")
    assert stream.index == 1 and not stream.holds("model.layers.0")
    stages = input_stages(model, names, batches[0], stop_after="model.layers.1")
    assert input_stages(model, names, None, stop_after="model.layers.1", stream=stream) == stages
    assert [len(stage) for stage in stages] == [3, 1, 2, 1]  # q/k/v, o, gate/up, down
    for stop in ("model.layers.1", stages[1][-1]):  # a whole block, and a stop inside it
        expected = collect_paired_statistics(dense, model, names, batches, stop_after=stop)
        streamed = collect_paired_statistics(dense, model, names, batches, stop_after=stop, stream=stream)
        assert set(streamed) == set(expected)
        for name in expected:
            for field in ("shifted_xtx", "cross", "dense_xtx", "shifted_abs_sum"):
                torch.testing.assert_close(getattr(streamed[name], field), getattr(expected[name], field), rtol=1e-6, atol=1e-8)
            assert streamed[name].num_tokens == expected[name].num_tokens
