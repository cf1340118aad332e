import math

import torch

import lowrank
from lowrank.calibration.data import consecutive_windows, tokenize_stream


def test_perplexity_is_the_token_weighted_mean_loss(dense_model, tokenizer, eval_text):
    windows = consecutive_windows(tokenize_stream(tokenizer, eval_text), 128, max_windows=6)
    with torch.no_grad():
        losses = [dense_model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal-length windows: plain mean = token-weighted
    measured = lowrank.perplexity(dense_model, tokenizer, eval_text, seq_len=128, batch_size=4, max_windows=6, progress=False)
    assert measured == pytest_approx(expected)


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-5)


def test_parameter_count_counts_tied_weights_once(dense_model):
    assert lowrank.count_parameters(dense_model) == 7_212_288
    assert sum(p.numel() for p in dense_model.parameters()) == 7_212_288  # parameters() already dedups ties


def test_generation_speed_is_positive(dense_model, tokenizer):
    assert lowrank.generation_speed(dense_model, tokenizer, new_tokens=8, repeats=1) > 0
