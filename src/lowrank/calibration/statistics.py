"""Per-layer input statistics, accumulated on the fly by forward hooks.

Activations are never stored: each batch adds its XᵀX (float64), Σ|x| and token count to running
sums and is dropped. Layers that receive the very same input tensor (q/k/v projections, gate/up
projections) share one accumulator, which saves both time and memory.

The collector works on any module tree, so a whole model and a single transformer block are
calibrated by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import nn as lnn


@dataclass(eq=False)
class LayerStatistics:
    """Sums over calibration tokens of one layer's input x (and, optionally, of its gradients).

    Attributes:
        xtx: Σ x xᵀ, shape (in, in), float64.
        abs_sum: Σ |x|, shape (in,), float64 (activation-aware scaling).
        num_tokens: number of token vectors summed.
        grad_sq: Σ (∂L/∂W)² summed over the input dimension, shape (out,), when Fisher
            information was collected; otherwise ``None``.
    """

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    num_tokens: int = 0
    grad_sq: torch.Tensor | None = field(default=None)
    # Derived matrices (e.g. the whitening of xtx), computed once and shared by every layer that
    # shares these statistics (q/k/v projections).
    _cache: dict = field(default_factory=dict, repr=False)

    def cached(self, key, compute):
        """``compute()`` memoized under ``key``; dropped whenever new tokens are added."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @classmethod
    def zeros(cls, in_features: int, device=None) -> "LayerStatistics":
        return cls(
            xtx=torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
            abs_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
        )

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(dim=0)
        self.num_tokens += x.shape[0]
        self._cache.clear()

    @property
    def covariance(self) -> torch.Tensor:
        """E[x xᵀ] over calibration tokens (XᵀX / tokens)."""
        return self.xtx / max(self.num_tokens, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        """E|x| per input channel."""
        return self.abs_sum / max(self.num_tokens, 1)


class StatisticsCollector:
    """Context manager that hooks the named linear layers of ``module`` and accumulates statistics.

    Example:
        >>> with StatisticsCollector(model, names) as collector:  # doctest: +SKIP
        ...     model(input_ids)
        >>> stats = collector.statistics  # {name: LayerStatistics}
    """

    def __init__(self, module: nn.Module, names: Iterable[str]):
        self.module = module
        self.names = list(names)
        self.statistics: dict[str, LayerStatistics] = {}
        self._handles: list = []
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None
        self._shares: dict[str, str] = {}  # layer → layer whose accumulator it shares

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple, _output) -> None:
            x = inputs[0]
            if name in self._shares:
                # Bound on the first batch; later batches are counted once, by the owner.
                return
            if name not in self.statistics:
                if self._last_input is not None and x is self._last_input:
                    self._shares[name] = self._last_owner
                    self.statistics[name] = self.statistics[self._last_owner]
                    return
                self.statistics[name] = LayerStatistics.zeros(x.shape[-1], device=x.device)
            self.statistics[name].update(x)
            self._last_input, self._last_owner = x, name

        return hook

    def __enter__(self) -> "StatisticsCollector":
        for name in self.names:
            layer = self.module.get_submodule(name)
            assert lnn.is_linear(layer), f"{name} is not a linear layer"
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = None


def save_statistics(statistics: dict[str, LayerStatistics], path: str | Path) -> None:
    """Write statistics to a safetensors file (shared accumulators are written once per layer)."""
    tensors, metadata = {}, {}
    for name, stats in statistics.items():
        tensors[f"{name}.xtx"] = stats.xtx.contiguous()
        tensors[f"{name}.abs_sum"] = stats.abs_sum.contiguous()
        if stats.grad_sq is not None:
            tensors[f"{name}.grad_sq"] = stats.grad_sq.contiguous()
        metadata[name] = str(stats.num_tokens)
    save_file({key: value.clone() for key, value in tensors.items()}, str(path), metadata=metadata)


def load_statistics(path: str | Path) -> dict[str, LayerStatistics]:
    """Read statistics written by :func:`save_statistics`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    return {
        name: LayerStatistics(
            xtx=tensors[f"{name}.xtx"],
            abs_sum=tensors[f"{name}.abs_sum"],
            num_tokens=int(count),
            grad_sq=tensors.get(f"{name}.grad_sq"),
        )
        for name, count in metadata.items()
    }
