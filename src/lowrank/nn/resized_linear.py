"""ResizedLinear: a plain dense linear layer whose shape differs from the layer it replaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowrankError
from .replacement import ReplacementLinear
from .structures import register_structure


@register_structure
class ResizedLinear(ReplacementLinear):
    """y = W·x + bias with W (out × in) dense: what a module-level method leaves of a layer whose
    inner dimension it shrank (MoDeGPT keeps k of an MLP's n neurons: gate/up become (k × hidden),
    down (hidden × k)).

    Its tensors are named as ``nn.Linear``'s (``<name>.weight``, ``<name>.bias``), so a model whose
    layers of one kind all got the same shape is a plain transformers checkpoint with a smaller
    config (e.g. ``intermediate_size = k``). ``in_features``/``out_features`` are the new shape.

    Example:
        >>> layer = ResizedLinear.from_factors(torch.ones(3, 5), None, torch.float32)
        >>> layer(torch.ones(2, 5)).shape, layer.spec()
        (torch.Size([2, 3]), {})
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("weight", nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype)))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight (a replacement's ``weight`` is ``None`` unless it is dense, as here)."""
        try:
            return self._parameters["weight"]
        except KeyError:  # while __init__ registers it: `hasattr` must say there is none yet
            raise AttributeError("weight") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_factors(cls, factors: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> ResizedLinear:
        """Build from the new (out, in) weight (computed in high precision), cast to ``dtype``."""
        if factors.dim() != 2:
            raise LowrankError(f"a ResizedLinear is built from one (out, in) weight, got shape {list(factors.shape)}")
        out_features, in_features = factors.shape
        if bias is not None and bias.shape != (out_features,):
            raise LowrankError(f"the bias of a ResizedLinear must have {out_features} entries, got {list(bias.shape)}")
        device = device if device is not None else factors.device
        layer = cls(in_features, out_features, bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(factors)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> ResizedLinear:
        if spec:
            raise LowrankError(f"a ResizedLinear takes no options beyond its shape and bias, got {sorted(spec)}")
        return cls(in_features, out_features, bias=bias, dtype=dtype)

    def spec(self) -> dict:
        return {}

    def to_dense(self) -> torch.Tensor:
        return self.weight.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
