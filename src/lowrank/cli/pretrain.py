"""``lowrank pretrain``: train a model's architecture from scratch on a text file, logging loss and memory."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import Overwrite, TrustRemoteCode, check_device, format_table, input_model, megabytes
from .main import app

log = logging.getLogger("lowrank")


@app.command()
def pretrain(
    model_dir: Annotated[Path, typer.Argument(help="Directory whose config.json gives the architecture (weights are not read) and whose tokenizer is used.", show_default=False)],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file to train on.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory to save the trained model (SLTrain layers merged to dense), its tokenizer and training_log.json; default: save nothing.")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw, or projected (GaLore: AdamW inside a low-rank gradient subspace).")] = "adamw",
    proj_type: Annotated[str, typer.Option(help="Subspace basis of --optimizer projected: svd, randomized_svd, or dct (SVD-free, stores column indices only).")] = "svd",
    rank: Annotated[int, typer.Option(help="Subspace rank of --optimizer projected, for every weight matrix (embedding included).")] = 64,
    update_proj_gap: Annotated[int, typer.Option(help="Steps between subspace refreshes.")] = 200,
    scale: Annotated[float, typer.Option(help="Factor on the projected updates (GaLore's alpha).")] = 0.25,
    residual: Annotated[str, typer.Option(help="Update of the gradient outside the subspace: none, or sign (state-free signSGD, FRUGAL-style).")] = "none",
    parameterization: Annotated[str, typer.Option(help="dense, or sltrain (block linears become low-rank + sparse: W = B·A + S).")] = "dense",
    sltrain_rank: Annotated[float, typer.Option(help="Rank of SLTrain layers: an integer, or a fraction in (0, 1) of each layer's smaller side.")] = 0.25,
    density: Annotated[float, typer.Option(help="Fraction of each SLTrain layer's entries in its sparse part.")] = 0.03,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, then cosine decay to a tenth).")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = 20,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the initialization and of the batch sampling.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between loss log lines.")] = 10,
    device: Annotated[str, typer.Option(help="Device to train on (cpu, cuda).")] = "cpu",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train from scratch with AdamW, the GaLore projected optimizer, and/or SLTrain layers; print loss, optimizer state and memory."""
    from lowrank.calibration import read_text
    from lowrank.calibration.data import tokenize_stream
    from lowrank.io import atomic_directory, check_output
    from lowrank.models import load_tokenizer
    from lowrank.train import PretrainConfig, build_optimizer, merge_low_rank_sparse_, model_from_config, prepare_model_
    from lowrank.train import pretrain as run_pretraining

    config = PretrainConfig(
        optimizer=optimizer, proj_type=proj_type, rank=rank, update_proj_gap=update_proj_gap, scale=scale, residual=residual,
        parameterization=parameterization, sltrain_rank=sltrain_rank, density=density, steps=steps, batch_size=batch_size,
        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, seed=seed, log_every=log_every,
    )  # fmt: skip
    config.validate()
    check_device(device)
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    if out is not None:
        check_output(out, [source, model_dir, text], overwrite)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LowrankError(f"{model_dir} has no tokenizer files; pretraining needs one to read --text")
    token_ids = tokenize_stream(tokenizer, read_text(text))

    model = prepare_model_(model_from_config(model_dir, seed=seed), config).to(device)
    report = run_pretraining(model, token_ids, config, optimizer=build_optimizer(model, config))

    rows = [
        ["final loss (mean of the last ≤ 10 steps)", f"{report.final_loss():.4f}"],
        ["trainable parameters", f"{report.parameters:,}"],
        ["optimizer state", megabytes(report.optimizer_state_bytes)],
        ["peak memory (CUDA allocated, or process RSS on CPU)", megabytes(report.peak_memory_bytes)],
        ["tokens per second", f"{report.tokens_per_second:,.0f}"],
    ]
    print(format_table(["measure", "value"], rows))
    if out is None:
        return
    merge_low_rank_sparse_(model)  # a dense checkpoint loads anywhere
    with atomic_directory(out, overwrite, [source, model_dir, text]) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        record = {"config": dataclasses.asdict(config), "report": dataclasses.asdict(report)}
        (temporary / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out}")

