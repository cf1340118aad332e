"""WeLore-style fine-tuning of a compressed model: train the factors, freeze everything dense.

After :func:`lowrank.compress_`, the low-rank factors (``up``/``down`` of every
:class:`~lowrank.LowRankLinear`) hold the compressible part of the network; training only them
keeps gradients and optimizer state small (WeLore, Jaiswal et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LowrankError
from ..nn import LowRankLinear

ADAM_STATES = 2  # AdamW keeps exp_avg and exp_avg_sq per trainable value


@dataclass
class TrainableSummary:
    """How much of a model trains, and what that costs.

    Attributes:
        trainable_parameters / total_parameters: counts (tied weights once).
        gradient_bytes: memory of the gradients of the trainable parameters.
        optimizer_bytes: memory of AdamW's two moment estimates for them.
    """

    trainable_parameters: int
    total_parameters: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen, unique = set(), []
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            unique.append(parameter)
    return unique


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable parameters and the gradient and AdamW memory they need.

    Example:
        >>> trainable_summary(nn.Linear(4, 2)).optimizer_bytes  # (8 + 2) values · 4 bytes · 2 states
        80
    """
    parameters = _unique_parameters(model)
    trainable = [p for p in parameters if p.requires_grad]
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return TrainableSummary(
        trainable_parameters=sum(p.numel() for p in trainable),
        total_parameters=sum(p.numel() for p in parameters),
        gradient_bytes=gradient_bytes,
        optimizer_bytes=ADAM_STATES * gradient_bytes,
    )


def prepare_welore_(model: nn.Module, train_bias: bool = False) -> TrainableSummary:
    """Make the factors of every :class:`~lowrank.LowRankLinear` trainable and freeze the rest (in place).

    Args:
        model: a model compressed by :func:`lowrank.compress_` (or loaded by :func:`lowrank.load`).
        train_bias: also train the biases of the factored layers.

    Returns:
        A :class:`TrainableSummary` of the prepared model.

    Example:
        >>> lowrank.compress_(model, plan, method="whiten", stats=stats)  # doctest: +SKIP
        >>> prepare_welore_(model).trainable_parameters  # doctest: +SKIP
    """
    factored = [module for module in model.modules() if isinstance(module, LowRankLinear)]
    if not factored:
        raise LowrankError("the model has no low-rank layers to train; compress it first (lowrank.compress_ or `lowrank compress`)")
    model.requires_grad_(False)
    for module in factored:
        module.down.weight.requires_grad_(True)
        module.up.weight.requires_grad_(True)
        if train_bias and module.up.bias is not None:
            module.up.bias.requires_grad_(True)
    return trainable_summary(model)
