"""LowRankQuantLinear: a high-precision low-rank product plus a low-bit quantized residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg.quantize import GroupQuantized, dequantize_groups, num_groups, pack_bits, unpack_bits
from .lowrank_linear import FactoredLinear
from .lowrank_sparse_linear import value_bits
from .structures import register_structure


@dataclass
class LowRankQuantFactors:
    """W ≈ up @ down + Q, with Q a group-quantized residual.

    Attributes:
        up: (out, rank). down: (rank, in).
        residual: the quantized residual Q.
    """

    up: torch.Tensor
    down: torch.Tensor
    residual: GroupQuantized

    def dense(self) -> torch.Tensor:
        return self.up @ self.down + self.residual.dequantize(self.up.dtype).to(self.up.device)


@register_structure
class LowRankQuantLinear(FactoredLinear):
    """y = up(down(x)) + Q·x + bias, where Q is stored with ``bits`` bits per weight.

    ``up`` and ``down`` are ``nn.Linear`` layers in the model dtype. Q is stored as buffers:
    ``residual_codes`` (uint8, the codes packed ``bits`` bits each, e.g. two 4-bit codes per byte
    or eight 3-bit codes in three bytes), ``residual_zeros`` (the per-group zero points, packed
    the same way) and ``residual_scales`` (float16, out × groups). Q is dequantized on every
    forward pass.

    ``bits_per_weight`` = all stored bits (factors and bias at the model dtype, codes, zero points,
    scales) divided by out·in.

    Example:
        >>> from lowrank.linalg.quantize import quantize_groups
        >>> factors = LowRankQuantFactors(torch.randn(8, 2), torch.randn(2, 64), quantize_groups(torch.randn(8, 64), 4, 32))
        >>> layer = LowRankQuantLinear.from_factors(factors, bias=None, dtype=torch.float32)
        >>> torch.allclose(layer.to_dense(), factors.dense(), atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.bits, self.group_size = in_features, out_features, rank, bits, group_size
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        groups = out_features * num_groups(in_features, group_size)
        packed = lambda count: torch.zeros((count + 7) // 8 * bits, dtype=torch.uint8, device=device)  # noqa: E731
        self.register_buffer("residual_codes", packed(out_features * in_features))
        self.register_buffer("residual_zeros", packed(groups))
        self.register_buffer("residual_scales", torch.zeros(out_features, groups // out_features, dtype=torch.float16, device=device))

    def residual(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized residual Q, (out, in)."""
        shape = self.residual_scales.shape
        codes = unpack_bits(self.residual_codes, self.bits, self.out_features * self.in_features).view(self.out_features, self.in_features)
        zeros = unpack_bits(self.residual_zeros, self.bits, shape.numel()).view(shape)
        return dequantize_groups(codes, self.residual_scales, zeros, self.group_size, dtype or self.up.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) + F.linear(x, self.residual(x.dtype))

    @classmethod
    def from_factors(cls, factors: LowRankQuantFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> "LowRankQuantLinear":
        """Build from factors computed in high precision, cast to the model's ``dtype``."""
        out_features, rank = factors.up.shape
        in_features = factors.down.shape[1]
        residual = factors.residual
        device = device if device is not None else factors.up.device
        layer = cls(in_features, out_features, rank, residual.bits, residual.group_size, bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(factors.down)
            layer.up.weight.copy_(factors.up)
            if bias is not None:
                layer.up.bias.copy_(bias)
            layer.residual_codes.copy_(pack_bits(residual.codes, residual.bits))
            layer.residual_zeros.copy_(pack_bits(residual.zeros, residual.bits))
            layer.residual_scales.copy_(residual.scales)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> "LowRankQuantLinear":
        return cls(in_features, out_features, spec["rank"], spec["bits"], spec["group_size"], bias=bias, dtype=dtype)

    def storage_bits(self) -> int:
        """Bits this layer stores: factors and bias at the model dtype plus the quantized residual."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        residual = 8 * (self.residual_codes.numel() + self.residual_zeros.numel()) + 16 * self.residual_scales.numel()
        return values * value_bits(self.up.weight.dtype) + residual

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.out_features * self.in_features)

    def spec(self) -> dict:
        return {"rank": self.rank, "bits": self.bits, "group_size": self.group_size, "bits_per_weight": round(self.bits_per_weight, 4)}

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: up·down + Q."""
        return self.up.weight @ self.down.weight + self.residual()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bits={self.bits}, "
            f"group_size={self.group_size}, bits_per_weight={self.bits_per_weight:.2f}, bias={self.up.bias is not None}"
        )
