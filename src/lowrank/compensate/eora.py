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
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..linalg.weighted import row_weights, weighted_svd
from ..linalg.whiten import whitened_svd


def output_weights(statistics: LayerStatistics) -> torch.Tensor:
    """√(output Fisher) per output channel (:func:`lowrank.linalg.weighted.row_weights`), for the Fisher-weighted correction.

    Example:
        >>> from lowrank.calibration import LayerStatistics
        >>> stats = LayerStatistics.zeros(4); stats.inputs.update(torch.randn(10, 4))
        >>> stats.output_grad_sq, stats.num_grad_tokens = torch.tensor([4.0, 1.0]), 1
        >>> output_weights(stats).round(decimals=3).tolist()
        [2.0, 1.0]
    """
    fisher = statistics.output_fisher
    if fisher is None:
        raise LowrankError(
            "the Fisher-weighted correction needs output gradients; calibrate with gradients=True (lowrank compensate does with --fisher-weighted)"
        )
    return row_weights(fisher)


def weighted_output_error(weight: torch.Tensor, approximation: torch.Tensor, covariance: torch.Tensor, weights: torch.Tensor | None) -> float:
    """Σ_o w_o²·‖(W − W′)_o X‖², from C = XᵀX in float64 (``weights`` ``None``: all 1, the plain output error).

    Example:
        >>> w, c = torch.randn(3, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
        >>> round(weighted_output_error(w, 0 * w, c, torch.full((3,), 2.0)) / w.square().sum().item(), 6)
        4.0
    """
    delta = weight.double() - approximation.double()
    rows = torch.einsum("oi,ij,oj->o", delta, covariance.double(), delta)
    return (rows if weights is None else weights.double().square() * rows).sum().item()


def correction(
    error: torch.Tensor, statistics: LayerStatistics, rank: int, damp: float = 0.0, name: str = "", weights: torch.Tensor | None = None
) -> LowRankFactors:
    """The rank-``rank`` L minimizing ‖(ΔW − L)X‖_F for the compression error ΔW = ``error``.

    With ``weights`` (w_o > 0 per output, e.g. :func:`output_weights`) it minimizes the weighted
    Σ_o w_o²‖(ΔW − L)_o X‖² instead, the layer's second-order loss increase under a diagonal output
    Fisher: the two-sided weighted SVD L = D⁻¹(D ΔW R)_r R⁻¹, D = diag(w)
    (:func:`lowrank.linalg.weighted.weighted_svd`). With V the top-r right singular vectors of
    D ΔW R, (D ΔW R)_r = D ΔW R V Vᵀ, so L = ΔW R V Vᵀ R⁻¹ and every output's remaining error is
    ‖ΔW_o R (I − V Vᵀ)‖² ≤ ‖ΔW_o R‖²: no output's plain error grows either, whatever the weights,
    when R is a root of the undamped XᵀX (a damped root loses that guarantee, so the callers check).

    Args:
        error: (out, in) ΔW = W − B, in the precision to compute in.
        statistics: the layer's calibration statistics (XᵀX; its whitening is cached and shared).
        rank: rank of the correction (0: none, zero factors).
        damp: relative damping of XᵀX (see :func:`lowrank.linalg.whiten.whitening`).
        name: layer name for log lines.
        weights: optional (out,) positive output weights.

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
    if weights is not None:
        return weighted_svd(error, rank, output_weights=weights, white=white, dtype=error.dtype)
    return whitened_svd(error, statistics.xtx, rank, white=white)
