import pytest
import torch

import lowrank
from lowrank.calibration import load_statistics, sample_windows, save_statistics
from lowrank.errors import LowrankError
from tiny_models import tiny_model


def test_statistics_equal_hand_computed_xtx():
    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(3)]
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: captured[name].append(i[0].detach()))
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    stats = lowrank.collect_statistics(model, batches, names, progress=False)
    for name in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[name]]).double()
        # Float32 products summed in float64: each entry within 1e-6 of the magnitudes it sums.
        assert ((stats[name].xtx - x.T @ x).abs() <= 1e-6 * (x.abs().T @ x.abs())).all()
        torch.testing.assert_close(stats[name].abs_sum, x.abs().sum(0))
        assert stats[name].num_tokens == 3 * 2 * 16


def test_layers_with_the_same_input_share_one_accumulator():
    model = tiny_model("llama")
    stats = lowrank.collect_statistics(model, [{"input_ids": torch.randint(0, 128, (1, 8))}], lowrank.find_targets(model), progress=False)
    layer = "model.layers.0"
    attention = [stats[f"{layer}.self_attn.{p}_proj"].inputs for p in "qkv"]
    assert attention[0] is attention[1] is attention[2]
    assert stats[f"{layer}.mlp.gate_proj"].inputs is stats[f"{layer}.mlp.up_proj"].inputs
    assert stats[f"{layer}.self_attn.o_proj"].inputs is not attention[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_statistics_equal_autograd(family):
    model = tiny_model(family)
    names = lowrank.find_targets(model)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (2, 2, 12))]
    stats = lowrank.collect_statistics(model, batches, names, gradients=True, progress=False)
    # Calibration leaves no gradients behind and gives every parameter its requires_grad back.
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    # Reference: the per-batch weight gradients of the summed loss, by plain autograd.
    expected = {name: 0 for name in names}
    for batch in batches:
        model.zero_grad()
        (model(**batch).loss * batch["labels"][:, 1:].numel()).backward()
        for name in names:
            weight = lowrank.nn.linear_weight(model.get_submodule(name))
            grad = model.get_submodule(name).weight.grad
            grad = grad.T if lowrank.nn.is_conv1d(model.get_submodule(name)) else grad
            assert grad.shape == weight.shape
            expected[name] = expected[name] + grad.double().pow(2).sum(1)
    for name in names:
        torch.testing.assert_close(stats[name].weight_grad_sq, expected[name])
        assert stats[name].num_grad_tokens == 2 * 2 * 12 and stats[name].output_fisher.shape == (weight_rows(model, name),)
    # output_grad_sq itself is checked against autograd in test_output_gradients.py.


def weight_rows(model, name):
    return lowrank.nn.linear_weight(model.get_submodule(name)).shape[0]


def test_sampling_is_seeded():
    ids = torch.arange(1000)
    torch.testing.assert_close(sample_windows(ids, 4, 32, seed=1), sample_windows(ids, 4, 32, seed=1))
    assert not torch.equal(sample_windows(ids, 4, 32, seed=1), sample_windows(ids, 4, 32, seed=2))
    windows = sample_windows(ids, 4, 32, seed=1)
    assert windows.shape == (4, 32) and torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(4, 31, dtype=torch.long))


def test_text_shorter_than_one_window_is_a_clear_error(tokenizer, dense_model):
    with pytest.raises(LowrankError, match="fewer than one window"):
        lowrank.calibrate(dense_model, tokenizer, "def f(): pass", num_samples=2, seq_len=256, progress=False)


def test_calibration_of_the_fixture_is_deterministic(dense_model, tokenizer, calib_text, fixture_stats):
    again = lowrank.calibrate(dense_model, tokenizer, calib_text, num_samples=16, seq_len=128, progress=False)
    name = "model.layers.3.mlp.down_proj"
    torch.testing.assert_close(again[name].xtx, fixture_stats[name].xtx)
    assert again[name].num_tokens == 16 * 128


def test_statistics_round_trip_through_safetensors(tmp_path, fixture_stats):
    save_statistics(fixture_stats, tmp_path / "stats.safetensors")
    loaded = load_statistics(tmp_path / "stats.safetensors")
    assert set(loaded) == set(fixture_stats)
    name = "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(loaded[name].xtx, fixture_stats[name].xtx)
    assert loaded[name].num_tokens == fixture_stats[name].num_tokens


def test_layers_sharing_an_input_share_it_after_the_round_trip(tmp_path, fixture_stats):
    from safetensors import safe_open

    save_statistics(fixture_stats, tmp_path / "stats.safetensors")
    loaded = load_statistics(tmp_path / "stats.safetensors")
    q, k, v = (f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
    assert fixture_stats[q].inputs is fixture_stats[k].inputs  # the premise: calibration shares q/k/v's input
    assert loaded[q].inputs is loaded[k].inputs is loaded[v].inputs
    assert loaded[q].inputs is not loaded["model.layers.1.self_attn.o_proj"].inputs
    for name in (q, k, v):
        torch.testing.assert_close(loaded[name].xtx, fixture_stats[name].xtx, rtol=0, atol=0)
    with safe_open(str(tmp_path / "stats.safetensors"), framework="pt") as handle:
        matrices = [key for key in handle.keys() if key.endswith(".xtx")]
    assert len(matrices) == len({id(stats.inputs) for stats in fixture_stats.values()})  # each input once


def test_statistics_files_written_before_inputs_were_shared_still_load(tmp_path, fixture_stats):
    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.o_proj"
    stats = fixture_stats[name]
    save_file({f"{name}.xtx": stats.xtx.clone(), f"{name}.abs_sum": stats.abs_sum.clone()}, str(tmp_path / "old.safetensors"),
              metadata={name: f"{stats.num_tokens},0"})  # fmt: skip
    loaded = load_statistics(tmp_path / "old.safetensors")
    torch.testing.assert_close(loaded[name].xtx, stats.xtx, rtol=0, atol=0)
    assert loaded[name].num_tokens == stats.num_tokens


def test_gradients_from_a_model_without_a_loss_is_a_clear_error():
    import transformers

    import lowrank

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}]
    with pytest.raises(lowrank.LowrankError, match="returned no loss"):
        lowrank.collect_statistics(model, batches, lowrank.find_targets(model), gradients=True, progress=False)
    assert all(parameter.grad is None for parameter in model.parameters())


class _CountCalls:
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.count += 1


def test_calibration_without_gradients_stops_at_the_output_head():
    model = tiny_model("llama")
    names = lowrank.find_targets(model)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (3, 2, 16))]
    head, norm = _CountCalls(model.lm_head), _CountCalls(model.model.norm)
    stats = lowrank.collect_statistics(model, batches, names, progress=False)
    assert head.count == 0 and norm.count == 3  # everything up to the head ran, no logits or loss
    with_gradients = lowrank.collect_statistics(model, batches, names, gradients=True, progress=False)
    assert head.count == 3  # the loss needs the head
    for name in names:
        torch.testing.assert_close(stats[name].xtx, with_gradients[name].xtx)
        assert stats[name].num_tokens == 3 * 2 * 16


def test_an_output_head_that_is_a_target_is_calibrated():
    model = tiny_model("llama")
    names = [*lowrank.find_targets(model), "lm_head"]
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))}]
    stats = lowrank.collect_statistics(model, batches, names, progress=False)
    assert stats["lm_head"].num_tokens == 32 and stats["lm_head"].xtx.abs().sum() > 0
