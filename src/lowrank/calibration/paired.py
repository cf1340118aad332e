"""Paired statistics: the same calibration batches through a dense reference and a compressed model.

For layer l with dense inputs x and the compressed model's inputs x̃ (both from the same tokens),
this accumulates Σ x̃ x̃ᵀ, Σ x x̃ᵀ and Σ x xᵀ — what the closed-form refit needs — as float64
products summed in float64 (unlike :class:`~lowrank.calibration.InputStatistics`, whose products
are float32): the refit solves linear systems in these moments, and a layer whose compressed
inputs are nearly rank-deficient (an MLP output layer once its input layer is compressed) has
eigenvalues below float32's round-off of the largest one. Measured on the tiny GPT-2 of
``tests/test_cross_layer_sequential.py``: with float32 products its MLP output layer's refit ended
0.6 % above the reduced-rank optimum on its own calibration inputs, with float64 products within
1e-6. Forward passes stop right after the block (or stage) that holds the layers, so calibrating
block k costs blocks 0…k only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowrankError
from ..nn import expert_projection_names
from .statistics import add_gram_


@dataclass
class PairedStatistics:
    shifted_xtx: torch.Tensor  # Σ x̃ x̃ᵀ (k, k): k = n unless the compressed layer reads fewer inputs
    cross: torch.Tensor  # Σ x x̃ᵀ (n, k)
    dense_xtx: torch.Tensor  # Σ x xᵀ
    shifted_abs_sum: torch.Tensor  # Σ |x̃|
    num_tokens: int = 0


class _StopForward(Exception):
    pass


def _run_until(model: nn.Module, batch: dict, stop_module: nn.Module | None) -> None:
    handle = None
    if stop_module is not None:

        def stop(*_):
            raise _StopForward

        handle = stop_module.register_forward_hook(stop)
    try:
        model(**batch)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def collect_paired_statistics(
    dense: nn.Module,
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[dict[str, torch.Tensor]],
    stop_after: str | None = None,
) -> dict[str, PairedStatistics]:
    """Accumulate paired input statistics of layers ``names`` (same names in both models).

    Args:
        dense: the dense reference model.
        model: the partially compressed model.
        names: linear layers of one block.
        batches: calibration batches (the same for both models).
        stop_after: name of the module after which forward passes may stop (the block), or ``None``.
    """
    experts = sorted(set(names) & set(expert_projection_names(model)))
    if experts:
        # A router may send an expert other tokens once earlier layers are compressed: no token pairs.
        raise LowrankError(f"sequential refit cannot pair expert inputs ({experts[0]}); compress without --sequential or --exclude experts")
    dense.eval()
    model.eval()
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    statistics: dict[str, PairedStatistics] = {}

    def capture(name):
        def hook(_module, inputs, _output):
            captured[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])

        return hook

    def accumulate(name):
        def hook(_module, inputs, _output):
            # float64 products: see the module docstring.
            shifted = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            x = captured.pop(name).double()
            if name not in statistics:
                # A layer whose inputs the compressed model shrank (MoDeGPT's down_proj) reads fewer of them.
                size, shifted_size = x.shape[1], shifted.shape[1]
                zeros = lambda rows, columns: torch.zeros(rows, columns, dtype=torch.float64, device=x.device)  # noqa: E731
                statistics[name] = PairedStatistics(
                    zeros(shifted_size, shifted_size), zeros(size, shifted_size), zeros(size, size), torch.zeros(shifted_size, dtype=torch.float64, device=x.device)
                )
            stats = statistics[name]
            add_gram_(stats.shifted_xtx, shifted)
            add_gram_(stats.cross, x, shifted)
            add_gram_(stats.dense_xtx, x)
            stats.shifted_abs_sum += shifted.abs().sum(0, dtype=torch.float64)
            stats.num_tokens += shifted.shape[0]

        return hook

    handles = [dense.get_submodule(name).register_forward_hook(capture(name)) for name in names]
    handles += [model.get_submodule(name).register_forward_hook(accumulate(name)) for name in names]
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            _run_until(dense, batch, dense.get_submodule(stop_after) if stop_after else None)
            _run_until(model, batch, model.get_submodule(stop_after) if stop_after else None)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


@torch.no_grad()
def input_stages(model: nn.Module, names: Sequence[str], batch: dict[str, torch.Tensor], stop_after: str | None = None) -> list[list[str]]:
    """Layers ``names`` grouped by the input tensor they read, the groups in execution order.

    In a Llama block: [q, k, v], [o], [gate, up], [down]. A layer of a later group reads what the
    earlier groups computed, so once those are compressed its inputs change: a sequential refit
    that is to see the inputs the finished model will feed it re-collects its statistics after
    the earlier groups are replaced. One forward pass (of ``batch``) finds the groups.

    Args:
        model: the model holding the layers.
        names: linear layers of one block.
        batch: one calibration batch.
        stop_after: name of the module after which the pass may stop (the block), or ``None``.

    Example:
        >>> input_stages(model, ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"], batch)  # doctest: +SKIP
        [['model.layers.0.self_attn.q_proj'], ['model.layers.0.mlp.down_proj']]
    """
    order: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their ids unique

    def record(name):
        def hook(_module, inputs, _output):
            order.append((name, inputs[0]))

        return hook

    device = next(model.parameters()).device
    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
        _run_until(model, batch, model.get_submodule(stop_after) if stop_after else None)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    seen: dict[int, list[str]] = {}
    placed: set[str] = set()
    for name, tensor in order:
        if name in placed:
            continue  # a layer called twice keeps its first place
        placed.add(name)
        if id(tensor) not in seen:
            seen[id(tensor)] = []
            stages.append(seen[id(tensor)])
        seen[id(tensor)].append(name)
    missing = [name for name in names if name not in placed]  # never called on this batch
    return stages + ([missing] if missing else [])
