"""SharedBasisLinear: one layer of a group that shares a basis across blocks (Basis Sharing).

Every layer of a group holds its own coefficients and the *same* ``basis`` parameter object, so
``model.parameters()``, ``.to()``, casting and training see the basis once. The first layer of the
group owns it (``basis_from`` is ``None``); the others name their owner in ``basis_from``. Only the
owner writes the basis into the state dict (safetensors refuses aliased tensors, and it is stored
once), so a saved group holds ``<owner>.basis`` and every layer's ``coefficients``.
:func:`lowrank.load` builds each layer empty from its spec, loads the state dict (a non-owner
expects no basis of its own), then calls :meth:`SharedBasisLinear.link_shared` on every layer,
which points the non-owners at their owner's parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from ..errors import LowrankError
from .replacement import ReplacementLinear
from .structures import register_structure


@dataclass
class SharedBasisLayerFactors:
    """What :meth:`SharedBasisLinear.from_factors` builds one layer of a group from.

    Attributes:
        side: ``"input"`` (W ≈ coefficients·basis, basis k × in) or ``"output"`` (W ≈ basis·coefficients, basis out × k).
        basis: the group's basis: the owner's ``nn.Parameter`` for a non-owner (shared as is), any
            tensor for the owner (copied).
        coefficients: this layer's (out × k) or (k × in) matrix.
        basis_from: the owner's module name, or ``None`` when this layer owns the basis.
    """

    side: str
    basis: torch.Tensor
    coefficients: torch.Tensor
    basis_from: str | None = None


@register_structure
class SharedBasisLinear(ReplacementLinear):
    """y = C·(B·x) + bias (``side="input"``) or y = B·(C·x) + bias (``side="output"``), B shared by the group.

    Example:
        >>> basis = torch.randn(4, 16)
        >>> first = SharedBasisLinear.from_factors(SharedBasisLayerFactors("input", basis, torch.randn(8, 4)), None, torch.float32)
        >>> second = SharedBasisLinear.from_factors(
        ...     SharedBasisLayerFactors("input", first.basis, torch.randn(8, 4), basis_from="layers.0.k_proj"), None, torch.float32)
        >>> second.basis is first.basis
        True
    """

    def __init__(self, in_features: int, out_features: int, rank: int, side: str, basis_from: str | None = None, bias: bool = True,
                 basis: nn.Parameter | None = None, device=None, dtype=None):  # fmt: skip
        super().__init__()
        if side not in ("input", "output"):
            raise LowrankError(f"a SharedBasisLinear's side is 'input' or 'output', not {side!r}")
        self.in_features, self.out_features, self.rank, self.side, self.basis_from = in_features, out_features, rank, side, basis_from
        self.basis_shape = (rank, in_features) if side == "input" else (out_features, rank)
        shape = (out_features, rank) if side == "input" else (rank, in_features)
        self.coefficients = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if basis is not None:
            self._share(basis)
        elif basis_from is None:
            self.basis = nn.Parameter(torch.empty(self.basis_shape, device=device, dtype=dtype))
        else:
            self.basis = None  # set by link_shared (lowrank.load calls it) or by from_factors

    def _share(self, basis: nn.Parameter) -> None:
        if not isinstance(basis, nn.Parameter) or tuple(basis.shape) != self.basis_shape:
            raise LowrankError(
                f"a shared basis must be the owner's parameter of shape {list(self.basis_shape)}, got {type(basis).__name__} {list(basis.shape)}"
            )
        self.basis = basis  # the same Parameter object as the owner's: registered here too, stored once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.basis is None:
            raise LowrankError(f"this layer's shared basis (owned by {self.basis_from}) is not linked; load the model with lowrank.load")
        if self.side == "input":
            return functional.linear(functional.linear(x, self.basis), self.coefficients, self.bias)
        return functional.linear(functional.linear(x, self.coefficients), self.basis, self.bias)

    @classmethod
    def from_factors(cls, factors: SharedBasisLayerFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> SharedBasisLinear:
        """Build one layer; a non-owner (``factors.basis_from`` set) shares ``factors.basis``, the owner's parameter."""
        c = factors.coefficients
        device = device if device is not None else c.device
        out_features, in_features = (c.shape[0], factors.basis.shape[1]) if factors.side == "input" else (factors.basis.shape[0], c.shape[1])
        rank = c.shape[1] if factors.side == "input" else c.shape[0]
        shared = factors.basis if factors.basis_from is not None else None
        layer = cls(in_features, out_features, rank, factors.side, factors.basis_from, bias is not None, basis=shared, device=device, dtype=dtype)
        with torch.no_grad():
            layer.coefficients.copy_(c)
            if shared is None:
                layer.basis.copy_(factors.basis)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> SharedBasisLinear:
        return cls(in_features, out_features, spec["rank"], spec["side"], spec.get("basis_from"), bias, dtype=dtype)

    def spec(self) -> dict:
        return {"rank": self.rank, "side": self.side, "basis_from": self.basis_from}

    def link_shared(self, model: nn.Module) -> None:
        """Point a non-owner at its owner's basis parameter in ``model`` (no-op for the owner).

        Raises:
            LowrankError: if the owner is missing or is not a matching SharedBasisLinear.
        """
        if self.basis_from is None:
            return
        try:
            owner = model.get_submodule(self.basis_from)
        except AttributeError:
            owner = None
        if not isinstance(owner, SharedBasisLinear) or owner.basis_from is not None or owner.side != self.side:
            raise LowrankError(f"the shared basis of this layer should be owned by {self.basis_from}, which holds none; save the model again")
        self._share(owner.basis)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.basis_from is not None:
            destination.pop(prefix + "basis", None)  # the owner stores it

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self.basis_from is None:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        basis = self._parameters.pop("basis", None)  # a non-owner loads no basis (nor overwrites the shared one)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        finally:
            if basis is not None:
                self._parameters["basis"] = basis

    def storage_bits(self) -> int:
        """Bits this layer stores: its coefficients and bias, and the basis only in its owner (counted once per group)."""
        tensors = [self.coefficients] + ([self.bias] if self.bias is not None else []) + ([self.basis] if self.basis_from is None else [])
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""
        if self.basis is None:
            raise LowrankError(f"this layer's shared basis (owned by {self.basis_from}) is not linked; load the model with lowrank.load")
        return self.coefficients @ self.basis if self.side == "input" else self.basis @ self.coefficients

    def extra_repr(self) -> str:
        owner = "own" if self.basis_from is None else f"from {self.basis_from}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, side={self.side}, basis={owner}, bias={self.bias is not None}"


def link_shared_bases(model: nn.Module) -> None:
    """Tie every :class:`SharedBasisLinear` of ``model`` that does not own its basis to its owner's
    (what :func:`lowrank.load` does after loading the state dict).

    Example:
        >>> link_shared_bases(model)  # doctest: +SKIP
    """
    for module in model.modules():
        if isinstance(module, SharedBasisLinear):
            module.link_shared(model)


__all__ = ["SharedBasisLayerFactors", "SharedBasisLinear", "link_shared_bases"]
