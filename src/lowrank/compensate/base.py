"""The base compressors that compensation corrects: quantizers and pruners, named by a short spec.

=================  ==============================================================  ==================
spec               what it does                                                    needs statistics
=================  ==============================================================  ==================
``rtn:B``          round-to-nearest, B bits per weight, asymmetric per group        no
``gptq:B``         GPTQ error-feedback quantization, B bits (``lowrank.linalg.gptq``) yes
``magnitude:S``    drop the fraction S of smallest |W_ij| of every row              no
``wanda:S``        drop the fraction S of smallest |W_ij|·‖X_j‖ of every row        yes
``magnitude:N:M``  keep the N largest |W_ij| of every M consecutive inputs          no
``wanda:N:M``      keep the N largest |W_ij|·‖X_j‖ of every M consecutive inputs    yes
=================  ==============================================================  ==================

Quantized bases are stored as packed codes, float16 scales and packed zero points
(:func:`lowrank.linalg.quantize.quantized_bits`); pruned ones as the kept values in the model
dtype plus CSR indices (an int16 column index per value when in_features ≤ 32768, an int32 row
pointer per row), which is what :class:`~lowrank.nn.LowRankPlusSparseLinear` stores. A 2:4
kernel would need 2 bits of metadata per kept value instead; the count here is the stored one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg.gptq import DEFAULT_DAMP, gptq_quantize
from ..linalg.prune import n_m_mask, pruning_scores, unstructured_mask
from ..linalg.quantize import GroupQuantized, quantize_groups, quantized_bits
from ..nn.lowrank_sparse_linear import ROW_POINTER_DTYPE, index_bits, index_dtype, value_bits

QUANTIZERS = ("rtn", "gptq")
PRUNERS = ("magnitude", "wanda")
_SPEC = re.compile(r"^(?P<kind>[a-z]+):(?P<first>[0-9.]+)(?::(?P<second>[0-9]+))?$")


@dataclass(frozen=True)
class BaseSpec:
    """A parsed base compressor: ``kind`` with ``bits`` (quantizers), ``sparsity`` or ``n``:``m`` (pruners).

    Example:
        >>> BaseSpec.parse("wanda:2:4").n, BaseSpec.parse("gptq:3").bits
        (2, 3)
    """

    kind: str
    bits: int | None = None
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def quantizes(self) -> bool:
        return self.kind in QUANTIZERS

    @property
    def needs_statistics(self) -> bool:
        return self.kind in ("gptq", "wanda")

    @classmethod
    def parse(cls, text: str) -> BaseSpec:
        """Read ``rtn:4``, ``gptq:3``, ``magnitude:0.5``, ``wanda:0.5`` or ``wanda:2:4``; one-line error otherwise."""
        hint = "use rtn:BITS, gptq:BITS (BITS 2..8), magnitude:SPARSITY, wanda:SPARSITY (in [0, 1)), or magnitude:N:M / wanda:N:M (e.g. 2:4)"
        match = _SPEC.match(text.strip().lower())
        if match is None or match["kind"] not in QUANTIZERS + PRUNERS:
            raise LowrankError(f"unknown base compressor {text!r}; {hint}")
        kind, first, second = match["kind"], match["first"], match["second"]
        try:
            if kind in QUANTIZERS:
                if second is not None or not 2 <= int(first) <= 8:
                    raise ValueError
                return cls(kind, bits=int(first))
            if second is not None:
                n, m = int(first), int(second)
                if not 0 < n < m:
                    raise ValueError
                return cls(kind, n=n, m=m)
            sparsity = float(first)
            if not 0 <= sparsity < 1:
                raise ValueError
            return cls(kind, sparsity=sparsity)
        except ValueError:
            raise LowrankError(f"invalid base compressor {text!r}; {hint}") from None


@dataclass
class CompressedBase:
    """A base-compressed matrix: ``approximation`` (out, in) and its stored form.

    Attributes:
        approximation: the matrix the base stands for, in the computation's precision.
        quantized: the codes of a quantizer, else ``None``.
        mask: the keep-mask of a pruner, else ``None``.
    """

    approximation: torch.Tensor
    quantized: GroupQuantized | None = None
    mask: torch.Tensor | None = None

    def storage_bits(self, dtype: torch.dtype) -> int:
        """Bits the base stores for a model of ``dtype`` (see the module docstring)."""
        out_features, in_features = self.approximation.shape
        if self.quantized is not None:
            return quantized_bits(out_features, in_features, self.quantized.bits, self.quantized.group_size)
        kept = int(self.mask.sum().item())
        return kept * (value_bits(dtype) + index_bits(index_dtype(in_features))) + (out_features + 1) * torch.iinfo(ROW_POINTER_DTYPE).bits


def compress_base(
    weight: torch.Tensor,
    statistics: LayerStatistics | None,
    spec: BaseSpec,
    group_size: int = 64,
    gptq_damp: float = DEFAULT_DAMP,
    dtype: torch.dtype = torch.float64,
    name: str = "",
) -> CompressedBase:
    """Quantize or prune ``weight`` as ``spec`` says.

    Args:
        weight: (out, in) matrix.
        statistics: the layer's calibration statistics (``gptq`` and ``wanda`` need them).
        spec: the base compressor.
        group_size: input columns per quantization group.
        gptq_damp: GPTQ's damping of XᵀX, relative to its mean diagonal.
        dtype: precision of the computation and of ``approximation``.
        name: layer name for messages.

    Example:
        >>> base = compress_base(torch.randn(8, 64), None, BaseSpec.parse("rtn:4"))
        >>> base.storage_bits(torch.float32) == quantized_bits(8, 64, 4, 64)
        True
    """
    if spec.needs_statistics and statistics is None:
        raise LowrankError(f"base compressor {spec.kind} needs calibration statistics for layer {name or '(unnamed)'}; pass --calib FILE")
    target = weight.to(dtype)
    if spec.kind == "rtn":
        quantized = quantize_groups(target, spec.bits, group_size)
        return CompressedBase(quantized.dequantize(dtype), quantized=quantized)
    if spec.kind == "gptq":
        quantized = gptq_quantize(target, statistics.xtx, spec.bits, group_size, damp=gptq_damp, dtype=dtype)
        return CompressedBase(quantized.dequantize(dtype), quantized=quantized)
    scores = pruning_scores(target, statistics.xtx if spec.kind == "wanda" else None)
    if spec.n is not None:
        if target.shape[1] % spec.m:
            raise LowrankError(f"{spec.n}:{spec.m} pruning needs in_features divisible by {spec.m}; layer {name} has {target.shape[1]}; --exclude it")
        mask = n_m_mask(scores, spec.n, spec.m)
    else:
        mask = unstructured_mask(scores, spec.sparsity)
    return CompressedBase(target * mask, mask=mask)
