"""Round-to-nearest group quantization and bit packing.

A matrix is quantized row by row in groups of ``group_size`` consecutive input columns. Each group
gets its own float16 scale and a ``bits``-bit integer zero point (asymmetric min–max quantization),
so a group's codes cover its range with all 2^bits levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Scales are stored in float16; this keeps them above its smallest normal number.
SMALLEST_SCALE = 2.0**-14
SCALE_BITS = 16


@dataclass
class GroupQuantized:
    """Integer codes of an (out, in) matrix with per-group scales and zero points.

    Attributes:
        codes: (out, in) uint8, each in [0, 2^bits).
        scales: (out, groups) float16.
        zeros: (out, groups) uint8 zero points, each in [0, 2^bits).
        bits: bits per code.
        group_size: input columns sharing one scale (the last group may be shorter).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (out, in) matrix the codes stand for: (code − zero)·scale."""
        return dequantize_groups(self.codes, self.scales, self.zeros, self.group_size, dtype)


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def quantized_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Storage of a quantized (out, in) matrix: codes and zero points packed at ``bits`` bits, float16 scales.

    Packing works on blocks of 8 codes, so each count is rounded up to a multiple of 8.
    """
    groups = out_features * num_groups(in_features, group_size)
    packed = lambda count: math.ceil(count / 8) * 8 * bits  # noqa: E731
    return packed(out_features * in_features) + packed(groups) + groups * SCALE_BITS


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int) -> GroupQuantized:
    """Round-to-nearest asymmetric quantization of ``weight`` in groups along the input dimension.

    Each group's range [min(x, 0), max(x, 0)] is split into 2^bits − 1 steps; including 0 in the
    range lets the zero point be an exact integer code.

    Args:
        weight: (out, in) matrix.
        bits: bits per code, 2 to 8.
        group_size: input columns per scale.

    Example:
        >>> w = torch.randn(4, 128)
        >>> q = quantize_groups(w, bits=4, group_size=64)
        >>> bool((q.dequantize() - w.double()).abs().max() < 0.5)
        True
    """
    assert 2 <= bits <= 8, f"bits must be in 2..8, got {bits}"
    assert weight.ndim == 2 and group_size >= 1
    out_features, in_features = weight.shape
    groups = num_groups(in_features, group_size)
    padded = F.pad(weight.double(), (0, groups * group_size - in_features)).view(out_features, groups, group_size)
    levels = 2**bits - 1
    low = padded.amin(dim=-1).clamp(max=0)
    high = padded.amax(dim=-1).clamp(min=0)
    # Round the scale to float16 first, so the codes are chosen for the scale actually stored.
    scales = ((high - low) / levels).clamp(min=SMALLEST_SCALE).half()
    step = scales.double()
    zeros = (-low / step).round().clamp(0, levels)
    codes = (padded / step[..., None]).round() + zeros[..., None]
    codes = codes.clamp(0, levels).view(out_features, -1)[:, :in_features]
    return GroupQuantized(codes=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.uint8), bits=bits, group_size=group_size)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(code − zero)·scale for (out, in) codes and (out, groups) scales and zero points."""
    in_features = codes.shape[1]
    step = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :in_features]
    offset = zeros.to(dtype).repeat_interleave(group_size, dim=1)[:, :in_features]
    return (codes.to(dtype) - offset) * step


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into bytes, ``bits`` bits each (8 codes → ``bits`` bytes).

    Example:
        >>> codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 5], dtype=torch.uint8)
        >>> packed = pack_bits(codes, 3)
        >>> packed.numel(), torch.equal(unpack_bits(packed, 3, 9), codes)
        (6, True)
    """
    assert 1 <= bits <= 8
    flat = codes.reshape(-1).to(torch.int64)
    flat = F.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    shifts = torch.arange(8, device=flat.device) * bits
    # The 8 codes occupy disjoint bit ranges, so their sum is their bitwise OR.
    words = (flat << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    return ((words[:, None] >> byte_shifts) & 255).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes packed by :func:`pack_bits`, as uint8."""
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (words[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)
