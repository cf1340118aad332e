"""LowRankQuantLinear: a high-precision low-rank product plus a low-bit quantized residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg.quantize import GroupQuantized, dequantize_groups, num_groups, pack_bits, unpack_bits
from .lowrank_sparse_linear import value_bits
from .prepared import PreparedCache, tensor_key
from .replacement import ReplacementLinear
from .structures import register_structure

# The group sizes torch's CPU int4 weight-only kernel takes; any multiple of one of them works by
# repeating each stored scale over the kernel's smaller groups.
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# The kernel tiles output rows by 16.
KERNEL_ROW_TILE = 16
# The kernel is vectorized for bfloat16 activations only (float32 takes a scalar path ~30× slower),
# so activations and per-group scales enter it in bfloat16; it accumulates in float32.
KERNEL_DTYPE = torch.bfloat16


def kernel_group_size(group_size: int) -> int | None:
    """The largest group size of the int4 kernel that divides ``group_size`` (``None``: no kernel)."""
    return next((size for size in KERNEL_GROUP_SIZES if group_size % size == 0), None)


@dataclass
class Int4Residual:
    """The residual Q in the layout of ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

    The kernel computes x·Wᵀ with W = (c − 8)·scale + zero per group, c a 4-bit code. A stored code
    of up to 4 bits is used shifted to centre on 8 (c + a, zero = (8 − a − z)·s gives (c − z)·s); a
    5–8-bit code is split into two 4-bit planes c = 16·hi + lo laid side by side along the input, so
    one kernel call with the input repeated, [x, x], reads each weight's 8 bits once.

    Attributes:
        packed: the kernel's packed codes, (padded out, padded in · planes / 2) uint8.
        scales_and_zeros: (kernel groups, padded out, 2) bfloat16.
        group_size: the kernel group size.
        in_padding: zero columns appended to x (in_features up to a multiple of the group size).
        planes: 1 or 2.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    in_padding: int
    planes: int

    def matmul(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """x·Qᵀ for x of shape (tokens, in), in float32 accumulation, returned in ``x.dtype``."""
        flat = x.to(KERNEL_DTYPE)
        if self.in_padding:
            flat = F.pad(flat, (0, self.in_padding))
        if self.planes == 2:
            flat = torch.cat([flat, flat], dim=1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        return y[:, :out_features].to(x.dtype)


def int4_residual(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> Int4Residual:
    """Lay out (out, in) codes with (out, groups) float16 scales and zero points for the int4 kernel."""
    kernel_group = kernel_group_size(group_size)
    out_features, in_features = codes.shape
    groups = scales.shape[1]
    in_padding = groups * group_size - in_features
    out_padding = -out_features % KERNEL_ROW_TILE
    codes = F.pad(codes.to(torch.int32), (0, in_padding, 0, out_padding))
    scale = F.pad(scales.float(), (0, 0, 0, out_padding))  # padded rows get scale 0: they output 0
    zero = F.pad(zeros.float(), (0, 0, 0, out_padding))
    # The kernel subtracts 8 from every 4-bit code; shifting the codes so that their middle lands
    # near 8 keeps (c − 8)·scale, and so the bfloat16 rounding of the scale, as small as the weights.
    if bits <= 4:
        shift = 8 - 2 ** (bits - 1)
        planes = [(codes + shift, scale, (8 - shift - zero) * scale)]
    else:  # c = 16·hi + lo: (hi + a − 8)·16s + (lo − 8)·s + (136 − 16a − z)·s = (c − z)·s
        shift = (136 - 2 ** (bits - 1)) // 16
        planes = [((codes >> 4) + shift, 16 * scale, (136 - 16 * shift - zero) * scale), (codes & 15, scale, torch.zeros_like(scale))]
    repeat = group_size // kernel_group
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat([plane[0] for plane in planes], dim=1).contiguous(), 2)
    scale_rows = torch.cat([plane[1] for plane in planes], dim=1).repeat_interleave(repeat, dim=1)
    zero_rows = torch.cat([plane[2] for plane in planes], dim=1).repeat_interleave(repeat, dim=1)
    scales_and_zeros = torch.stack([scale_rows.T, zero_rows.T], dim=-1).to(KERNEL_DTYPE).contiguous()
    return Int4Residual(packed, scales_and_zeros, kernel_group, in_padding, len(planes))


class _Int4ResidualProduct(torch.autograd.Function):
    """x·Qᵀ by the int4 kernel forward; backward (which the kernel lacks) multiplies by the dequantized Q."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "LowRankQuantLinear", prepared: Int4Residual) -> torch.Tensor:
        ctx.layer = layer
        return prepared.matmul(x, layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.residual(grad.dtype), None, None


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
class LowRankQuantLinear(ReplacementLinear):
    """y = up(down(x)) + Q·x + bias, where Q is stored with ``bits`` bits per weight.

    ``up`` and ``down`` are ``nn.Linear`` layers in the model dtype. Q is stored as buffers:
    ``residual_codes`` (uint8, the codes packed ``bits`` bits each, e.g. two 4-bit codes per byte
    or eight 3-bit codes in three bytes), ``residual_zeros`` (the per-group zero points, packed
    the same way) and ``residual_scales`` (float16, out × groups).

    On CPU, Q·x runs in torch's int4 weight-only kernel (``_weight_int4pack_mm_for_cpu``) on the
    codes as stored, laid out once into the kernel's tiles at the first call (a cached run-time
    form, not a buffer: the state dict and ``storage_bits`` are unchanged): 4 bits per weight for
    2–4-bit codes, 8 for 5–8-bit codes (two 4-bit planes), plus a bfloat16 scale and zero per
    group. The kernel takes bfloat16 activations, so in a float32 model Q·x is computed from
    bfloat16-rounded inputs and scales with float32 accumulation (relative error ~2⁻⁹ of the
    residual's contribution, far below its quantization error). Group sizes that are not a multiple
    of 32, and other devices, dequantize Q on every call instead.

    ``bits_per_weight`` = all stored bits (factors and bias at the model dtype, codes, zero points,
    scales) divided by out·in.

    Example:
        >>> from lowrank.linalg.quantize import quantize_groups
        >>> factors = LowRankQuantFactors(torch.randn(8, 2), torch.randn(2, 64), quantize_groups(torch.randn(8, 64), 4, 32))
        >>> layer = LowRankQuantLinear.from_factors(factors, bias=None, dtype=torch.float32)
        >>> torch.allclose(layer.to_dense(), factors.dense(), atol=1e-5)
        True
    """

    # Part of the stored format: a model cast to another dtype keeps these (lowrank.compress.cast_).
    fixed_dtype_buffers = ("residual_scales",)

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
        self._prepared = PreparedCache()

    def residual(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized residual Q, (out, in)."""
        shape = self.residual_scales.shape
        codes = unpack_bits(self.residual_codes, self.bits, self.out_features * self.in_features).view(self.out_features, self.in_features)
        zeros = unpack_bits(self.residual_zeros, self.bits, shape.numel()).view(shape)
        return dequantize_groups(codes, self.residual_scales, zeros, self.group_size, dtype or self.up.weight.dtype)

    def prepared_residual(self) -> Int4Residual | None:
        """The residual in the int4 kernel's layout, built at the first call and kept while the codes
        are unchanged; ``None`` where the kernel does not apply (not on CPU, group size not a multiple of 32)."""
        if self.residual_codes.device.type != "cpu" or kernel_group_size(self.group_size) is None:
            return None
        key = tuple(tensor_key(t) for t in (self.residual_codes, self.residual_zeros, self.residual_scales))
        return self._prepared.get(key, self._build_int4_residual)

    def _build_int4_residual(self) -> Int4Residual:
        shape = self.residual_scales.shape
        codes = unpack_bits(self.residual_codes, self.bits, self.out_features * self.in_features).view(self.out_features, self.in_features)
        zeros = unpack_bits(self.residual_zeros, self.bits, shape.numel()).view(shape)
        return int4_residual(codes, self.residual_scales, zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = self.prepared_residual()
        if prepared is None:
            return self.up(self.down(x)) + F.linear(x, self.residual(x.dtype))
        flat = x.reshape(-1, self.in_features)
        residual = _Int4ResidualProduct.apply(flat, self, prepared).view(*x.shape[:-1], self.out_features)
        return self.up(self.down(x)) + residual

    def runtime_bits(self) -> int:
        """Bits one forward pass reads: factors and bias at the model dtype plus the residual in the
        form the forward pass uses (kernel codes and bfloat16 scales and zeros, or the dequantized Q)."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        bits = values * value_bits(self.up.weight.dtype)
        if self.residual_codes.device.type != "cpu" or kernel_group_size(self.group_size) is None:
            return bits + self.out_features * self.in_features * value_bits(self.up.weight.dtype)
        planes = 1 if self.bits <= 4 else 2
        padded_out = -(-self.out_features // KERNEL_ROW_TILE) * KERNEL_ROW_TILE
        padded_in = self.residual_scales.shape[1] * self.group_size
        kernel_groups = padded_in // kernel_group_size(self.group_size)
        return bits + planes * padded_out * (padded_in * 4 + kernel_groups * 2 * value_bits(KERNEL_DTYPE))

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
