"""The first pass of a block-by-block ``global`` allocation: every layer's loss curve, one block in memory.

``global`` needs, for every targeted layer, its whitened spectrum and the Fisher information of its
outputs, which comes from back-propagating the next-token loss through the whole model. Block by
block that is back-propagation with block-sized checkpoints:

1. forward: each block runs on the recorded inputs, and the input of every block is kept (in
   ``work``, one file per block, so memory holds one block's);
2. the loss: the model's own forward runs with the blocks stubbed out (the last one returns the
   stored final hidden state as a leaf that requires gradients), so the final norm, the head and the
   loss are the model's code; its backward gives ∂L/∂(final hidden state);
3. backward, last block first: the block is read again, re-run on its stored input (which now
   requires gradients) under the statistics hooks, and ``output.backward(∂L/∂output)`` gives its
   layers' output gradients and ∂L/∂input for the block before it. No parameter requires gradients,
   so no weight gradient is formed.

After each block its layers' loss curves (:func:`lowrank.allocation.curves.loss_curves`) are kept —
one vector per matrix — together with each layer's output Fisher (one vector), and its statistics
are dropped. The curves, statistics and hence the allocation equal the in-memory path's to rounding.

Several processes (:mod:`lowrank.blockwise.distributed`) each run steps 1–3 on their own share of
the batches; in step 3 each block's statistics go to the process that owns the block, which sums
them in batch order and computes the block's curves; the curves are then gathered, so that every
process holds all of them, bit for bit those of one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..allocation.curves import loss_curves
from ..calibration import LayerStatistics
from ..calibration.calibrate import GRADIENT_MICRO_BATCH, split_batch
from ..errors import LowrankError
from .capture import BlockInputs, run_block
from .distributed import Group, StatisticsExchange, collect_pieces


class _Stubbed(contextlib.AbstractContextManager):
    """Blocks whose forward hands the hidden state on, the last one returning ``final()`` instead."""

    def __init__(self, stack: nn.ModuleList, returns_tuple: bool, final: Callable[[], torch.Tensor]):
        self.stack, self.returns_tuple, self.final = stack, returns_tuple, final

    def __enter__(self):
        last = len(self.stack) - 1
        for index, block in enumerate(self.stack):

            def forward(*args, index=index, **kwargs):
                hidden = self.final() if index == last else (args[0] if args else kwargs["hidden_states"])
                return (hidden,) if self.returns_tuple else hidden

            block.forward = forward
        return self

    def __exit__(self, *exc):
        for block in self.stack:
            del block.forward


def _save(tensors: list[torch.Tensor], path: Path) -> None:
    save_file({f"batch.{i}": t.detach().contiguous().cpu() for i, t in enumerate(tensors)}, str(path))


def _load(path: Path, count: int, device) -> list[torch.Tensor]:
    saved = load_file(str(path), device=str(device))
    return [saved[f"batch.{i}"] for i in range(count)]


def blockwise_loss_curves(
    model: nn.Module,
    stack_name: str,
    stack: nn.ModuleList,
    inputs: BlockInputs,
    batches: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    method: str,
    load_block: Callable[[int], None],
    release_block: Callable[[int], None],
    work: Path,
    device="cpu",
    progress: Callable[[str], None] | None = None,
    exchange: StatisticsExchange | None = None,
    keep: Callable[[int, dict[str, LayerStatistics]], None] | None = None,
    after_loss: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]]:
    """Loss curves of layers ``names`` and their output Fisher sums, computed one block at a time.

    Args:
        model: the model skeleton; everything outside ``stack`` must hold real weights.
        stack_name / stack: the block stack (blocks on ``meta`` until ``load_block`` reads them).
        inputs: the recorded inputs of the stack (:func:`~lowrank.blockwise.capture.capture_block_inputs`).
        batches: the calibration batches, with ``labels`` (with ``exchange``: this process's share).
        names: targeted layers (full names).
        method: the factorization method the curves are for.
        load_block / release_block: read block ``index``'s weights / free them.
        work: a directory for the stored block inputs (removed file by file).
        device: where blocks run.
        exchange: shares the passes among processes (:mod:`lowrank.blockwise.distributed`): each
            runs its batches through every block, each block's owner sums the statistics and
            computes its curves, and the curves are gathered. ``None``: one process.
        keep: called as ``keep(index, statistics)`` with each block's summed statistics (names
            relative to the block) on the process that owns the block, before they are dropped:
            with dense propagation they are exactly what factoring the block needs, so the
            factoring pass can read them instead of running the block again.
        after_loss: called once the loss's gradient is formed, when nothing outside the blocks
            is needed any more (e.g. to free the head: for a 32000-word vocabulary and hidden
            2048, 262 MB in float32, held through the whole backward pass otherwise).

    Returns:
        ``({name: loss curve}, {name: (Σ output gradient², tokens)})``; with several processes
        every curve, but the Fisher sums of this process's blocks only (the ones it factors).

    Example:
        >>> curves, fisher = blockwise_loss_curves(model, "model.layers", stack, inputs, batches, names,  # doctest: +SKIP
        ...     "fisher-whiten", load, free, work)
    """
    if any("labels" not in batch for batch in batches):
        raise LowrankError("global allocation block by block back-propagates the next-token loss; the calibration batches need labels")
    exchange = exchange if exchange is not None else StatisticsExchange(Group(device=str(device)), len(batches))
    group = exchange.group
    suffix = "" if group.world == 1 else f".rank-{group.rank}"  # processes share `work`
    # No parameter requires gradients (blocks read later keep the flag: they load with assign=True),
    # so the backward passes form activation gradients only.
    model.requires_grad_(False)
    hidden = inputs.hidden
    for index, block in enumerate(stack):  # 1. forward, keeping every block's input on disk
        load_block(index)
        _save(hidden, work / f"input-{index:05d}{suffix}.safetensors")
        with torch.no_grad():
            hidden = [run_block(block, state, inputs.calls[index][b]) for b, state in enumerate(hidden)]
        release_block(index)

    gradients = []  # 2. ∂L/∂(final hidden state) from the model's own head and loss
    for batch, final in zip(batches, hidden):
        pieces = []
        for start, piece in zip(range(0, final.shape[0], GRADIENT_MICRO_BATCH), split_batch(batch, GRADIENT_MICRO_BATCH)):
            leaf = final[start : start + piece["input_ids"].shape[0]].detach().requires_grad_()
            piece = {key: value.to(device) for key, value in piece.items()}
            with _Stubbed(stack, inputs.returns_tuple, lambda leaf=leaf: leaf), torch.enable_grad():
                output = model(**piece)
                if getattr(output, "loss", None) is None:
                    raise LowrankError(f"{type(model).__name__} returned no loss; global allocation block by block needs a causal language model")
                (output.loss * (piece["labels"][:, 1:] != -100).sum()).backward()
            pieces.append(leaf.grad)
        gradients.append(torch.cat(pieces))
    del hidden
    if after_loss is not None:
        after_loss()

    curves: dict[int, dict[str, torch.Tensor]] = {}
    fisher: dict[str, tuple[torch.Tensor, int]] = {}

    def finish(index: int, block_names: list[str], receipt) -> None:
        """The owner's part: the block's summed statistics → its curves and output Fisher."""
        prefix = f"{stack_name}.{index}."
        stats = exchange.fold(receipt)
        curves[index] = {prefix + name: curve for name, curve in loss_curves(stack[index], block_names, stats, method).items()}
        for name in block_names:
            fisher[prefix + name] = (stats[name].output_grad_sq, stats[name].num_grad_tokens)
        if keep is not None:
            keep(index, stats)
        release_block(index)
        if progress is not None:
            progress(f"block {index}")

    waiting = []
    for index in reversed(range(len(stack))):  # 3. backward, last block first
        prefix = f"{stack_name}.{index}."
        block_names = [name[len(prefix) :] for name in names if name.startswith(prefix)]
        block = stack[index]
        load_block(index)
        file = work / f"input-{index:05d}{suffix}.safetensors"
        stored = _load(file, len(batches), device)

        def step(b: int, block=block, index=index, stored=stored) -> None:
            state = stored[b].requires_grad_()
            run_block(block, state, inputs.calls[index][b]).backward(gradients[b])
            gradients[b] = state.grad

        with torch.enable_grad():
            pieces = collect_pieces(block, block_names, len(stored), step, per_batch=exchange.per_batch, gradients=True)
        del stored
        file.unlink()
        if group.owns(index):
            waiting.append((index, block_names, exchange.receive(index, pieces)))
        else:
            exchange.send(index, pieces)
            release_block(index)
            if progress is not None:
                progress(f"block {index}")
        del pieces
        while len(waiting) > exchange.lag:
            finish(*waiting.pop(0))
    for job in waiting:
        finish(*job)
    exchange.close()

    merged: dict[str, torch.Tensor] = {}
    for owned in group.all_gather(curves):
        curves.update(owned)
    for index in reversed(range(len(stack))):  # the order one process adds them in
        merged.update(curves[index])
    return merged, fisher
