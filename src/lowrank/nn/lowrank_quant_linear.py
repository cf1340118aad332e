"""LowRankQuantLinear: a high-precision low-rank product plus a low-bit quantized residual;
LowRankQuantSparseLinear: the same plus a few full-precision outliers in CSR form (dense-and-sparse)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg.quantize import GroupQuantized, dequantize_groups, num_groups, pack_bits, unpack_bits
from .layout import low_rank_plus
from .lowrank_sparse_linear import SparseEntries, scatter, value_bits
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
        if y.shape[1] != out_features:  # padded output rows (out not a multiple of 16)
            y = y[:, :out_features]
        return y.to(x.dtype)


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
    def forward(ctx, x: torch.Tensor, layer: LowRankQuantLinear, prepared: Int4Residual) -> torch.Tensor:
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


@dataclass
class LowRankQuantSparseFactors:
    """W ≈ up @ down + Q + S: a quantized residual plus sparse full-precision outliers (SqueezeLLM's dense-and-sparse).

    Attributes:
        up: (out, rank). down: (rank, in).
        residual: the quantized part Q.
        rows, cols: (nnz,) long positions of the outliers. values: (nnz,) their values.
    """

    up: torch.Tensor
    down: torch.Tensor
    residual: GroupQuantized
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def sparse_dense(self) -> torch.Tensor:
        """S as an (out, in) dense matrix."""
        return scatter(self.up.shape[0], self.down.shape[1], self.rows, self.cols, self.values)

    def dense(self) -> torch.Tensor:
        quantized = self.residual.dequantize(self.up.dtype).to(self.up.device)
        return self.up @ self.down + quantized + self.sparse_dense().to(self.up.dtype)


class QuantizedResidual:
    """The quantized residual Q of a layer: its buffers, its dequantized and int4-kernel forms, its bits.

    A mixin for the structures that hold one (:class:`LowRankQuantLinear`,
    :class:`LowRankQuantSparseLinear`), so both store and run Q the same way: ``residual_codes``
    (uint8, codes packed ``bits`` bits each), ``residual_zeros`` (per-group zero points packed the
    same way) and ``residual_scales`` (float16, out × groups); on CPU, Q·x runs in torch's int4
    kernel on a form laid out once at the first call.
    """

    in_features: int
    out_features: int
    bits: int
    group_size: int

    def _register_residual(self, device) -> None:
        groups = self.out_features * num_groups(self.in_features, self.group_size)
        packed = lambda count: torch.zeros((count + 7) // 8 * self.bits, dtype=torch.uint8, device=device)
        self.register_buffer("residual_codes", packed(self.out_features * self.in_features))
        self.register_buffer("residual_zeros", packed(groups))
        self.register_buffer("residual_scales", torch.zeros(self.out_features, groups // self.out_features, dtype=torch.float16, device=device))
        self._prepared = PreparedCache()

    def _copy_residual(self, residual: GroupQuantized) -> None:
        self.residual_codes.copy_(pack_bits(residual.codes, residual.bits))
        self.residual_zeros.copy_(pack_bits(residual.zeros, residual.bits))
        self.residual_scales.copy_(residual.scales)

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

    def residual_product(self, x: torch.Tensor) -> torch.Tensor:
        """Q·x for x of shape (..., in): the int4 kernel where it applies, else the dequantized Q."""
        prepared = self.prepared_residual()
        if prepared is None:
            return F.linear(x, self.residual(x.dtype))
        flat = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _Int4ResidualProduct.apply(flat, self, prepared)
        else:  # no backward to record: skip the autograd.Function's dispatch (~10 % of a small layer's decode call)
            y = prepared.matmul(flat, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def residual_storage_bits(self) -> int:
        """Bits Q stores: packed codes and zero points, float16 scales."""
        return 8 * (self.residual_codes.numel() + self.residual_zeros.numel()) + 16 * self.residual_scales.numel()

    def residual_runtime_bits(self) -> int:
        """Bits one forward pass reads of Q, in the form it uses (kernel codes and bfloat16 scales and zeros, or the dequantized Q)."""
        if self.residual_codes.device.type != "cpu" or kernel_group_size(self.group_size) is None:
            return self.out_features * self.in_features * value_bits(self.up.weight.dtype)
        planes = 1 if self.bits <= 4 else 2
        padded_out = -(-self.out_features // KERNEL_ROW_TILE) * KERNEL_ROW_TILE
        padded_in = self.residual_scales.shape[1] * self.group_size
        kernel_groups = padded_in // kernel_group_size(self.group_size)
        return planes * padded_out * (padded_in * 4 + kernel_groups * 2 * value_bits(KERNEL_DTYPE))


@register_structure
class LowRankQuantLinear(QuantizedResidual, ReplacementLinear):
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
    of 32, and other devices, dequantize Q on every call instead. ``up.weight`` is laid out
    column-major on CPU at the first call in float32 (same shape and values, no copy kept); bfloat16
    factors run from oneDNN's packed layout without gradients (a cached run-time copy; :func:`~lowrank.nn.layout.low_rank_plus`).

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
        self._register_residual(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_plus(x, self.down, self.up, self.residual_product(x))

    def runtime_bits(self) -> int:
        """Bits one forward pass reads: factors and bias at the model dtype plus the residual in the
        form the forward pass uses (kernel codes and bfloat16 scales and zeros, or the dequantized Q)."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        return values * value_bits(self.up.weight.dtype) + self.residual_runtime_bits()

    @classmethod
    def from_factors(cls, factors: LowRankQuantFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> LowRankQuantLinear:
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
            layer._copy_residual(residual)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> LowRankQuantLinear:
        return cls(in_features, out_features, spec["rank"], spec["bits"], spec["group_size"], bias=bias, dtype=dtype)

    def storage_bits(self) -> int:
        """Bits this layer stores: factors and bias at the model dtype plus the quantized residual."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        return values * value_bits(self.up.weight.dtype) + self.residual_storage_bits()

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


@register_structure
class LowRankQuantSparseLinear(QuantizedResidual, SparseEntries, ReplacementLinear):
    """y = up(down(x)) + Q·x + S·x + bias: :class:`LowRankQuantLinear` plus ``num_nonzero`` full-precision outliers.

    SqueezeLLM's dense-and-sparse split: the few largest (or most sensitive) entries of the
    residual are kept exactly, in the model dtype, so the quantization groups they sat in get a
    smaller range and finer steps. Q is stored and run as in :class:`LowRankQuantLinear`
    (same buffer names, int4 kernel on CPU); S is stored as :class:`~lowrank.nn.LowRankPlusSparseLinear`
    stores its sparse part (CSR: ``sparse_values`` a parameter in the model dtype,
    ``sparse_col_indices`` int16 up to 32768 inputs else int32, ``sparse_crow_indices`` int32
    out + 1 row pointers) and run from its :class:`~lowrank.nn.lowrank_sparse_linear.SparseRows`
    form, built once at the first call (int32 indices, a CSR tensor), never per call.

    A structure of its own, not an option of :class:`LowRankQuantLinear`: code that treats a
    ``LowRankQuantLinear`` as "factors + Q" (the compensation export, the modeling file for
    ``trust_remote_code``) would otherwise drop S silently.

    ``storage_bits`` = factors and bias at the model dtype + Q's packed codes, zero points and
    float16 scales + :func:`sparse_bits` of the outliers.

    Example:
        >>> from lowrank.linalg.quantize import quantize_groups
        >>> q = quantize_groups(torch.randn(8, 64), 4, 32)
        >>> factors = LowRankQuantSparseFactors(torch.randn(8, 2), torch.randn(2, 64), q, torch.tensor([1, 5]), torch.tensor([3, 0]), torch.randn(2))
        >>> layer = LowRankQuantSparseLinear.from_factors(factors, bias=None, dtype=torch.float32)
        >>> torch.allclose(layer.to_dense(), factors.dense().float(), atol=1e-5), layer.num_nonzero
        (True, 2)
    """

    fixed_dtype_buffers = ("residual_scales",)

    def __init__(
        self, in_features: int, out_features: int, rank: int, bits: int, group_size: int, num_nonzero: int, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.bits, self.group_size = in_features, out_features, rank, bits, group_size
        self.num_nonzero = num_nonzero
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self._register_residual(device)
        self._register_sparse(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_plus(x, self.down, self.up, self.residual_product(x)) + self.sparse_product(x)

    def runtime_bits(self) -> int:
        """Bits one forward pass for one token reads: factors and bias, Q in its run-time form, and S as
        its CSR form reads it."""
        dtype = self.up.weight.dtype
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        return values * value_bits(dtype) + self.residual_runtime_bits() + self.sparse_runtime_bits()

    @classmethod
    def from_factors(cls, factors: LowRankQuantSparseFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> LowRankQuantSparseLinear:
        """Build from factors computed in high precision, cast to the model's ``dtype``."""
        out_features, rank = factors.up.shape
        in_features = factors.down.shape[1]
        residual = factors.residual
        device = device if device is not None else factors.up.device
        layer = cls(
            in_features,
            out_features,
            rank,
            residual.bits,
            residual.group_size,
            factors.values.numel(),
            bias=bias is not None,
            device=device,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.down.weight.copy_(factors.down)
            layer.up.weight.copy_(factors.up)
            if bias is not None:
                layer.up.bias.copy_(bias)
            layer._copy_residual(residual)
            layer._copy_sparse(factors.rows, factors.cols, factors.values)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> LowRankQuantSparseLinear:
        return cls(in_features, out_features, spec["rank"], spec["bits"], spec["group_size"], spec["num_nonzero"], bias=bias, dtype=dtype)

    def storage_bits(self) -> int:
        """Bits this layer stores: factors and bias at the model dtype, the quantized residual, and the outliers in CSR form."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        return values * value_bits(self.up.weight.dtype) + self.residual_storage_bits() + self.sparse_storage_bits()

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.out_features * self.in_features)

    def spec(self) -> dict:
        return {
            "rank": self.rank,
            "bits": self.bits,
            "group_size": self.group_size,
            "num_nonzero": self.num_nonzero,
            "bits_per_weight": round(self.bits_per_weight, 4),
        }

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: up·down + Q + S."""
        return self.up.weight @ self.down.weight + self.residual() + self.sparse()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bits={self.bits}, "
            f"group_size={self.group_size}, num_nonzero={self.num_nonzero}, bits_per_weight={self.bits_per_weight:.2f}, "
            f"bias={self.up.bias is not None}"
        )
