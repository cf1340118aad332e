"""Training a model from scratch on a text file with AdamW, GradientProjectionAdamW (GaLore) and/or SLTrain layers."""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch import nn

from ..errors import LowrankError
from ..models import load_config
from .galore import GradientProjectionAdamW, projected_parameter_groups
from .projection import PROJECTION_TYPES
from .sltrain import LowRankSparseConfig, to_low_rank_sparse_

log = logging.getLogger("lowrank")

OPTIMIZERS = ("adamw", "projected")
PARAMETERIZATIONS = ("dense", "sltrain")


@dataclasses.dataclass
class PretrainConfig:
    """What to train and how.

    Attributes:
        optimizer: ``"adamw"`` or ``"projected"`` (:class:`GradientProjectionAdamW`, GaLore).
        proj_type: basis of the projected optimizer: ``"svd"``, ``"randomized_svd"`` or ``"dct"``.
        rank: subspace rank of the projected optimizer (every matrix, the embedding included).
        update_proj_gap: steps between basis refreshes.
        scale: factor on the projected updates (GaLore's α).
        residual: ``"none"`` or ``"sign"`` (state-free signSGD on the gradient outside the subspace).
        parameterization: ``"dense"`` or ``"sltrain"`` (block linears become low-rank + sparse).
        sltrain_rank: rank of the SLTrain layers (integer, or fraction of each layer's smaller side).
        density: fraction of each SLTrain layer's entries in its sparse part.
        steps: optimizer steps.
        batch_size: sequences per step (the global batch: split across processes under DDP).
        seq_len: tokens per sequence.
        lr: peak learning rate (linear warm-up, then cosine decay to a tenth).
        warmup_steps: steps of linear warm-up.
        weight_decay: decoupled weight decay.
        seed: seeds initialization and batch sampling.
        log_every: steps between log lines.
        version: format version of this config.

    Example:
        >>> PretrainConfig(optimizer="projected", proj_type="dct", rank=64).steps
        200
    """

    optimizer: str = "adamw"
    proj_type: str = "svd"
    rank: int = 64
    update_proj_gap: int = 200
    scale: float = 0.25
    residual: str = "none"
    parameterization: str = "dense"
    sltrain_rank: float = 0.25
    density: float = 0.03
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    version: int = 1

    def validate(self) -> None:
        """Raise a one-line :class:`LowrankError` for an unusable setting."""
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.proj_type in PROJECTION_TYPES, f"projection type must be one of {PROJECTION_TYPES}, got {self.proj_type!r}"),
            (self.parameterization in PARAMETERIZATIONS, f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}"),
            (self.residual in ("none", "sign"), f"residual must be 'none' or 'sign', got {self.residual!r}"),
            (self.rank >= 1 and self.update_proj_gap >= 1, "rank and update-proj-gap must be ≥ 1"),
            (self.steps >= 1 and self.batch_size >= 1 and self.seq_len >= 2, "steps and batch size must be ≥ 1, sequence length ≥ 2"),
            (self.lr > 0 and self.warmup_steps >= 0, "learning rate must be positive and warm-up steps ≥ 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LowrankError(message)


@dataclasses.dataclass
class PretrainReport:
    """What a training run measured.

    Attributes:
        losses: training loss of every step (averaged over processes).
        tokens_per_second: training throughput over all processes, first step included.
        optimizer_state_bytes: bytes of optimizer state tensors held by this process.
        peak_memory_bytes: peak GPU memory allocated on CUDA, else the process's peak resident memory.
        parameters: trainable parameters of the model.
        seconds: wall time of the training loop.
    """

    losses: list[float]
    tokens_per_second: float
    optimizer_state_bytes: int
    peak_memory_bytes: int
    parameters: int
    seconds: float

    def final_loss(self, last: int = 10) -> float:
        """Mean loss of the last ``last`` steps (less noisy than the very last one)."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def model_from_config(model_dir: str | Path, seed: int = 0) -> nn.Module:
    """A freshly initialized model with the architecture in ``model_dir/config.json`` (weights are not read).

    Example:
        >>> model = model_from_config("../shared/fixtures/pycode-llama")  # doctest: +SKIP
    """
    config = load_config(model_dir)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def prepare_model_(model: nn.Module, config: PretrainConfig) -> nn.Module:
    """Apply the parameterization (SLTrain layers in the blocks for ``"sltrain"``); returns the model."""
    if config.parameterization == "sltrain":
        to_low_rank_sparse_(model, LowRankSparseConfig(rank=config.sltrain_rank, density=config.density, seed=config.seed))
    return model


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` or :class:`GradientProjectionAdamW` over the model's trainable parameters.

    Example:
        >>> optimizer = build_optimizer(nn.Linear(8, 8), PretrainConfig(optimizer="projected", rank=2))
    """
    if config.optimizer == "adamw":
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    groups = projected_parameter_groups(
        model, config.rank, update_proj_gap=config.update_proj_gap, scale=config.scale, proj_type=config.proj_type, residual=config.residual
    )
    return GradientProjectionAdamW(groups, lr=config.lr, weight_decay=config.weight_decay, seed=config.seed)


def training_batch(token_ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """The (batch_size, seq_len) windows of step ``step``: random offsets, a pure function of (seed, step).

    Example:
        >>> training_batch(torch.arange(100), step=3, batch_size=2, seq_len=8).shape
        torch.Size([2, 8])
    """
    if token_ids.numel() <= seq_len:
        raise LowrankError(f"the text has {token_ids.numel()} tokens, not more than one sequence of {seq_len}; pass a longer file or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, token_ids.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([token_ids[start : start + seq_len] for start in starts.tolist()])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, counters: bool = True) -> int:
    """Bytes of every tensor in the optimizer state (this process's shards under FSDP).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        counters: include the scalar tensors (AdamW's step counters); without them the count is the
            per-parameter state alone (the moments), what a size estimate from the parameters gives.

    Example:
        >>> layer = nn.Linear(4, 2); optimizer = torch.optim.AdamW(layer.parameters())
        >>> layer(torch.ones(1, 4)).sum().backward(); optimizer.step()
        >>> optimizer_state_bytes(optimizer, counters=False)  # two float32 moments of 10 values
        80
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and (counters or value.ndim > 0):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak CUDA memory allocated on ``device`` if it is a GPU, else the peak resident memory of this process."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kilobytes


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(
    model: nn.Module,
    token_ids: torch.Tensor,
    config: PretrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    on_log: Callable[[int, float], None] | None = None,
) -> PretrainReport:
    """Train ``model`` (a causal LM, possibly wrapped in DDP or FSDP) on ``token_ids`` for ``config.steps`` steps.

    Each step draws ``config.batch_size`` windows (:func:`training_batch`); when
    ``torch.distributed`` is initialized, process ``k`` of ``n`` trains on rows ``k·b/n ...`` of
    that global batch, so ``n`` processes see exactly the batch one process would.

    Args:
        model: the model; its parameters are updated in place.
        token_ids: the training text as a 1-D tensor of token ids.
        config: training settings.
        optimizer: defaults to :func:`build_optimizer` on ``model``.
        on_log: called as ``on_log(step, loss)`` every ``config.log_every`` steps (default: log a line).

    Returns:
        A :class:`PretrainReport`.

    Example:
        >>> report = pretrain(model, token_ids, PretrainConfig(steps=10, seq_len=64))  # doctest: +SKIP
    """
    config.validate()
    process_index, process_count = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if config.batch_size % process_count:
        raise LowrankError(f"batch size {config.batch_size} does not split over {process_count} processes; pass a multiple of {process_count}")
    local_rows = config.batch_size // process_count
    optimizer = optimizer if optimizer is not None else build_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps))
    device = next(model.parameters()).device
    on_log = on_log or (lambda step, loss: log.info("step %d  loss %.4f", step, loss))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        batch = training_batch(token_ids, step, config.batch_size, config.seq_len, config.seed)
        batch = batch[process_index * local_rows : (process_index + 1) * local_rows].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().float()
        if process_count > 1:
            dist.all_reduce(value)
            value /= process_count
        losses.append(float(value))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            on_log(step + 1, losses[-1])
    seconds = time.perf_counter() - start
    return PretrainReport(
        losses=losses,
        tokens_per_second=config.steps * config.batch_size * config.seq_len / seconds,
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        peak_memory_bytes=peak_memory_bytes(device),
        parameters=sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad),
        seconds=seconds,
    )
