"""The training loop and the ``lowrank pretrain`` command."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from lowrank.cli.main import run
from lowrank.errors import LowrankError
from lowrank.train import PretrainConfig, build_optimizer, optimizer_state_bytes, prepare_model_, pretrain, training_batch


def _learnable_tokens() -> torch.Tensor:
    # A repeating 16-token phrase: a model that learns anything lowers its loss quickly.
    return torch.arange(16).repeat(200)


@pytest.mark.parametrize(
    "config",
    [
        PretrainConfig(optimizer="adamw"),
        PretrainConfig(optimizer="projected", proj_type="svd", rank=8, update_proj_gap=5, scale=1.0),
        PretrainConfig(optimizer="projected", proj_type="dct", rank=8, update_proj_gap=5, scale=1.0),
        PretrainConfig(parameterization="sltrain", sltrain_rank=8, density=0.05),
    ],
    ids=["adamw", "projected-svd", "projected-dct", "sltrain"],
)
def test_training_lowers_the_loss(config):
    config.steps, config.batch_size, config.seq_len, config.lr, config.warmup_steps = 15, 4, 32, 1e-2, 2
    model = prepare_model_(tiny_model("llama"), config)
    logged = []
    report = pretrain(model, _learnable_tokens(), config, on_log=lambda step, loss: logged.append(step))
    assert len(report.losses) == 15 and logged == [10, 15]
    assert report.final_loss(3) < 0.75 * report.losses[0]
    assert report.optimizer_state_bytes > 0 and report.peak_memory_bytes > 0 and report.tokens_per_second > 0


def test_projected_state_is_smaller_than_adamw():
    model = tiny_model("llama")
    sizes = {}
    for name, config in {"adamw": PretrainConfig(), "projected": PretrainConfig(optimizer="projected", rank=4, proj_type="dct")}.items():
        optimizer = build_optimizer(model, config)
        model(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
        optimizer.step()
        model.zero_grad()
        sizes[name] = optimizer_state_bytes(optimizer)
    # Expected from the shapes alone. AdamW: two float32 moments per parameter and a float32 step.
    parameters = list(model.parameters())
    assert sizes["adamw"] == sum(2 * p.numel() * 4 + 4 for p in parameters)
    # Projected (rank 4, DCT): a matrix keeps its moments on its larger side × 4, 4 int64 column
    # indices and an int64 step; vectors keep full moments and an int64 step.
    matrices = sum(2 * max(p.shape) * 4 * 4 + 4 * 8 + 8 for p in parameters if p.ndim == 2)
    vectors = sum(2 * p.numel() * 4 + 8 for p in parameters if p.ndim != 2)
    assert sizes["projected"] == matrices + vectors < 0.5 * sizes["adamw"]


def test_training_batch_is_a_pure_function_of_seed_and_step():
    tokens = torch.arange(1000)
    assert torch.equal(training_batch(tokens, 3, 4, 16, seed=1), training_batch(tokens, 3, 4, 16, seed=1))
    assert not torch.equal(training_batch(tokens, 3, 4, 16, seed=1), training_batch(tokens, 4, 4, 16, seed=1))
    with pytest.raises(LowrankError, match="longer file"):
        training_batch(torch.arange(10), 0, 1, 16)


def test_cli_trains_the_fixture_architecture_and_saves_a_dense_model(fixture_path, calib_text, tmp_path):
    import lowrank

    text = tmp_path / "train.txt"
    text.write_text(calib_text[:20_000])
    out = tmp_path / "trained"
    arguments = ["pretrain", str(fixture_path), "--text", str(text), "--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    options = ["--optimizer", "projected", "--proj-type", "dct", "--rank", "32", "--parameterization", "sltrain", "--log-every", "1"]
    assert run(arguments + options) == 0
    record = json.loads((out / "training_log.json").read_text())
    assert record["config"]["proj_type"] == "dct" and len(record["report"]["losses"]) == 2
    model = lowrank.load(out)
    assert torch.isfinite(model(torch.arange(8).unsqueeze(0)).logits).all()
    assert run(arguments + options) == 2  # refuses to overwrite


@pytest.mark.parametrize(
    "options, message",
    [(["--optimizer", "sgd"], "optimizer must be one of"), (["--proj-type", "qr"], "projection type"), (["--seq-len", "1"], "sequence length")],
)
def test_cli_bad_options_give_one_line_errors(fixture_path, tmp_path, capsys, options, message):
    text = tmp_path / "train.txt"
    text.write_text("x = 1\n")
    assert run(["pretrain", str(fixture_path), "--text", str(text)] + options) == 2
    assert message in capsys.readouterr().err
