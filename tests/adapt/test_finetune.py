"""On the fixture: every init keeps the model's outputs at step 0, and a short fine-tune lowers the loss.

Same for WeLore training of a compressed model and for full fine-tuning.
"""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.adapt import (
    CovarianceConfig,
    FinetuneConfig,
    MinorConfig,
    PrincipalConfig,
    RandomConfig,
    SingularValueConfig,
    finetune,
    prepare_welore_,
    trainable_summary,
)
from lowrank.calibration import sample_windows, tokenize_stream
from lowrank.errors import LowrankError
from lowrank.train.pretrain import learning_rate_factor

STEPS = FinetuneConfig(steps=10, batch_size=2, seq_len=48, learning_rate=3e-3, warmup_steps=2)
FACTOR_STEPS = FinetuneConfig(steps=10, batch_size=2, seq_len=48, learning_rate=3e-4, warmup_steps=2)
FIRST_BLOCKS = [r"layers\.[01]\."]  # two of six blocks keep the decompositions quick

CONFIGS = [
    ("principal", PrincipalConfig(rank=4)),
    ("minor", MinorConfig(rank=4)),
    ("covariance-instruction", CovarianceConfig(rank=4, mode="instruction")),
    ("covariance-knowledge", CovarianceConfig(rank=4, mode="knowledge")),
    ("singular-value", SingularValueConfig(rank=4)),
    ("random", RandomConfig(rank=4)),
]


@pytest.fixture(scope="module")
def docs_text(data_dir) -> str:
    """English documentation: a domain the code model has barely seen, so the loss falls fast."""
    path = data_dir / "pydocs-train.txt"
    if not path.is_file():
        pytest.skip(f"training text not found at {path}")
    return path.read_text()[:200_000]


def held_out_windows(tokenizer, text: str) -> torch.Tensor:
    """4 fixed windows drawn with another seed than the training's."""
    return sample_windows(tokenize_stream(tokenizer, text), 4, 48, seed=123)


def held_out_loss(model, tokenizer, text: str) -> float:
    windows = held_out_windows(tokenizer, text)
    with torch.no_grad():
        return model(input_ids=windows, labels=windows).loss.item()


@pytest.mark.parametrize("name,config", CONFIGS, ids=[row[0] for row in CONFIGS])
def test_step_zero_equality_then_a_short_finetune_lowers_the_loss(name, config, dense_model, tokenizer, block_stats, docs_text, adapt_quietly):
    windows = held_out_windows(tokenizer, docs_text)
    with torch.no_grad():
        dense = dense_model(input_ids=windows, labels=windows)
    config = type(config)(**{**config.__dict__, "include": FIRST_BLOCKS})
    report = adapt_quietly(dense_model, config, block_stats)
    assert len(report.layers) == 14
    with torch.no_grad():
        step_zero = dense_model(input_ids=windows, labels=windows)
    assert torch.allclose(step_zero.logits, dense.logits, atol=1e-4), (step_zero.logits - dense.logits).abs().max()
    before = dense.loss.item()
    result = finetune(dense_model, tokenizer, docs_text, STEPS, progress=False)
    after = held_out_loss(dense_model, tokenizer, docs_text)
    assert len(result.losses) == STEPS.steps
    assert after < before - 0.05, (before, after)
    assert result.optimizer_bytes == trainable_summary(dense_model).optimizer_bytes > 0


def test_welore_trains_only_the_factors_and_lowers_the_loss(dense_model, tokenizer, block_stats, docs_text):
    plan = lowrank.allocate(dense_model, 0.4, method="whiten", stats=block_stats, include=FIRST_BLOCKS)
    lowrank.compress_(dense_model, plan, method="whiten", stats=block_stats, progress=False)
    summary = prepare_welore_(dense_model)
    factored = [m for m in dense_model.modules() if isinstance(m, lowrank.LowRankLinear)]
    assert summary.trainable_parameters == sum(m.up.weight.numel() + m.down.weight.numel() for m in factored)
    assert summary.optimizer_bytes == 2 * 4 * summary.trainable_parameters  # AdamW, float32
    assert all(p.requires_grad == (".up.weight" in n or ".down.weight" in n) for n, p in dense_model.named_parameters())
    before = held_out_loss(dense_model, tokenizer, docs_text)
    result = finetune(dense_model, tokenizer, docs_text, FACTOR_STEPS, progress=False)
    assert held_out_loss(dense_model, tokenizer, docs_text) < before - 0.05
    assert result.optimizer_bytes == summary.optimizer_bytes


def test_full_finetune_and_errors(dense_model, tokenizer, docs_text):
    with pytest.raises(LowrankError, match="compress it first"):
        prepare_welore_(dense_model)
    dense_model.requires_grad_(False)
    with pytest.raises(LowrankError, match="nothing to train"):
        finetune(dense_model, tokenizer, docs_text, STEPS, progress=False)
    dense_model.requires_grad_(True)
    before = held_out_loss(dense_model, tokenizer, docs_text)
    finetune(dense_model, tokenizer, docs_text, FinetuneConfig(steps=3, batch_size=2, seq_len=48, learning_rate=2e-4, warmup_steps=1), progress=False)
    assert held_out_loss(dense_model, tokenizer, docs_text) < before


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    config = FinetuneConfig(steps=100, warmup_steps=10)
    factors = [learning_rate_factor(step, config.warmup_steps, config.steps) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.1)
