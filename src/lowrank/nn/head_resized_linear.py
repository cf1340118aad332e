"""Dense layers whose attention heads keep fewer dimensions than the model's ``head_dim`` (MoDeGPT types II and III).

transformers' attention reshapes v_proj's output by the config's ``head_dim``
(``view(*input_shape, -1, head_dim)``) and hands o_proj the heads concatenated at that size. A value
head shrunk to k < head_dim dimensions must therefore still look like a head_dim-wide one from
outside: :class:`HeadPaddedLinear` (v_proj) computes the k dimensions per head and pads each head
with head_dim − k zeros; :class:`HeadSlicedLinear` (o_proj) reads only the first k dimensions of
each head. The attention mix of the zero dimensions is zero, and o_proj ignores them, so the model
computes exactly the reduced map, for every attention implementation (eager, SDPA) and KV cache,
without touching the attention code or the config. The projections are the smaller dense matrices;
the attention-times-value product still runs at head_dim.

Type II shrinks q_proj and k_proj, whose kept dimensions are rotary pairs (i, i + head_dim/2) that
need not come first: :class:`HeadScatteredLinear` is a :class:`HeadPaddedLinear` whose k outputs per
head go to any k positions (a boolean ``kept_mask`` buffer, heads × head_dim, saved with the weight),
zeros elsewhere. A zero query and key dimension contributes nothing to q·k, rotated or not, so again
the attention code and config stay as they are.

All are plain dense weights (one per layer, named ``kept_weight``) with the original layer's
in/out features, registered structures, so :func:`lowrank.load` rebuilds them from
``lowrank_config.json`` (``heads``, ``head_dim``, ``kept`` in the spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowrankError
from .replacement import ReplacementLinear
from .structures import register_structure


@dataclass
class HeadWeight:
    """What :meth:`HeadPaddedLinear.from_factors` / :meth:`HeadSlicedLinear.from_factors` take: the
    compact weight and the head layout it belongs to (and, for :class:`HeadScatteredLinear`, the
    (heads, kept) ascending positions of each head's rows)."""

    weight: torch.Tensor
    heads: int
    head_dim: int
    dimensions: torch.Tensor | None = None


def _check_layout(heads: int, head_dim: int, kept: int) -> None:
    if heads < 1 or head_dim < 1 or not 0 < kept <= head_dim:
        raise LowrankError(f"a head layout needs heads ≥ 1 and 0 < kept ≤ head_dim, got heads={heads}, head_dim={head_dim}, kept={kept}")


class _HeadResized(ReplacementLinear):
    """Shared parts: the compact dense weight, the layout spec, loading."""

    def __init__(self, in_features: int, out_features: int, heads: int, head_dim: int, kept: int, bias: bool, device=None, dtype=None):
        super().__init__()
        _check_layout(heads, head_dim, kept)
        self.in_features, self.out_features = in_features, out_features
        self.heads, self.head_dim, self.kept = heads, head_dim, kept
        self.kept_weight = nn.Parameter(torch.empty(self._compact_shape(), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self._bias_size(), device=device, dtype=dtype)) if bias else None

    def _compact_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _bias_size(self) -> int:
        return self._compact_shape()[0]

    @classmethod
    def _shape(cls, compact: tuple[int, int], heads: int, head_dim: int) -> tuple[int, int, int]:
        """(in_features, out_features, kept) of a compact weight shape."""
        raise NotImplementedError

    @classmethod
    def from_factors(cls, factors: HeadWeight, bias: torch.Tensor | None, dtype: torch.dtype, device=None):
        """Build from a :class:`HeadWeight` (computed in high precision), cast to ``dtype``."""
        if not isinstance(factors, HeadWeight) or factors.weight.dim() != 2:
            raise LowrankError(f"a {cls.__name__} is built from a HeadWeight holding one 2-D weight")
        in_features, out_features, kept = cls._shape(tuple(factors.weight.shape), factors.heads, factors.head_dim)
        device = device if device is not None else factors.weight.device
        layer = cls(in_features, out_features, factors.heads, factors.head_dim, kept, bias is not None, device=device, dtype=dtype)
        if bias is not None and bias.shape != layer.bias.shape:
            raise LowrankError(f"the bias of this {cls.__name__} must have {layer.bias.shape[0]} entries, got {list(bias.shape)}")
        with torch.no_grad():
            layer.kept_weight.copy_(factors.weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None):
        if set(spec) != {"heads", "head_dim", "kept"}:
            raise LowrankError(f"a {cls.__name__} takes heads, head_dim and kept, got {sorted(spec)}")
        return cls(in_features, out_features, spec["heads"], spec["head_dim"], spec["kept"], bias, dtype=dtype)

    def spec(self) -> dict:
        return {"heads": self.heads, "head_dim": self.head_dim, "kept": self.kept}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, heads={self.heads}, kept={self.kept} of {self.head_dim}"


@register_structure
class HeadPaddedLinear(_HeadResized):
    """v_proj with k of head_dim dimensions per head: y = W·x + b with W (heads·k × in), each head's
    k outputs followed by head_dim − k zeros (out_features = heads·head_dim, as before).

    Example:
        >>> layer = HeadPaddedLinear.from_factors(HeadWeight(torch.ones(4, 3), heads=2, head_dim=3), None, torch.float32)
        >>> layer(torch.ones(1, 3)).tolist()  # two heads, 2 of 3 dimensions kept
        [[3.0, 3.0, 0.0, 3.0, 3.0, 0.0]]
    """

    def _compact_shape(self) -> tuple[int, int]:
        return (self.heads * self.kept, self.in_features)

    @classmethod
    def _shape(cls, compact, heads, head_dim):
        rows, in_features = compact
        if rows % heads:
            raise LowrankError(f"a HeadPaddedLinear weight's {rows} rows are not {heads} heads of equal size")
        return in_features, heads * head_dim, rows // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.kept_weight, self.bias).unflatten(-1, (self.heads, self.kept))
        return F.pad(y, (0, self.head_dim - self.kept)).flatten(-2)

    def to_dense(self) -> torch.Tensor:
        dense = self.kept_weight.new_zeros(self.heads, self.head_dim, self.in_features)
        dense[:, : self.kept] = self.kept_weight.detach().unflatten(0, (self.heads, self.kept))
        return dense.flatten(0, 1)


@register_structure
class HeadSlicedLinear(_HeadResized):
    """o_proj reading k of head_dim dimensions per head: y = W·[x_h[:k] for each head] + b with
    W (out × heads·k) (in_features = heads·head_dim, as before).

    Example:
        >>> layer = HeadSlicedLinear.from_factors(HeadWeight(torch.ones(1, 4), heads=2, head_dim=3), None, torch.float32)
        >>> layer(torch.tensor([[1.0, 2.0, 100.0, 3.0, 4.0, 100.0]])).tolist()  # the third dimension of each head is ignored
        [[10.0]]
    """

    def _compact_shape(self) -> tuple[int, int]:
        return (self.out_features, self.heads * self.kept)

    def _bias_size(self) -> int:
        return self.out_features

    @classmethod
    def _shape(cls, compact, heads, head_dim):
        out_features, columns = compact
        if columns % heads:
            raise LowrankError(f"a HeadSlicedLinear weight's {columns} columns are not {heads} heads of equal size")
        return heads * head_dim, out_features, columns // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x.unflatten(-1, (self.heads, self.head_dim))[..., : self.kept].flatten(-2)
        return F.linear(kept, self.kept_weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        dense = self.kept_weight.new_zeros(self.out_features, self.heads, self.head_dim)
        dense[:, :, : self.kept] = self.kept_weight.detach().unflatten(1, (self.heads, self.kept))
        return dense.flatten(1)


@register_structure
class HeadScatteredLinear(HeadPaddedLinear):
    """q_proj / k_proj with k of head_dim dimensions per head at any positions (MoDeGPT type II keeps
    rotary pairs): y = W·x + b with W (heads·k × in), head h's k outputs written to the positions
    ``kept_mask[h]`` marks (ascending), zeros elsewhere (out_features = heads·head_dim, as before).

    Example:
        >>> dims = torch.tensor([[0, 2], [1, 3]])  # head 0 keeps the pair (0, 2), head 1 keeps (1, 3)
        >>> layer = HeadScatteredLinear.from_factors(HeadWeight(torch.ones(4, 3), 2, 4, dims), None, torch.float32)
        >>> layer(torch.ones(1, 3)).tolist()
        [[3.0, 0.0, 3.0, 0.0, 0.0, 3.0, 0.0, 3.0]]
    """

    def __init__(self, in_features: int, out_features: int, heads: int, head_dim: int, kept: int, bias: bool, device=None, dtype=None):
        super().__init__(in_features, out_features, heads, head_dim, kept, bias, device=device, dtype=dtype)
        mask = torch.zeros(heads, head_dim, dtype=torch.bool, device=device)
        mask[:, :kept] = True  # overwritten by from_factors or the loaded state dict
        self.register_buffer("kept_mask", mask)

    @classmethod
    def from_factors(cls, factors: HeadWeight, bias: torch.Tensor | None, dtype: torch.dtype, device=None):
        layer = super().from_factors(factors, bias, dtype, device)
        dimensions = factors.dimensions
        if dimensions is None or tuple(dimensions.shape) != (layer.heads, layer.kept):
            raise LowrankError(f"a HeadScatteredLinear needs the kept positions of each head, a ({layer.heads}, {layer.kept}) tensor")
        dimensions = dimensions.to(device=layer.kept_mask.device, dtype=torch.long)
        if (dimensions.diff(dim=1) <= 0).any() or dimensions.min() < 0 or dimensions.max() >= layer.head_dim:
            raise LowrankError(f"each head's kept positions must ascend strictly within 0 … {layer.head_dim - 1}")
        layer.kept_mask.zero_().scatter_(1, dimensions, True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.kept_weight, self.bias)  # (..., heads·k), head by head, ascending positions
        out = y.new_zeros(*y.shape[:-1], self.heads * self.head_dim)
        out[..., self.kept_mask.flatten()] = y
        return out

    def to_dense(self) -> torch.Tensor:
        dense = self.kept_weight.new_zeros(self.heads * self.head_dim, self.in_features)
        dense[self.kept_mask.flatten()] = self.kept_weight.detach()
        return dense
