"""The interleaved speed comparison and the bytes a decode step reads."""

import pytest
import torch
from torch import nn

import lowrank
from lowrank.evaluation.speed import bytes_per_token, compare_generation_speed, describe_measurement
from lowrank.nn import LowRankLinear
from tiny_models import tiny_model


def compressed_copy(ratio: float = 0.5) -> nn.Module:
    model = tiny_model("llama")
    lowrank.compress_(model, lowrank.allocate(model, ratio, method="svd"), method="svd", progress=False)
    return model


def test_compares_models_interleaved_against_the_baseline():
    models = {"dense": tiny_model("llama"), "svd": compressed_copy()}
    threads = torch.get_num_threads()
    results = compare_generation_speed(models, new_tokens=3, prefill_tokens=10, rounds=3, threads=1)
    assert torch.get_num_threads() == threads
    assert list(results) == ["dense", "svd"]
    dense, svd = results["dense"], results["svd"]
    assert dense.decode_vs_baseline.median == dense.decode_vs_baseline.low == dense.decode_vs_baseline.high == 1.0
    for result in results.values():
        assert len(result.times["decode"]) == len(result.times["prefill"]) == 3
        assert 0 < result.decode.low <= result.decode.median <= result.decode.high
        assert 0 < result.prefill.low <= result.prefill.median <= result.prefill.high
    # the ratio is the median of per-round ratios, from the very times measured
    ratios = sorted(b / t for b, t in zip(dense.times["decode"], svd.times["decode"]))
    assert svd.decode_vs_baseline.median == pytest.approx(ratios[1])
    assert svd.bytes_per_token < dense.bytes_per_token


def test_phases_can_be_skipped_and_a_baseline_chosen():
    models = {"a": tiny_model("llama"), "b": tiny_model("llama", seed=1)}
    results = compare_generation_speed(models, new_tokens=2, rounds=1, prefill=False, baseline="b", threads=None)
    assert results["a"].prefill is None and results["b"].decode_vs_baseline.median == 1.0
    assert "1 torch thread" in describe_measurement(5, 1) and "5 interleaved rounds" in describe_measurement(5, 1)


def test_bytes_per_token_counts_what_a_decode_step_reads():
    model = tiny_model("llama")  # vocabulary 128, hidden 32, untied output layer
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    embedding = model.get_input_embeddings().weight
    assert bytes_per_token(model) == weights + buffers - embedding.numel() * 4 + 32 * 4  # one embedding row

    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert bytes_per_token(tied) == 10 * 4 * 4  # the output layer reads the tied table whole, once

    layer = LowRankLinear(64, 32, rank=8)
    assert bytes_per_token(layer) == (8 * (64 + 32) + 32) * 4
