"""A short, plain fine-tuning loop: AdamW on random windows of a text file, with a progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import sample_windows, tokenize_stream
from ..errors import LowrankError
from ..train.pretrain import learning_rate_factor, optimizer_state_bytes
from .welore import trainable_summary


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune`.

    Attributes:
        steps: optimizer steps.
        batch_size: windows per step.
        seq_len: tokens per window.
        learning_rate: peak AdamW learning rate (after a linear warmup, cosine decay to 10 %).
        warmup_steps: steps of linear warmup.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (0: none).
        seed: seed of the window sampling.

    Example:
        >>> config = FinetuneConfig(steps=100, batch_size=8, seq_len=128, learning_rate=5e-4)
    """

    version: int = 1
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class FinetuneResult:
    """What :func:`finetune` measured.

    Attributes:
        losses: training loss of every step.
        seconds: wall time of the loop.
        trainable_parameters: parameters the optimizer updated.
        optimizer_bytes: memory of the optimizer state after training (exact, from its tensors).
        peak_memory_bytes: peak accelerator memory (``None`` on CPU).
    """

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_parameters: int = 0
    optimizer_bytes: int = 0
    peak_memory_bytes: int | None = None

    @property
    def steps_per_second(self) -> float:
        return len(self.losses) / self.seconds if self.seconds > 0 else 0.0


def finetune(model: nn.Module, tokenizer, text: str, config: FinetuneConfig | None = None, progress: bool = True) -> FinetuneResult:
    """Train the parameters of ``model`` that require gradients on next-token prediction over ``text``.

    Works the same for adapters (:func:`adapt_`), WeLore (:func:`prepare_welore_`) and full
    fine-tuning (every parameter trainable): what trains is what ``requires_grad`` says.

    Args:
        model: a causal language model taking ``input_ids`` and ``labels``.
        tokenizer: its tokenizer.
        text: training text; windows start at seeded random offsets.
        config: a :class:`FinetuneConfig` (default: its defaults).
        progress: show a progress bar with the running loss.

    Returns:
        A :class:`FinetuneResult`.

    Example:
        >>> result = finetune(model, tokenizer, open("train.txt").read(), FinetuneConfig(steps=50))  # doctest: +SKIP
        >>> result.losses[-1] < result.losses[0]  # doctest: +SKIP
        True
    """
    config = config or FinetuneConfig()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise LowrankError("nothing to train: no parameter requires gradients; call adapt_ or prepare_welore_ first")
    if config.steps < 1 or config.batch_size < 1:
        raise LowrankError(f"need steps ≥ 1 and batch_size ≥ 1, got {config.steps} and {config.batch_size}")
    device = parameters[0].device
    windows = sample_windows(tokenize_stream(tokenizer, text), config.steps * config.batch_size, config.seq_len, config.seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    result = FinetuneResult(trainable_parameters=trainable_summary(model).trainable_parameters)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="finetune", disable=not progress, unit="step")
    for step in bar:
        batch = windows[step * config.batch_size : (step + 1) * config.batch_size].to(device)  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    result.seconds = time.perf_counter() - start
    model.eval()
    result.optimizer_bytes = optimizer_state_bytes(optimizer, counters=False)  # the moments, as trainable_summary counts them
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return result
