"""EoRA: the rank-r correction of a compression error that minimizes the layer's output error.

A base compressor replaces W by B (quantized or pruned), leaving ΔW = W − B. A correction L of
rank r makes the layer compute (B + L)·x, with calibration output error
‖(ΔW − L)X‖²_F = tr((ΔW − L) C (ΔW − L)ᵀ), C = XᵀX. Its minimizer is the whitened SVD of ΔW
(:func:`lowrank.linalg.whiten.whitened_svd`): L = (ΔW R)_r R⁻¹ for any root R Rᵀ = C, with
error Σ_{i>r} σ_i² of ΔW R. EoRA (Liu et al., 2024) states it as a projection onto the
eigenspace of C scaled by √eigenvalues, which is the symmetric root's instance of the same
formula. The error can only fall: dropping no σ_i gives error 0 and keeping none gives
‖ΔW X‖² (the base's own error), and the kept σ_i² are all ≥ 0.

The correction never increases the error, whatever damping the whitening needed: with R the
root of the damped covariance and U the top-r left singular vectors of ΔW R, L = U Uᵀ ΔW R R⁻¹
= U Uᵀ ΔW, so the remaining error is P ΔW with P = I − U Uᵀ an orthogonal projection, and
tr(P ΔW C ΔWᵀ P) ≤ tr(ΔW C ΔWᵀ) for the undamped C as for any positive semi-definite one.
"""

from __future__ import annotations

import torch

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors
from ..linalg.whiten import whitened_svd


def correction(error: torch.Tensor, statistics: LayerStatistics, rank: int, damp: float = 0.0, name: str = "") -> LowRankFactors:
    """The rank-``rank`` L minimizing ‖(ΔW − L)X‖_F for the compression error ΔW = ``error``.

    Args:
        error: (out, in) ΔW = W − B, in the precision to compute in.
        statistics: the layer's calibration statistics (XᵀX; its whitening is cached and shared).
        rank: rank of the correction (0: none, zero factors).
        damp: relative damping of XᵀX (see :func:`lowrank.linalg.whiten.whitening`).
        name: layer name for log lines.

    Example:
        >>> from lowrank.calibration import LayerStatistics
        >>> from lowrank.linalg.whiten import output_error
        >>> x, delta = torch.randn(100, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
        >>> stats = LayerStatistics.zeros(6); stats.inputs.update(x)
        >>> l = correction(delta, stats, rank=2)
        >>> output_error(delta, l.dense(), stats.xtx) < output_error(delta, 0 * delta, stats.xtx)
        True
    """
    rank = min(rank, *error.shape)
    if rank == 0:
        return LowRankFactors(up=error.new_zeros(error.shape[0], 0), down=error.new_zeros(0, error.shape[1]))
    white = statistics.whitening(damp, error.dtype, symmetric=False, name=name)
    return whitened_svd(error, statistics.xtx, rank, white=white)
