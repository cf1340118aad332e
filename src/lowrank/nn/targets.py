"""Finding the layers to compress, and reading their weights in one orientation.

Weights are always handled as (out, in) matrices, as ``nn.Linear`` stores them; transformers'
``Conv1D`` (GPT-2 family) stores (in, out) and is transposed on the way in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import LowrankError
from ..validation import check_patterns
from .experts import find_fused_experts

log = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for dense linear layers (``nn.Linear``, ``Conv1D``); replacement modules are not."""
    return isinstance(module, LINEAR_TYPES)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D``, which stores its weight as (in, out)."""
    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) matrix (a view for ``nn.Linear``, a transposed view for ``Conv1D``)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer."""
    return tuple(linear_weight(module).shape)


def _contains_linear(module: nn.Module) -> bool:
    return any(is_linear(child) for child in module.modules())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of repeated blocks: every ``ModuleList`` of ≥ 2 modules of one class that
    hold linear layers, outermost only (an encoder-decoder has two stacks).

    Found by structure, not by a table of architecture names.
    """
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue
        if len({type(child) for child in module}) == 1 and _contains_linear(module[0]):
            stacks.append((name, module))
    return stacks


def find_targets(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> list[str]:
    """Names of the linear layers to compress.

    By default every linear layer inside the repeated transformer blocks (never embeddings or the
    LM head). ``include`` regular expressions (``re.search`` on the full module name) select among
    *all* linear layers instead, so the LM head can be asked for explicitly; ``exclude`` removes.
    Fused mixture-of-experts weights are not linear layers: they are targeted once
    :func:`~lowrank.nn.unfuse_experts` has split them (a warning says so otherwise).

    Raises:
        LowrankError: if an ``include`` pattern matches no linear layer, or nothing is left.
    """
    check_patterns(include=include, exclude=exclude)
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    fused = find_fused_experts(model)
    if fused:
        log.warning("%d fused experts modules (e.g. %s) are not targeted; call lowrank.nn.unfuse_experts(model) first", len(fused), fused[0])
    if include:
        for pattern in include:
            if not any(re.search(pattern, name) for name in linears):
                example = linears[0] if linears else "(the model has no linear layers)"
                raise LowrankError(f"--include pattern {pattern!r} matches no linear layer; names look like {example!r}")
        names = [name for name in linears if any(re.search(pattern, name) for pattern in include)]
    else:
        prefixes = [stack + "." for stack, _ in find_blocks(model)]
        names = [name for name in linears if any(name.startswith(prefix) for prefix in prefixes)]
    if exclude:
        names = [name for name in names if not any(re.search(pattern, name) for pattern in exclude)]
    if not names:
        raise LowrankError("no linear layer is selected for compression; loosen --exclude or pass --include")
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
