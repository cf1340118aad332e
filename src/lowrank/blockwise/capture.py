"""What every block of a stack is called with, recorded once so blocks can then run on their own.

One forward pass of the model per calibration batch, with each block's ``forward`` swapped for a
recorder that keeps its inputs and hands the hidden states straight on. The model-level code
(embeddings, attention masks, rotary position embeddings, per-layer mask types) runs unchanged, so
nothing about any architecture is assumed beyond "a stack of blocks whose first input is the hidden
state". The first block runs for real, to learn whether blocks return a tensor or a tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the last recorder: nothing after the stack needs to run."""


@dataclass
class BlockInputs:
    """The calibration inputs of a block stack.

    Attributes:
        hidden: per batch, the hidden states entering the first block.
        calls: ``calls[block][batch] = (extra positional args, keyword args)``, the hidden state
            removed (masks, position embeddings, ...; tensors shared between blocks, not copied).
        returns_tuple: whether a block returns ``(hidden, ...)`` rather than the hidden state.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)
    returns_tuple: bool = False


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        hidden, args = args[0], tuple(args[1:])
    else:
        hidden = kwargs.pop("hidden_states")
    # Caches would hold every block's keys and values; calibration never reuses them.
    for key in ("past_key_value", "past_key_values", "layer_past"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, args, kwargs


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, stack: nn.ModuleList, batches: Sequence[dict[str, torch.Tensor]], device: str | torch.device = "cpu"
) -> BlockInputs:
    """Record the inputs of every block in ``stack`` for every batch (``model(**batch)``).

    Only the modules outside the stack and ``stack[0]`` need real weights; the other blocks may
    still be on the ``meta`` device.
    """
    inputs = BlockInputs(calls=[[] for _ in stack])
    first = stack[0]
    real_forward = first.forward

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden, extra, keywords = _split(args, kwargs)
            inputs.calls[index].append((extra, keywords))
            if index == 0:
                inputs.hidden.append(hidden)
                output = real_forward(hidden, *extra, **keywords)
                inputs.returns_tuple = isinstance(output, tuple)
            if index == len(stack) - 1:
                raise _Stop
            return (hidden,) if inputs.returns_tuple else hidden

        return forward

    for index, block in enumerate(stack):
        block.forward = recorder(index)
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            try:
                model(**batch, use_cache=False) if _accepts_use_cache(model) else model(**batch)
            except _Stop:
                pass
    finally:
        for block in stack:
            del block.forward  # back to the class's forward
    return inputs


def _accepts_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache") and not getattr(config, "is_encoder_decoder", False)


def run_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden state ``block`` outputs for ``hidden`` with its recorded extra arguments."""
    args, kwargs = call
    output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, tuple) else output
