"""QuantizedCorrectionLinear: a quantized base plus a low-rank correction whose factors are quantized too.

EoRA (Liu et al., 2024) stores its correction's factors at 4 bits, so the correction costs about a
quarter of its 16-bit size. Here both factors are group-quantized with the base's own quantizer
(:func:`lowrank.linalg.quantize.quantize_groups`: asymmetric, float16 scale and ``bits``-bit zero
point per group, codes packed by :func:`~lowrank.linalg.quantize.pack_bits`), one rank component
per row: ``down`` (rank, in) in groups along the input, ``up`` stored transposed, (rank, out), in
groups along the output. Each component of a truncated SVD has its own magnitude (the singular
values fall by orders of magnitude), so grouping within a component's row, never across
components, keeps each group's range that of one direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg.quantize import GroupQuantized, dequantize_groups, num_groups, pack_bits, quantized_bits, unpack_bits
from .lowrank_quant_linear import QuantizedResidual, kernel_group_size
from .lowrank_sparse_linear import value_bits
from .prepared import PreparedCache, tensor_key
from .replacement import ReplacementLinear
from .structures import register_structure


def factor_storage_bits(out_features: int, in_features: int, rank: int, bits: int, group_size: int) -> int:
    """Bits a rank-``rank`` correction stores with factors quantized at ``bits`` bits in groups of ``group_size``.

    Codes and zero points packed at ``bits`` bits (each count rounded up to 8 codes), float16 scales,
    for ``down`` (rank, in) and ``up``ᵀ (rank, out).

    Example:
        >>> factor_storage_bits(256, 256, 1, 4, 64)  # 2·256 4-bit codes; 2·4 groups: zeros packed by 8 (2·8·4 bits), float16 scales
        2240
    """
    return quantized_bits(rank, in_features, bits, group_size) + quantized_bits(rank, out_features, bits, group_size)


@dataclass
class QuantizedCorrectionFactors:
    """W ≈ up·down + Q with up, down and Q group-quantized.

    Attributes:
        up: upᵀ quantized, (rank, out), groups along the output.
        down: down quantized, (rank, in), groups along the input.
        residual: the quantized base Q, (out, in).
    """

    up: GroupQuantized
    down: GroupQuantized
    residual: GroupQuantized

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized (up (out, rank), down (rank, in))."""
        return self.up.dequantize(dtype).T, self.down.dequantize(dtype)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        up, down = self.factors(dtype)
        return up @ down + self.residual.dequantize(dtype)


@register_structure
class QuantizedCorrectionLinear(QuantizedResidual, ReplacementLinear):
    """y = up·(down·x) + Q·x + bias, with Q and both factors stored as packed group-quantized codes.

    Q is stored and run as in :class:`~lowrank.nn.LowRankQuantLinear` (``residual_*`` buffers, torch's
    int4 kernel on CPU). The factors are buffers ``down_codes`` / ``down_zeros`` (packed
    ``factor_bits`` bits each) and ``down_scales`` (float16, rank × groups of the input), and the same
    for ``up`` stored transposed (rank × groups of the output); they are dequantized once into the
    activations' dtype at the first call (a cached run-time form, not a buffer). The bias is a
    parameter in the model dtype.

    ``storage_bits`` = Q's packed codes, zero points and float16 scales + the factors' (see
    :func:`factor_storage_bits`) + the bias at the model dtype.

    Example:
        >>> from lowrank.linalg.quantize import quantize_groups
        >>> q = lambda shape, bits: quantize_groups(torch.randn(*shape), bits, 32)
        >>> factors = QuantizedCorrectionFactors(q((2, 8), 4), q((2, 64), 4), q((8, 64), 3))
        >>> layer = QuantizedCorrectionLinear.from_factors(factors, bias=None, dtype=torch.float32)
        >>> torch.allclose(layer.to_dense(), factors.dense().float(), atol=1e-5)
        True
    """

    fixed_dtype_buffers = ("residual_scales", "down_scales", "up_scales")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bits: int,
        group_size: int,
        factor_bits: int,
        factor_group_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.bits, self.group_size = in_features, out_features, rank, bits, group_size
        self.factor_bits, self.factor_group_size = factor_bits, factor_group_size
        dtype = dtype or torch.get_default_dtype()
        self._register_residual(device)
        for part, width in (("down", in_features), ("up", out_features)):
            groups = num_groups(width, factor_group_size)
            packed = lambda count: torch.zeros((count + 7) // 8 * factor_bits, dtype=torch.uint8, device=device)
            self.register_buffer(f"{part}_codes", packed(rank * width))
            self.register_buffer(f"{part}_zeros", packed(rank * groups))
            self.register_buffer(f"{part}_scales", torch.zeros(rank, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # Tracks the model dtype through .to() and lowrank.compress.cast_ (both cast floating buffers)
        # for a layer without bias; empty and not persistent, so neither stored nor counted.
        self.register_buffer("_dtype_probe", torch.zeros(0, device=device, dtype=dtype), persistent=False)
        self._factors = PreparedCache()

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: of the bias and of the dequantized factors."""
        return self._dtype_probe.dtype

    def _unpacked(self, part: str, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scales = getattr(self, f"{part}_scales")
        codes = unpack_bits(getattr(self, f"{part}_codes"), self.factor_bits, self.rank * width).view(self.rank, width)
        zeros = unpack_bits(getattr(self, f"{part}_zeros"), self.factor_bits, scales.numel()).view(scales.shape)
        return codes, scales, zeros

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized (up (out, rank), down (rank, in)) in ``dtype`` (default: the model's)."""
        dtype = dtype or self.dtype
        # (code − zero)·scale in float32 at least, then one rounding to ``dtype``: a bfloat16 product
        # would round the float16 scale first (8 bits of mantissa for its 11).
        exact = torch.float64 if dtype == torch.float64 else torch.float32
        up = dequantize_groups(*self._unpacked("up", self.out_features), self.factor_group_size, exact).T.to(dtype)
        down = dequantize_groups(*self._unpacked("down", self.in_features), self.factor_group_size, exact).to(dtype)
        return up, down

    def _prepared_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        parts = ("down_codes", "down_zeros", "down_scales", "up_codes", "up_zeros", "up_scales")
        key = (dtype, *(tensor_key(getattr(self, part)) for part in parts))
        return self._factors.get(key, lambda: tuple(t.contiguous() for t in self.factors(dtype)))

    def residual(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized base Q, (out, in), in ``dtype`` (default: the model's)."""
        return super().residual(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self._prepared_factors(x.dtype)
        return F.linear(F.linear(x, down), up, self.bias) + self.residual_product(x)

    @classmethod
    def from_factors(
        cls, factors: QuantizedCorrectionFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None
    ) -> QuantizedCorrectionLinear:
        """Build from quantized factors (the codes are stored as given; only the bias is cast to ``dtype``)."""
        rank, out_features = factors.up.codes.shape
        in_features = factors.down.codes.shape[1]
        residual = factors.residual
        if factors.up.bits != factors.down.bits or factors.up.group_size != factors.down.group_size:
            raise ValueError("up and down must be quantized with the same bits and group size")
        device = device if device is not None else residual.codes.device
        layer = cls(
            in_features, out_features, rank, residual.bits, residual.group_size, factors.down.bits, factors.down.group_size,
            bias=bias is not None, device=device, dtype=dtype,
        )  # fmt: skip
        with torch.no_grad():
            layer._copy_residual(residual)
            for part, quantized in (("up", factors.up), ("down", factors.down)):
                getattr(layer, f"{part}_codes").copy_(pack_bits(quantized.codes, quantized.bits))
                getattr(layer, f"{part}_zeros").copy_(pack_bits(quantized.zeros, quantized.bits))
                getattr(layer, f"{part}_scales").copy_(quantized.scales)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> QuantizedCorrectionLinear:
        return cls(
            in_features, out_features, spec["rank"], spec["bits"], spec["group_size"], spec["factor_bits"], spec["factor_group_size"],
            bias=bias, dtype=dtype,
        )  # fmt: skip

    def correction_storage_bits(self) -> int:
        """Bits the quantized factors store: packed codes and zero points, float16 scales."""
        tensors = [getattr(self, f"{part}_{kind}") for part in ("up", "down") for kind in ("codes", "zeros")]
        return 8 * sum(t.numel() for t in tensors) + 16 * (self.up_scales.numel() + self.down_scales.numel())

    def storage_bits(self) -> int:
        """Bits this layer stores: the quantized base, the quantized factors and the bias at the model dtype."""
        bias = self.out_features * value_bits(self.dtype) if self.bias is not None else 0
        return self.residual_storage_bits() + self.correction_storage_bits() + bias

    def residual_runtime_bits(self) -> int:
        if self.residual_codes.device.type != "cpu" or kernel_group_size(self.group_size) is None:
            return self.out_features * self.in_features * value_bits(self.dtype)
        return super().residual_runtime_bits()

    def runtime_bits(self) -> int:
        """Bits one forward pass reads: the dequantized factors and bias at the model dtype, and Q in its run-time form."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)
        return values * value_bits(self.dtype) + self.residual_runtime_bits()

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.out_features * self.in_features)

    def spec(self) -> dict:
        return {
            "rank": self.rank,
            "bits": self.bits,
            "group_size": self.group_size,
            "factor_bits": self.factor_bits,
            "factor_group_size": self.factor_group_size,
            "bits_per_weight": round(self.bits_per_weight, 4),
        }

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: up·down + Q, in the model dtype."""
        up, down = self.factors()
        return up @ down + self.residual()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bits={self.bits}, "
            f"group_size={self.group_size}, factor_bits={self.factor_bits}, factor_group_size={self.factor_group_size}, "
            f"bits_per_weight={self.bits_per_weight:.2f}, bias={self.bias is not None}"
        )
