"""Per-layer statistics, accumulated on the fly by hooks.

Activations are never stored: each batch adds its XᵀX, Σ|x| and token count to running sums and is
dropped. A batch's XᵀX is one float32 GEMM (TF32 and reduced-precision passes off) added to a
float32 accumulator (float64 for float64 models): the product is accurate to a few parts in 10⁷,
and over the 64 single-window batches of a default calibration the float32 sum adds no measurable
error to that (see :func:`add_gram_`), while it halves the statistics' memory, which for a model
compressed in memory is the largest allocation after the weights (0.8 GB in float64 for SmolLM2-135M,
whose float32 weights take 0.54 GB). Gradient squares (vectors) are squared in float32 and summed
in float64. Layers that receive the very same input tensor (q/k/v projections, gate/up
projections) share one :class:`InputStatistics`, which saves both time and memory. With gradients
on, each layer also sums the squares of the loss gradient with respect to its output (the diagonal
of the output's empirical Fisher information) and of its weight gradient per batch (Fisher-weighted
SVD's row weights).

The collector works on any module tree, so a whole model and a single transformer block are
calibrated by the same code.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import nn as lnn


@contextlib.contextmanager
def full_float32_matmul():
    """Run float32 matmuls at full float32 precision: no TF32 on GPUs, no bfloat16 passes on CPUs.

    ``torch.set_float32_matmul_precision("high")`` (a common setting for training) would otherwise
    round XᵀX's inputs to 10 mantissa bits; restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def add_gram_(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
    """``accumulator += leftᵀ·right`` (``right`` defaults to ``left``), the product a float32 GEMM.

    The product runs in float32 (float64 if the inputs are), the sum in the accumulator's dtype
    (float32 for calibration of float32 and half-precision models). On the reference model (16
    calibration windows of 128 tokens, one per batch, so 16 float32 additions), XᵀX accumulated
    this way stays within 1e-6 of an all-float64 computation (relative Frobenius norm per layer),
    and so do the whitened factors' output errors, perplexity within 1e-5, while another
    calibration sample moves each by more (``tests/calibration/test_precision.py`` asserts both).

    Args:
        accumulator: (n, m) running sum, modified in place.
        left: (tokens, n) rows of one batch.
        right: (tokens, m) rows of the same tokens; default ``left``.

    Example:
        >>> x = torch.randn(100, 4)
        >>> total = add_gram_(torch.zeros(4, 4, dtype=torch.float64), x)
        >>> torch.allclose(total, x.double().T @ x.double(), rtol=1e-5)
        True
    """
    dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    left = left.to(dtype)
    right = left if right is None else right.to(dtype)
    with full_float32_matmul():
        accumulator += left.T @ right
    return accumulator


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


@dataclass(eq=False)
class InputStatistics:
    """Sums over calibration tokens of a layer input x: Σ x xᵀ (in×in), Σ |x| (in,), token count."""

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    num_tokens: int = 0
    # Derived matrices (e.g. the whitening of xtx), computed once and shared by every layer that
    # reads this input: see LayerStatistics.cached.
    _cache: dict = field(default_factory=dict, repr=False)
    _fetched: dict = field(default_factory=dict, repr=False)  # key → ids of the layers that fetched it
    # Damping a Cholesky whitening of xtx found, per (damp, dtype), with the tensor and its version:
    # kept when the cache is released (and written with the sums), so a later pass (allocation,
    # then factoring) forms the root again without searching for it.
    _dampings: dict = field(default_factory=dict, repr=False)
    consumers: int = field(default=0, repr=False)  # LayerStatistics reading this input
    _readers: set | None = field(default=None, repr=False)  # ids of the layers of the current pass (see one_pass)

    def remember_damping(self, damp: float, dtype: torch.dtype, damping: float) -> None:
        """Note the damping a Cholesky whitening of this very ``xtx`` found (see :meth:`known_damping`)."""
        self._dampings[(damp, dtype)] = (weakref.ref(self.xtx), self.xtx._version, damping)

    def known_damping(self, damp: float, dtype: torch.dtype) -> float | None:
        """The damping remembered for (``damp``, ``dtype``), if ``xtx`` is still the tensor it was
        found for, unmodified (a sum replaced, or added to in place, needs a new search)."""
        known = self._dampings.get((damp, dtype))
        return known[2] if known is not None and known[0]() is self.xtx and known[1] == self.xtx._version else None

    def known_dampings(self) -> dict[tuple[float, torch.dtype], float]:
        return {key: value for key in self._dampings if (value := self.known_damping(*key)) is not None}

    @classmethod
    def zeros(cls, in_features: int, device=None, dtype: torch.dtype = torch.float32) -> "InputStatistics":
        """Empty sums; ``dtype`` is XᵀX's accumulator (float32, or float64 for float64 inputs)."""
        return cls(
            xtx=torch.zeros(in_features, in_features, dtype=dtype, device=device),
            abs_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
        )

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        add_gram_(self.xtx, x)
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.num_tokens += x.shape[0]
        self._cache.clear()
        self._fetched.clear()


@dataclass(eq=False)
class LayerStatistics:
    """Everything calibration learned about one linear layer.

    Attributes:
        inputs: input sums, possibly shared with layers that read the same tensor.
        output_grad_sq: Σ over tokens of (∂L/∂y)², shape (out,), L the summed next-token loss;
            ``None`` unless gradients were collected.
        weight_grad_sq: Σ over batches of (∂L/∂W)² summed over the input dimension, shape (out,);
            ``None`` unless gradients were collected.
        num_grad_tokens: tokens that contributed to the gradient sums.
        output_grad_gram: Σ over tokens of (∂L/∂y)(∂L/∂y)ᵀ, shape (out, out), float64: the full
            empirical Fisher of the outputs, whose diagonal is ``output_grad_sq``; ``None`` unless
            calibration was asked for it for this layer (``output_gram``), as it costs out² numbers.
    """

    inputs: InputStatistics
    output_grad_sq: torch.Tensor | None = None
    weight_grad_sq: torch.Tensor | None = None
    num_grad_tokens: int = 0
    output_grad_gram: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.inputs.consumers += 1

    @classmethod
    def zeros(cls, in_features: int, device=None, dtype: torch.dtype = torch.float32) -> "LayerStatistics":
        return cls(InputStatistics.zeros(in_features, device=device, dtype=dtype))

    @property
    def xtx(self) -> torch.Tensor:
        """Σ x xᵀ over calibration tokens, (in, in), float32 (float64 when the model computes in float64)."""
        return self.inputs.xtx

    @property
    def abs_sum(self) -> torch.Tensor:
        return self.inputs.abs_sum

    @property
    def num_tokens(self) -> int:
        return self.inputs.num_tokens

    @property
    def covariance(self) -> torch.Tensor:
        """E[x xᵀ] over calibration tokens (XᵀX / tokens)."""
        return self.inputs.xtx / max(self.inputs.num_tokens, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        """E|x| per input channel."""
        return self.inputs.abs_sum / max(self.inputs.num_tokens, 1)

    @property
    def output_fisher(self) -> torch.Tensor | None:
        """E[(∂L/∂y_o)²] per output channel: how much the loss cares about each output."""
        if self.output_grad_sq is None:
            return None
        return self.output_grad_sq / max(self.num_grad_tokens, 1)

    @property
    def output_fisher_matrix(self) -> torch.Tensor | None:
        """E[(∂L/∂y)(∂L/∂y)ᵀ], (out, out): how much the loss cares about each output *direction*
        (``output_fisher`` is its diagonal); ``None`` unless collected (``output_gram``)."""
        if self.output_grad_gram is None:
            return None
        return self.output_grad_gram / max(self.num_grad_tokens, 1)

    def output_side(self, out_features: int) -> bool:
        """Whether a whitened factorization of a layer with ``out_features`` outputs reading this
        input is best made on the output side (:func:`lowrank.linalg.weighted.output_side_svd`).

        True when XᵀX has fewer calibration tokens than columns, so it is singular by
        construction, and the layer has no more outputs than inputs. A root of such an XᵀX needs
        a damping found from all its eigenvalues (for a 5632-wide MLP input an ``eigvalsh`` of
        12 s on 2 cores, once per block), while the output-side Gram D·W·XᵀX·Wᵀ·D inverts nothing,
        needs no damping and gives the exact optimum of the calibration objective.
        """
        return self.num_tokens < self.xtx.shape[0] and out_features <= self.xtx.shape[0]

    def output_damping(self, damp: float) -> float:
        """δ of ``damp`` (relative to the mean eigenvalue of XᵀX, as :meth:`whitening` takes it) for
        the output side, where no singular covariance needs more: ``damp`` · tr(XᵀX) / in."""
        return damp * self.xtx.diagonal().double().sum().item() / self.xtx.shape[0] if damp else 0.0

    def whitening(self, damp: float = 0.0, dtype: torch.dtype = torch.float64, symmetric: bool = False, name: str = ""):
        """:func:`lowrank.linalg.whitening` of XᵀX, computed once per shared input (see :meth:`cached`).

        The one place a layer's whitening is made: methods, allocation and analysis ask here, so
        q/k/v (and gate/up) share one. ``symmetric=False`` (the Cholesky root) suffices wherever
        only W·R's singular subspaces matter; methods that select entries in whitened coordinates
        ask for the symmetric root.
        """
        from ..linalg.whiten import whitening

        key = ("whitening", damp, dtype, symmetric)

        def compute():
            known = self.inputs.known_damping(damp, dtype)
            white = whitening(self.xtx, damp=damp, name=name, dtype=dtype, symmetric=symmetric, damping=known)
            if not white.symmetric:
                self.inputs.remember_damping(damp, dtype, white.damping)
            return white

        return self.cached(key, compute)

    def cached(self, key, compute):
        """``compute()`` memoized under ``key`` on the shared input statistics, until every layer
        reading this input has fetched it.

        Layers that share an input (q/k/v, gate/up) are factored one after another, so one
        whitening serves them all; releasing it after the last of them keeps one input's n×n
        matrices alive rather than every input's (for SmolLM2 all whitenings take 1.6 GB, twice
        the statistics themselves). A later pass over the layers (allocation, then compression)
        computes it again.
        """
        inputs = self.inputs
        if key not in inputs._cache:
            inputs._cache[key], inputs._fetched[key] = compute(), set()
        value = inputs._cache[key]
        fetched = inputs._fetched[key]
        fetched.add(id(self))
        if (fetched >= inputs._readers) if inputs._readers is not None else len(fetched) >= inputs.consumers:
            del inputs._cache[key], inputs._fetched[key]
        return value


@contextlib.contextmanager
def one_pass(statistics: dict[str, LayerStatistics] | None, names: Iterable[str]):
    """A pass over the layers ``names`` only (e.g. the factored ones of a plan, which may leave
    layers that share an input dense): a shared input's cached matrices are released once the
    last of *these* layers has fetched them, and every cache is emptied on exit.
    """
    statistics = statistics or {}
    readers: dict[int, tuple[InputStatistics, set]] = {}
    for name in names:
        if name in statistics:
            inputs = statistics[name].inputs
            readers.setdefault(id(inputs), (inputs, set()))[1].add(id(statistics[name]))
    for inputs, ids in readers.values():
        inputs._readers = ids
    try:
        yield
    finally:
        for stats in statistics.values():
            stats.inputs._readers = None
            stats.inputs._cache.clear()
            stats.inputs._fetched.clear()


class StatisticsCollector:
    """Context manager that hooks the named linear layers of ``module`` and accumulates statistics.

    Args:
        module: the model (or one block).
        names: linear layers to hook, relative to ``module``.
        gradients: also sum squared output gradients (the caller runs ``loss.backward()``).

    Example:
        >>> with StatisticsCollector(model, names) as collector:  # doctest: +SKIP
        ...     model(input_ids)
        >>> stats = collector.statistics  # {name: LayerStatistics}  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, names: Iterable[str], gradients: bool = False, output_gram: Iterable[str] = ()):
        self.module = module
        self.names = list(names)
        self.gradients = gradients
        self.output_gram = set(output_gram)  # layers whose full output-gradient Gram is summed too
        self.statistics: dict[str, LayerStatistics] = {}
        self._handles: list = []
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None
        self._shared: set[str] = set()  # layers whose inputs are summed by another layer's hook
        self.calls = 0  # hooked layer calls so far

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.calls += 1
            x = inputs[0]
            if name not in self.statistics:
                if self._last_input is not None and x is self._last_input:
                    # Bound on the first batch; later batches are counted once, by the owner.
                    self._shared.add(name)
                    self.statistics[name] = LayerStatistics(self.statistics[self._last_owner].inputs)
                else:
                    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                    self.statistics[name] = LayerStatistics.zeros(x.shape[-1], device=x.device, dtype=dtype)
            stats = self.statistics[name]
            if name not in self._shared:
                stats.inputs.update(x)
                self._last_input, self._last_owner = x, name
            if self.gradients and output.requires_grad:
                output.register_hook(self._gradient_hook(stats, name in self.output_gram))

        return hook

    @staticmethod
    def _gradient_hook(stats: LayerStatistics, gram: bool = False):
        def hook(grad: torch.Tensor) -> None:
            grad = _at_least_float32(grad.detach().reshape(-1, grad.shape[-1]))
            if stats.output_grad_sq is None:
                stats.output_grad_sq = torch.zeros(grad.shape[-1], dtype=torch.float64, device=grad.device)
            # Squares in the gradient's own precision (exact to one rounding), sums in float64.
            stats.output_grad_sq += grad.square().sum(dim=0, dtype=torch.float64)
            if gram:
                if stats.output_grad_gram is None:
                    stats.output_grad_gram = torch.zeros(grad.shape[-1], grad.shape[-1], dtype=torch.float64, device=grad.device)
                # In float64: the Gram's small eigenvalues decide which directions count as free.
                stats.output_grad_gram += grad.double().T @ grad.double()
            stats.num_grad_tokens += grad.shape[0]

        return hook

    def accumulate_weight_gradients(self) -> None:
        """Add each layer's current ``weight.grad`` (squared, summed over inputs) and clear it."""
        for name in self.names:
            layer = self.module.get_submodule(name)
            if layer.weight.grad is None:
                continue
            gradient = layer.weight.grad.T if lnn.is_conv1d(layer) else layer.weight.grad  # (out, in)
            row_sums = _at_least_float32(gradient.detach()).square().sum(dim=1, dtype=torch.float64)
            stats = self.statistics[name]
            stats.weight_grad_sq = row_sums if stats.weight_grad_sq is None else stats.weight_grad_sq + row_sums
            layer.weight.grad = None

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
    """Write statistics to a safetensors file.

    Layers that share one input (q/k/v, gate/up) share its sums in the file too, written once
    under the first such layer's name, and share them again after :func:`load_statistics`.
    """
    tensors, metadata, written = {}, {}, {}
    for name, stats in statistics.items():
        key = written.setdefault(id(stats.inputs), name)
        if key == name:
            tensors[f"{name}.xtx"] = stats.xtx.clone()
            tensors[f"{name}.abs_sum"] = stats.abs_sum.clone()
            for (damp, dtype), value in stats.inputs.known_dampings().items():
                tensors[f"{name}.damping.{str(dtype).removeprefix('torch.')}"] = torch.tensor([damp, value], dtype=torch.float64)
        for field_name in ("output_grad_sq", "weight_grad_sq", "output_grad_gram"):
            value = getattr(stats, field_name)
            if value is not None:
                tensors[f"{name}.{field_name}"] = value.clone()
        metadata[name] = f"{stats.num_tokens},{stats.num_grad_tokens},{key}"
    save_file(tensors, str(path), metadata=metadata)


def load_statistics(path: str | Path, device=None) -> dict[str, LayerStatistics]:
    """Read statistics written by :func:`save_statistics` (onto ``device``, default the CPU)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    statistics, inputs = {}, {}
    for name, counts in metadata.items():
        num_tokens, num_grad_tokens, *shared = counts.split(",", 2)
        key = shared[0] if shared else name  # files written before inputs were shared name their own
        if key not in inputs:
            inputs[key] = InputStatistics(xtx=tensors[f"{key}.xtx"], abs_sum=tensors[f"{key}.abs_sum"], num_tokens=int(num_tokens))
            for tensor_name, value in tensors.items():
                if tensor_name.startswith(f"{key}.damping."):
                    inputs[key].remember_damping(value[0].item(), getattr(torch, tensor_name.rsplit(".", 1)[1]), value[1].item())
        statistics[name] = LayerStatistics(
            inputs[key],
            output_grad_sq=tensors.get(f"{name}.output_grad_sq"),
            weight_grad_sq=tensors.get(f"{name}.weight_grad_sq"),
            num_grad_tokens=int(num_grad_tokens),
            output_grad_gram=tensors.get(f"{name}.output_grad_gram"),
        )
    return statistics
