"""Every architecture of the matrix (tests/architectures.py): compress → save → load, outputs kept.

Each case builds a tiny model from its config, calibrates on its own kind of input (token ids, a
padded encoder batch, or source + decoder ids), compresses every linear layer in its blocks with
whitened SVD at ratio 0.5, and reloads it from disk alone.
"""

import pytest
import torch
from architectures import ARCHITECTURES, README, features, group_names, readme_table, render_table
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank.nn import LowRankLinear, find_blocks


def main_output(output) -> torch.Tensor:
    """Logits of a language model, the last hidden state of an encoder."""
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def block_linears(model: nn.Module, stacks: dict[str, int]) -> list[str]:
    """Every dense linear layer inside the named block stacks, checking each block's count."""
    names = []
    for stack_name, per_block in stacks.items():
        for index, block in enumerate(model.get_submodule(stack_name)):
            linears = [f"{stack_name}.{index}.{name}" for name, module in block.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
            assert len(linears) == per_block, f"{stack_name}.{index} holds {len(linears)} linear layers, expected {per_block}"
            names += linears
    return names


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda architecture: architecture.name)
def test_compress_save_load_keeps_the_outputs(tmp_path, architecture):
    model = architecture.build()
    generator = torch.Generator().manual_seed(0)
    batches = [architecture.make_batch(generator) for _ in range(2)]
    fresh = architecture.make_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_output = main_output(model(**fresh))

    # The blocks are found by structure, and every linear in them (q/k/v or fused qkv, MLP) is targeted.
    assert [name for name, _ in find_blocks(model)] == list(architecture.targets_per_block)
    expected = block_linears(model, architecture.targets_per_block)
    assert lowrank.find_targets(model) == expected

    stats = lowrank.collect_statistics(model, batches, expected, progress=False)
    plan = lowrank.allocate(model, 0.5, stats=stats)
    report = lowrank.compress_(model, plan, method="whiten", stats=stats, progress=False)
    assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in expected)
    assert report.parameters["targeted_after"] < report.parameters["targeted_before"]

    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    assert type(loaded) is type(model)
    assert all(isinstance(loaded.get_submodule(name), LowRankLinear) for name in expected)
    with torch.no_grad():
        compressed_output, loaded_output = main_output(model(**fresh)), main_output(loaded(**fresh))
    assert torch.equal(loaded_output, compressed_output)
    assert not torch.equal(compressed_output, dense_output)  # compression did change the model
    assert torch.isfinite(compressed_output).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda architecture: architecture.name)
def test_token_windows_as_calibrate_feeds_them_reach_every_layer(architecture):
    # lowrank.calibrate runs model(input_ids=windows, labels=windows): encoders ignore the labels,
    # T5 runs its decoder on the shifted labels; collect_statistics asserts every layer was reached.
    model = architecture.build()
    windows = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    names = lowrank.find_targets(model)
    stats = lowrank.collect_statistics(model, [{"input_ids": windows, "labels": windows}], names, progress=False)
    assert set(stats) == set(names)


def test_matrix_covers_the_required_features():
    found = " ".join(feature for architecture in ARCHITECTURES for feature in features(architecture.build()))
    for feature in ("GQA", "multi-query", "fused QKV", "fused gate/up", "Conv1D", "encoder", "encoder-decoder"):
        assert feature in found, feature


def test_group_names_is_compact_and_counts_numbered_siblings():
    assert group_names(["attn.q", "attn.k", "mlp.up"]) == "attn.{q,k}, mlp.up"
    assert group_names(["layer.0.SelfAttention.q", "layer.1.Dense.wi"]) == "layer.0.SelfAttention.q, layer.1.Dense.wi"
    assert group_names(["moe.gate", "moe.experts.up.0", "moe.experts.up.1", "moe.experts.down.0", "moe.experts.down.1"]) == (
        "moe.gate, moe.experts.up.* ×2, moe.experts.down.* ×2"
    )


def test_readme_table_matches_the_matrix():
    assert readme_table(README.read_text()) == render_table(), (
        "the README's supported-architectures table is out of date; run `python tests/architectures.py --write-readme`"
    )
