"""Fused sibling projections: low-rank layers that read the same input share one ``down`` matmul.

In a transformer block q/k/v read the same normalized hidden states, and so do gate/up. Each
:class:`LowRankLinear` computes B·x, a thin matmul that at batch 1 costs mostly its fixed overhead
and one pass over x; stacking the siblings' B into one matrix reads x once and makes one call. The
model code is untouched: each sibling keeps a reference to a :class:`SharedInputGroup`, the first
sibling to run on an input computes the stacked product and every sibling takes its slice.

This is a run-time optimization only: the stacked matrix is a cached copy (rebuilt when any
sibling's weight changes), not a parameter, so state dicts, saving and storage accounting are
unchanged, and ``unfuse_shared_inputs_`` restores the plain layers. Fusion applies only without
autograd (``torch.no_grad()`` / inference): with gradients each sibling runs its own ``down``.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from .layout import prepared_linear
from .lowrank_linear import LowRankLinear
from .prepared import PreparedCache, tensor_key


class SharedInputGroup:
    """Siblings that read the same input; computes their stacked ``down`` product once per input tensor.

    The cached product is valid only for the very tensor it was computed from (same object, same
    in-place version); it is dropped as soon as every sibling has taken its slice, and a new input
    always recomputes, so a sibling never receives a slice computed from another input.

    Attributes:
        members: the sibling layers, in the order of their rows in the stacked matrix.
    """

    def __init__(self, members: list[LowRankLinear], bounds: list[int] | None = None):
        if bounds is None:
            assert len({m.in_features for m in members}) == 1, "siblings must read inputs of the same width"
            bounds = torch.tensor([0] + [m.rank for m in members]).cumsum(0).tolist()
        self.members, self.bounds = list(members), bounds
        self.slices = {id(m): slice(start, stop) for m, start, stop in zip(members, bounds[:-1], bounds[1:])}
        self._weight = PreparedCache()
        self._packed = PreparedCache()  # the stacked weight in oneDNN's packed layout (bfloat16, layout.prepared_linear)
        self._clear()
        self.computations = 0

    def _clear(self) -> None:
        self._input: weakref.ref | None = None
        self._input_version = -1
        self._output: torch.Tensor | None = None
        self._waiting: set[int] = set()

    def stacked_weight(self) -> torch.Tensor:
        """The siblings' ``down`` weights stacked, (Σ ranks, in); rebuilt when any of them changes."""
        key = tuple(tensor_key(m.down.weight) for m in self.members)
        return self._weight.get(key, lambda: torch.cat([m.down.weight for m in self.members]))

    def down(self, member: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
        """``member.down(x)``, taken from the stacked product of all siblings on ``x``."""
        cached = self._input() if self._input is not None else None
        if cached is not x or x._version != self._input_version or id(member) not in self._waiting:
            self._output = prepared_linear(x, self.stacked_weight(), None, self._packed)
            self._input, self._input_version = weakref.ref(x), x._version
            self._waiting = set(self.slices)
            self.computations += 1
        result = self._output[..., self.slices[id(member)]]
        self._waiting.discard(id(member))
        if not self._waiting:
            self._clear()
        return result

    def __deepcopy__(self, memo: dict) -> "SharedInputGroup":
        new = SharedInputGroup.__new__(SharedInputGroup)
        memo[id(self)] = new  # before copying the members, whose ``shared_input`` points back here
        new.__init__(copy.deepcopy(self.members, memo), self.bounds)  # the copies may be half-built: read nothing from them
        return new

    def __getstate__(self) -> dict:
        return {"members": self.members, "bounds": self.bounds}  # pickling keeps the grouping, not the cached tensors

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"], state["bounds"])


def find_shared_inputs(model: nn.Module, example: dict | None = None) -> list[list[str]]:
    """Names of the :class:`LowRankLinear` layers that read the very same input tensor, grouped (groups of 2+).

    Found by running ``example`` (default: two token ids) through the model once with hooks, so it
    holds for any architecture whose code passes one tensor to several projections.

    Example:
        >>> groups = find_shared_inputs(model)  # doctest: +SKIP
        >>> groups[0]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj']
    """
    layers = {name: m for name, m in model.named_modules() if type(m) is LowRankLinear}
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}
    handles = []

    def record(name: str):
        def hook(module, inputs):
            seen.setdefault(id(inputs[0]), (inputs[0], []))[1].append(name)

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(record(name)))
    try:
        device = next(model.parameters()).device
        example = example if example is not None else {"input_ids": torch.tensor([[0, 1]], device=device)}
        with torch.no_grad():
            model(**example)
    finally:
        for handle in handles:
            handle.remove()
    return [names for _, names in seen.values() if len(names) > 1]


def fuse_shared_inputs_(model: nn.Module, example: dict | None = None) -> list[list[str]]:
    """Let sibling :class:`LowRankLinear` layers (q/k/v, gate/up) share one ``down`` matmul; returns the groups.

    Args:
        model: a compressed model (in place; its state dict does not change).
        example: keyword inputs for one forward pass that finds the siblings (default: two token ids).

    Example:
        >>> model = lowrank.load("out/pycode-40")  # doctest: +SKIP
        >>> fuse_shared_inputs_(model)  # doctest: +SKIP
    """
    unfuse_shared_inputs_(model)
    groups = find_shared_inputs(model, example)
    for names in groups:
        group = SharedInputGroup([model.get_submodule(name) for name in names])
        for member in group.members:
            member.shared_input = group
    return groups


def unfuse_shared_inputs_(model: nn.Module) -> None:
    """Undo :func:`fuse_shared_inputs_`: every layer computes its own ``down`` again."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.shared_input = None
