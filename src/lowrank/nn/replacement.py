"""The interface every replacement module implements: one subclass per structure.

A *structure* is a module that stands in for a dense linear layer (``LowRankLinear``,
``LowRankPlusSparseLinear``, ...). The rest of the package reaches a structure only through this
interface, never through its attribute names:

- a method's ``build`` calls :meth:`~ReplacementLinear.from_factors` on what its factorizer returned;
- :func:`lowrank.compress_` writes :meth:`~ReplacementLinear.spec` to ``lowrank_config.json`` and
  counts :meth:`~ReplacementLinear.storage_bits`;
- :func:`lowrank.load` builds :meth:`~ReplacementLinear.empty` modules from that spec, fills them
  from the state dict, and resizes an ``--elastic`` model with :meth:`~ReplacementLinear.truncate`;
- checks and analyses read :meth:`~ReplacementLinear.to_dense`.

A structure registers itself by class name with :func:`lowrank.nn.register_structure`, so a saved
model finds it again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..errors import LowrankError


class ReplacementLinear(nn.Module, ABC):
    """Base of the modules that replace a dense (out × in) linear layer.

    Subclasses set ``in_features`` and ``out_features`` and implement the abstract methods; a
    structure whose first r components are its rank-r version (factors stored in importance order)
    also overrides :meth:`truncate`.

    Example:
        >>> from lowrank.nn import STRUCTURES
        >>> all(issubclass(structure, ReplacementLinear) for structure in STRUCTURES.values())
        True
    """

    in_features: int
    out_features: int

    @property
    def weight(self) -> None:
        """``None``: a replacement has no dense weight (``to_dense()`` computes it). Model code that
        reads ``layer.weight`` before calling the layer (T5's feed-forward checks its dtype) then skips
        that step instead of failing."""
        return None

    @classmethod
    @abstractmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> ReplacementLinear:
        """Build from a factorizer's output (computed in high precision), cast to the model's ``dtype``.

        Args:
            factors: the structure's factors (``LowRankFactors``, ``LowRankSparseFactors``, ...).
            bias: the dense layer's bias, or ``None``.
            dtype: the dtype of the stored values.
            device: where to build (default: the factors' device).
        """

    @classmethod
    @abstractmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> ReplacementLinear:
        """An uninitialized module of the shapes ``spec`` (what :meth:`spec` returned) describes, to
        load a state dict into."""

    @abstractmethod
    def spec(self) -> dict:
        """JSON-serializable constructor arguments beyond in/out features and bias (``{"rank": 32}``)."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""

    def storage_bits(self) -> int:
        """Bits this layer stores. By default every parameter and buffer at its dtype; a structure
        whose stored format is smaller than its tensors (packed codes) overrides this."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(tensor.numel() * tensor.element_size() * 8 for tensor in tensors)

    def truncate(self, rank: int) -> ReplacementLinear:
        """A new layer keeping the first ``rank`` components (only structures with nested factors).

        Raises:
            LowrankError: for a structure whose smaller versions are not prefixes of its factors.
        """
        raise LowrankError(f"a {type(self).__name__} has no nested ranks, so it cannot be truncated; only whole low-rank models resize")
