"""GPTQ: group quantization with error feedback from the calibration statistics.

Round-to-nearest (:func:`lowrank.linalg.quantize.quantize_groups`) rounds every weight on its
own. GPTQ (Frantar et al., 2022) quantizes the input columns of W one at a time and, after each,
moves the columns not yet quantized so that the output error ‖(W − W′)X‖²_F = tr(Δ H Δᵀ),
H = XᵀX, stays as small as it can given the codes already chosen (the Optimal Brain Surgeon
update). For a row w with its first columns F fixed at codes q_F, the best rest is

    w′_R = w_R − (q_F − w_F)·H_FR·H_RR⁻¹,

and the sequential update reaches exactly this point column after column: with U the upper
Cholesky factor of H⁻¹, quantizing column i moves the later columns by −(w_i − q_i)/U_ii · U_i,>i.
Updates are applied lazily in blocks of columns (one GEMM per block) as in the reference
implementation; a block always holds whole groups, so each group's scale and zero point are chosen
(by the same min–max rule as round-to-nearest) from the group's weights as updated so far.

The codes, scales and zero points are in :class:`~lowrank.linalg.quantize.GroupQuantized`'s
format, so a GPTQ matrix is stored, packed and run exactly like a round-to-nearest one.
No GPTQ library (auto-gptq, gptqmodel, llm-compressor) installs here without a network, and they
target GPUs; this is the algorithm in ~60 lines of torch.
"""

from __future__ import annotations

import logging
import math

import torch

from .quantize import GroupQuantized, quantize_groups

log = logging.getLogger(__name__)

# Relative damping of H, as a fraction of its mean diagonal: the reference implementation's default
# ("percdamp"). It keeps H⁻¹ well conditioned; 0 gives the exact update for a full-rank H.
DEFAULT_DAMP = 0.01
# Columns per lazy update block (the reference implementation's 128, rounded to whole groups).
BLOCK_COLUMNS = 128


def damped_hessian(xtx: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """H = XᵀX + damp·mean(diag)·I with the columns no token reaches set to identity; also which those are.

    Args:
        xtx: (in, in) Σ x xᵀ over calibration tokens.
        damp: damping relative to the mean diagonal.
        dtype: precision of the result.

    Example:
        >>> h, dead = damped_hessian(torch.diag(torch.tensor([2.0, 0.0])), damp=0.5)
        >>> h.diagonal().tolist(), dead.tolist()
        ([2.75, 1.75], [False, True])
    """
    hessian = xtx.to(dtype).clone()
    dead = hessian.diagonal() <= 0
    # A column no token reaches has no effect on the output: any value serves, and a unit diagonal
    # keeps H invertible without coupling it to the others.
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    hessian.diagonal()[dead] = 1
    mean = hessian.diagonal().mean()
    hessian.diagonal().add_(damp * mean)
    return hessian, dead


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹; adds damping (×10 per try) until H factors, never fails."""
    mean = hessian.diagonal().mean()
    extra = 0.0
    for attempt in range(12):
        trial = hessian if extra == 0 else hessian + extra * mean * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        lower, info = torch.linalg.cholesky_ex(trial)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                if extra:
                    log.info("gptq: the damped XᵀX was not positive definite; added %.1e of its mean diagonal", extra)
                return upper
        extra = max(10 * extra, 10 * max(damp, 1e-6)) if attempt else max(damp, 1e-6)
    raise AssertionError("unreachable: a damped identity always factors")


def gptq_quantize(
    weight: torch.Tensor, xtx: torch.Tensor, bits: int, group_size: int, damp: float = DEFAULT_DAMP, dtype: torch.dtype = torch.float64
) -> GroupQuantized:
    """GPTQ-quantize ``weight`` to ``bits`` bits in groups of ``group_size`` input columns.

    Args:
        weight: (out, in) matrix.
        xtx: (in, in) Σ x xᵀ of the layer's calibration inputs (:attr:`LayerStatistics.xtx`).
        bits: bits per code, 2 to 8.
        group_size: input columns sharing one scale and zero point.
        damp: damping of XᵀX relative to its mean diagonal (see :data:`DEFAULT_DAMP`).
        dtype: precision of the computation.

    Returns:
        The codes with their scales and zero points; ``.dequantize()`` is the quantized matrix.

    Example:
        >>> w, x = torch.randn(16, 64), torch.randn(200, 64) @ torch.randn(64, 64)
        >>> q = gptq_quantize(w, x.T @ x, bits=3, group_size=32)
        >>> from lowrank.linalg.whiten import output_error
        >>> output_error(w, q.dequantize(), x.T @ x) < output_error(w, quantize_groups(w, 3, 32).dequantize(), x.T @ x)
        True
    """
    assert 2 <= bits <= 8, f"bits must be in 2..8, got {bits}"
    out_features, in_features = weight.shape
    assert xtx.shape == (in_features, in_features), "xtx must be (in, in)"
    hessian, dead = damped_hessian(xtx, damp, dtype)
    upper = _inverse_cholesky(hessian, damp)
    work = weight.to(dtype).clone()
    work[:, dead] = 0
    levels = 2**bits - 1
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    groups = math.ceil(in_features / group_size)
    scales = torch.empty(out_features, groups, dtype=torch.float16, device=weight.device)
    zeros = torch.empty(out_features, groups, dtype=torch.uint8, device=weight.device)
    block = max(1, BLOCK_COLUMNS // group_size) * group_size
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        columns = work[:, start:end].clone()  # (out, block), updated column by column
        errors = torch.zeros_like(columns)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                # Scale and zero point by round-to-nearest's own rule, from the group as it stands now.
                group = quantize_groups(columns[:, i : i + group_size], bits, group_size)
                scales[:, column // group_size], zeros[:, column // group_size] = group.scales[:, 0], group.zeros[:, 0]
                step, zero = group.scales[:, 0].to(dtype), group.zeros[:, 0].to(dtype)
            code = ((columns[:, i] / step).round() + zero).clamp(0, levels)
            codes[:, column] = code.to(torch.uint8)
            error = (columns[:, i] - (code - zero) * step) / inverse[i, i]
            columns[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        work[:, end:] -= errors @ upper[start:end, end:]
    return GroupQuantized(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size)
