import math

import pytest
import torch

import lowrank
from lowrank.calibration.data import consecutive_windows, tokenize_stream


def test_perplexity_is_the_token_weighted_mean_loss(dense_model, tokenizer, eval_text):
    windows = consecutive_windows(tokenize_stream(tokenizer, eval_text), 128, max_windows=6)
    with torch.no_grad():
        losses = [dense_model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal-length windows: plain mean = token-weighted
    measured = lowrank.perplexity(dense_model, tokenizer, eval_text, seq_len=128, batch_size=4, max_windows=6, progress=False)
    assert measured == pytest.approx(expected, rel=1e-5)


def test_parameter_count_counts_tied_weights_once(dense_model):
    config = dense_model.config  # llama, tied embeddings: the count follows from the config alone
    hidden, layers = config.hidden_size, config.num_hidden_layers
    attention = 2 * hidden * config.num_attention_heads * config.head_dim + 2 * hidden * config.num_key_value_heads * config.head_dim
    per_block = attention + 3 * hidden * config.intermediate_size + 2 * hidden  # + two RMSNorm weights
    expected = config.vocab_size * hidden + layers * per_block + hidden  # embedding once, final norm
    assert config.tie_word_embeddings and lowrank.count_parameters(dense_model) == expected == 7_212_288


def test_parameter_count_counts_shared_storage_once():
    # Two Parameter objects over one storage (as after loading tied weights without re-tying):
    # parameters() yields both, the count must not.
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = torch.nn.Parameter(embedding.weight.data)
    model = torch.nn.Sequential(embedding, head, torch.nn.Linear(4, 3))
    assert len(list(model.parameters())) == 4
    assert lowrank.count_parameters(model) == 10 * 4 + 4 * 3 + 3


class _Tokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1, 2, 3]}


def test_generation_speed_is_new_tokens_over_the_fastest_timed_run(monkeypatch):
    from types import SimpleNamespace

    from lowrank.evaluation import speed
    from tiny_models import tiny_model

    model = tiny_model("llama")
    generated = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: generated.append(generate(*args, **kwargs).shape[1]) or None)
    # A clock read only by lowrank's timing (start, end per timed run): runs of 0.5 s, 0.25 s, 0.4 s.
    clock = iter([10.0, 10.5, 20.0, 20.25, 30.0, 30.4])
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert lowrank.generation_speed(model, _Tokenizer(), new_tokens=8, repeats=3) == pytest.approx(8 / 0.25)
    assert generated == [3 + 8] * 4  # one untimed warm-up, three timed runs, each exactly 8 new tokens
