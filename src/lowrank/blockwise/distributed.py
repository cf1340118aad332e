"""Block-by-block compression split across processes (``torchrun``, or any initialized process group).

How the work is split. Calibration batches are independent of one another until their statistics
are summed, so every process runs the dense blocks on its own contiguous share of the batches
(process 0 the first ones): the hidden states never travel, and every process reads every block's
weights. Block ``k`` belongs to process
``k mod N``; every process sends that block's statistics to its owner, which sums them, factors the
block and writes its shard. With N processes each one runs 1/N of the forward passes (and of the
backward passes of ``--allocate global``'s first pass) and factors 1/N of the blocks; the loss
curves of the first pass are gathered so that every process solves the same knapsack. Process 0
writes the rest of the model, the index and the config at the end, and renames the output.

Why the output is byte-identical to one process. One process sums a block's XᵀX batch after batch
into an accumulator: ``S = ((0 + c₀) + c₁) + …`` with ``c_b`` one batch's product. Floating-point
addition is not associative, so per-process partial sums added together can differ in the last bits
(and so would the factors). Instead process 0 sums its own batches as one process would (a prefix of
that very sum), the others keep one term per batch, and the owner adds those terms to the prefix in
batch order, each in the sum's own dtype (they travel as one float64 vector, which holds float32 and
float64 values exactly): the same additions in the same order, hence the same bits — given the same
arithmetic, i.e. the same number of torch threads per process (a BLAS kernel may split its sums
differently with more threads). The same holds for Σ|x|, the token counts and the output-gradient
sums of the first pass. The cost: a process other than 0 holds (batches / N) copies of a block's
statistics until they are sent.

Pipelining. An owner factors block ``k`` only after its share of block ``k+1``'s forward passes, so
the other processes' statistics of block ``k`` have arrived by then and nobody waits; sends are
asynchronous (``isend``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..calibration import LayerStatistics, StatisticsCollector

# How long a process waits for another (a block's statistics, the final gather) before giving up
# with an error instead of hanging: longer than any one block's work on a large model.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Group:
    """This process's place among the processes that compress one model together.

    Args:
        rank: this process's index (0 writes the shared files).
        world: the number of processes; 1 is the ordinary single-process run.
        backend: the ``torch.distributed`` backend (``None`` for one process).
        device: where this process calibrates and factors (``cuda:LOCAL_RANK`` under torchrun).

    Example:
        >>> group = Group(rank=1, world=2)
        >>> [group.owns(block) for block in range(4)], list(group.batches(5))
        ([False, True, False, True], [3, 4])
    """

    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: str = "cpu"

    def owner(self, block: int) -> int:
        """The process that factors and writes ``block`` (round robin: balanced, and consecutive
        blocks alternate, which is what lets the pipeline overlap them)."""
        return block % self.world

    def owns(self, block: int) -> bool:
        return self.owner(block) == self.rank

    def batch_counts(self, num_batches: int) -> list[int]:
        """Calibration batches per process, contiguous and as even as possible."""
        return [num_batches // self.world + (1 if rank < num_batches % self.world else 0) for rank in range(self.world)]

    def batches(self, num_batches: int) -> range:
        """The indices of this process's calibration batches."""
        counts = self.batch_counts(num_batches)
        start = sum(counts[: self.rank])
        return range(start, start + counts[self.rank])

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value``, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


@contextlib.contextmanager
def joined(device: str = "cpu") -> Iterator[Group]:
    """The process group this run belongs to: an initialized one, one started for ``torchrun``
    (``WORLD_SIZE`` > 1 in the environment: ``gloo`` on CPU, ``nccl`` on CUDA, destroyed on exit),
    or a group of one.

    Example:
        >>> with joined("cpu") as group:
        ...     group.world
        1
    """
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if str(device) == "cuda" and (torchrun or (dist.is_available() and dist.is_initialized())):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if dist.is_available() and dist.is_initialized():
        yield Group(dist.get_rank(), dist.get_world_size(), dist.get_backend(), str(device))
        return
    if not torchrun or not dist.is_available():
        yield Group(device=str(device))
        return
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo", timeout=TIMEOUT)
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), dist.get_backend(), str(device))
    finally:
        dist.destroy_process_group()


def collect_pieces(
    module: nn.Module, names: list[str], num_batches: int, step: Callable[[int], None], per_batch: bool, gradients: bool = False
) -> list[dict[str, LayerStatistics]]:
    """Statistics of layers ``names`` of ``module`` while ``step(b)`` runs batch ``b``, summed over all
    batches (``per_batch=False``: one piece) or kept one piece per batch (see the module docstring)."""
    if not per_batch:
        with StatisticsCollector(module, names, gradients=gradients) as collector:
            for batch in range(num_batches):
                step(batch)
        return [collector.statistics]
    pieces = []
    for batch in range(num_batches):
        with StatisticsCollector(module, names, gradients=gradients) as collector:
            step(batch)
        pieces.append(collector.statistics)
    return pieces


def _entries(stats: dict[str, LayerStatistics]):
    inputs = list({id(layer.inputs): layer.inputs for layer in stats.values()}.values())  # shared inputs once
    return inputs, list(stats.values())


def _parts(stats: dict[str, LayerStatistics]) -> Iterator[torch.Tensor | int]:
    """Every sum in ``stats``, in the order :func:`flatten` and :func:`add_flat_` agree on."""
    inputs, layers = _entries(stats)
    for sums in inputs:
        yield from (sums.xtx, sums.abs_sum, sums.num_tokens)
    for layer in layers:
        if layer.output_grad_sq is not None:
            yield from (layer.output_grad_sq, layer.num_grad_tokens)


def flat_size(stats: dict[str, LayerStatistics]) -> int:
    """The length of ``flatten(stats)``."""
    return sum(part.numel() if isinstance(part, torch.Tensor) else 1 for part in _parts(stats))


def flatten(*pieces: dict[str, LayerStatistics], device=None) -> torch.Tensor:
    """Every sum of ``pieces`` as one float64 vector (float32 and float64 values exactly; token counts
    below 2⁵³), written in place, without intermediate copies."""
    first = next(part for part in _parts(pieces[0]) if isinstance(part, torch.Tensor))
    flat = torch.empty(sum(flat_size(piece) for piece in pieces), dtype=torch.float64, device=device or first.device)
    offset = 0
    for piece in pieces:
        for part in _parts(piece):
            if isinstance(part, torch.Tensor):
                flat[offset : offset + part.numel()].copy_(part.reshape(-1))
                offset += part.numel()
            else:
                flat[offset] = part
                offset += 1
    return flat


def add_flat_(stats: dict[str, LayerStatistics], flat: torch.Tensor, assign: bool = False) -> None:
    """Add the sums of a :func:`flatten`-ed piece to ``stats`` in place (or replace them: ``assign``)."""
    inputs, layers = _entries(stats)
    offset = 0

    def take(like: torch.Tensor) -> torch.Tensor:
        # In the sum's own dtype: a float32 sum stays float32 (the flat float64 copy holds it exactly),
        # and adding a float32 term through float64 rounds as a float32 addition does (53 ≥ 2·24 + 2 bits).
        nonlocal offset
        piece = flat[offset : offset + like.numel()].view_as(like).to(device=like.device, dtype=like.dtype)
        offset += like.numel()
        return piece

    def count() -> int:
        nonlocal offset
        offset += 1
        return int(flat[offset - 1].item())

    for sums in inputs:
        xtx, abs_sum, tokens = take(sums.xtx), take(sums.abs_sum), count()
        if assign:
            sums.xtx, sums.abs_sum, sums.num_tokens = xtx.clone(), abs_sum.clone(), tokens
        else:
            sums.xtx += xtx
            sums.abs_sum += abs_sum
            sums.num_tokens += tokens
    for layer in layers:
        if layer.output_grad_sq is not None:
            grad_sq, tokens = take(layer.output_grad_sq), count()
            if assign:
                layer.output_grad_sq, layer.num_grad_tokens = grad_sq.clone(), tokens
            else:
                layer.output_grad_sq += grad_sq
                layer.num_grad_tokens += tokens
    assert offset == flat.numel(), "statistics pieces of different layouts"


@dataclass
class Receipt:
    """A block's statistics on its owner: its own pieces, and the others' on their way."""

    pieces: list[dict[str, LayerStatistics]]
    incoming: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)  # rank → (buffer, request)


class StatisticsExchange:
    """Sends each block's statistics pieces to the block's owner, which sums them in batch order.

    Args:
        group: the processes.
        num_batches: calibration batches in all (each process runs its :meth:`Group.batches`).
    """

    def __init__(self, group: Group, num_batches: int):
        self.group = group
        self.counts = group.batch_counts(num_batches)
        self.device = "cpu" if group.backend in (None, "gloo") else group.device  # gloo moves CPU tensors only
        self._sends: list[tuple[Any, torch.Tensor]] = []

    @property
    def per_batch(self) -> bool:
        """Whether this process keeps one piece per batch (all but process 0, whose batches come first)."""
        return self.group.rank > 0

    @property
    def lag(self) -> int:
        """Blocks an owner runs forward before it factors one (see the module docstring)."""
        return 0 if self.group.world == 1 else 1

    def _pieces_from(self, rank: int) -> int:
        return 1 if rank == 0 else self.counts[rank]

    def send(self, block: int, pieces: list[dict[str, LayerStatistics]]) -> None:
        """Send this process's pieces of ``block`` to its owner, without waiting."""
        flat = flatten(*pieces, device=self.device)
        self._sends.append((dist.isend(flat, dst=self.group.owner(block), tag=block), flat))
        while len(self._sends) > 2:  # bound the memory held by sends in flight
            request, _ = self._sends.pop(0)
            request.wait()

    def receive(self, block: int, pieces: list[dict[str, LayerStatistics]]) -> Receipt:
        """Start receiving the other processes' pieces of ``block`` (owned by this process)."""
        receipt = Receipt(pieces)
        if self.group.world == 1:
            return receipt
        size = flat_size(pieces[0])
        for rank in range(self.group.world):
            if rank != self.group.rank and self.counts[rank] > 0:
                buffer = torch.empty(self._pieces_from(rank) * size, dtype=torch.float64, device=self.device)
                receipt.incoming[rank] = (buffer, dist.irecv(buffer, src=rank, tag=block))
        return receipt

    def fold(self, receipt: Receipt) -> dict[str, LayerStatistics]:
        """The block's statistics summed over all batches, in batch order (those of one process)."""
        own = receipt.pieces
        if self.group.world == 1:
            return own[0]
        # Process 0's sum first, then every other process's per-batch terms, in rank (= batch) order.
        own_terms = [flatten(piece) for piece in own] if self.group.rank > 0 else []  # before own[0] serves as the sum
        terms: list[torch.Tensor] = []
        for rank in range(self.group.world):
            if rank == self.group.rank:
                terms += own_terms
            elif rank in receipt.incoming:
                buffer, request = receipt.incoming[rank]
                request.wait()
                terms += list(buffer.chunk(self._pieces_from(rank)))
        total = own[0]  # process 0: already its sum
        if self.group.rank > 0:
            add_flat_(total, terms.pop(0), assign=True)
        for term in terms:
            add_flat_(total, term)
        return total

    def close(self) -> None:
        """Wait until every piece sent has been received."""
        for request, _ in self._sends:
            request.wait()
        self._sends.clear()
