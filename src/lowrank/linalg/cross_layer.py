"""Anchored cross-layer correction: refit a layer to the dense output without overfitting.

A layer after compressed ones sees inputs X̃ (tokens as columns) instead of the dense X. The
sequential refit (:mod:`lowrank.linalg.refit`) minimizes ‖W X − W′ X̃‖²_F alone, i.e. it regresses
the dense output on X̃ with a full in×in map estimated from the calibration tokens. That map is the
identity plus a small correction (X̃ is close to X), and the correction is estimated worst exactly
in the directions X̃ rarely visits, which held-out text then visits: it fits the calibration text
and loses held-out perplexity (measured in ``benchmarks/results/cross-layer.md``).

The anchored objective keeps the regression but pulls it toward the dense-input fit:

    J(W′) = (1 − α)·‖W X − W′ X̃‖²_F + α·‖(W − W′) X‖²_F

α = 0 is the plain refit, α = 1 the ordinary whitened fit on dense inputs (no correction); in
between, the second term is a ridge toward W in the metric of the dense inputs, whose size is set
by the calibration statistics themselves (no held-out text needed to choose it). Expanding with
S = X̃X̃ᵀ, B = XX̃ᵀ, A = XXᵀ:

    J(W′) = tr(W′ G W′ᵀ) − 2 tr(W K W′ᵀ) + const,   G = (1 − α)S + αA,   K = (1 − α)B + αA,

so with P = W K G⁻¹, J(W′) = ‖(P − W′) G^{1/2}‖²_F + const: the rank-r minimizer is the whitened
rank-r factorization of P under G (the same reduced-rank argument as the refit; per-output Fisher
weights change nothing in P, since each row is its own least-squares problem). Equivalently, the
layer is fit on a mixture of the two input streams, a fraction α of the tokens dense and 1 − α
compressed, each asked for the dense output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowrankError
from .whiten import whitening


def _check_anchor(anchor: float) -> None:
    if not 0.0 <= anchor <= 1.0:
        raise LowrankError(f"the cross-layer anchor must lie in [0, 1] (0: plain refit, 1: no correction), got {anchor}")


@dataclass
class AnchoredTarget:
    """What the anchored objective hands to a factorizer: the target P and the Gram matrix G.

    Attributes:
        target: (out, in) P = W K G⁻¹; the rank-r minimizer of J is P's whitened factorization under G.
        gram: (in, in) G = (1 − α)·X̃X̃ᵀ + α·XXᵀ, the input second moment the factorizer whitens by.
    """

    target: torch.Tensor
    gram: torch.Tensor


def anchored_target(
    weight: torch.Tensor,
    dense_xtx: torch.Tensor,
    cross: torch.Tensor,
    shifted_xtx: torch.Tensor,
    anchor: float,
    damp: float = 0.0,
    name: str = "",
) -> AnchoredTarget:
    """The anchored refit's target P and Gram matrix G (see the module docstring for the derivation).

    Args:
        weight: (out, in) dense weight W.
        dense_xtx: Σ x xᵀ over calibration tokens (in, in), dense inputs.
        cross: Σ x x̃ᵀ (in, in), dense against compressed inputs of the same tokens.
        shifted_xtx: Σ x̃ x̃ᵀ (in, in), the compressed model's inputs.
        anchor: α in [0, 1]; 0 is the unregularized refit, 1 the dense-input fit.
        damp: relative damping of G's inverse (as :func:`lowrank.linalg.whitening`; a singular G
            is always damped).
        name: layer name for the damping log line.

    Returns:
        An :class:`AnchoredTarget` in float64.

    Example:
        >>> w, x = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 50, dtype=torch.float64)
        >>> shifted = x + 0.1 * torch.randn(6, 50, dtype=torch.float64)
        >>> out = anchored_target(w, x @ x.T, x @ shifted.T, shifted @ shifted.T, anchor=1.0)
        >>> torch.allclose(out.target, w)  # α = 1: the dense-input fit, nothing to correct
        True
    """
    _check_anchor(anchor)
    a, b, s = dense_xtx.double(), cross.double(), shifted_xtx.double()
    gram = (1 - anchor) * s + anchor * a
    coupling = (1 - anchor) * b + anchor * a
    # The Cholesky root, as the plain refit took it: at α = 0 the target is that refit's, bit for bit.
    white = whitening(gram, damp=damp, name=name, symmetric=False)
    inverse = white.inverse_root.T @ white.inverse_root  # G⁻¹ (damped if G is singular)
    return AnchoredTarget(target=weight.double() @ coupling @ inverse, gram=gram)


def anchored_error(
    weight: torch.Tensor, approximation: torch.Tensor, dense_xtx: torch.Tensor, cross: torch.Tensor, shifted_xtx: torch.Tensor, anchor: float
) -> float:
    """J(W′) = (1 − α)‖W X − W′ X̃‖²_F + α‖(W − W′) X‖²_F from second moments (float64).

    Example:
        >>> w = torch.randn(3, 5, dtype=torch.float64); c = torch.eye(5, dtype=torch.float64)
        >>> anchored_error(w, w, c, c, c, anchor=0.3)
        0.0
    """
    w, v = weight.double(), approximation.double()
    a, b, s = dense_xtx.double(), cross.double(), shifted_xtx.double()
    dense_term = torch.einsum("oi,ij,oj->", w, a, w)
    shifted = dense_term - 2 * torch.einsum("oi,ij,oj->", w, b, v) + torch.einsum("oi,ij,oj->", v, s, v)
    delta = w - v
    anchored = torch.einsum("oi,ij,oj->", delta, a, delta)
    return max(((1 - anchor) * shifted + anchor * anchored).item(), 0.0)


def weighted_shifted_error(weight: torch.Tensor, approximation: torch.Tensor, paired, row_weights: torch.Tensor | None = None) -> float:
    """Σ_o w_o ‖(W X − W′ X̃)_o‖² from paired statistics: the calibration objective a fit is judged by.

    Args:
        weight: (out, in) dense weight W.
        approximation: (out, in) W′.
        paired: :class:`~lowrank.calibration.paired.PairedStatistics` of the layer.
        row_weights: (out,) weights per output (a Fisher-weighted method's E[(∂L/∂y)²]), or ``None`` for 1.

    Example:
        >>> from lowrank.calibration.paired import PairedStatistics
        >>> c = torch.eye(3, dtype=torch.float64)
        >>> pair = PairedStatistics(c, c, c, torch.zeros(3, dtype=torch.float64), 10)
        >>> weighted_shifted_error(torch.ones(2, 3), torch.zeros(2, 3), pair, torch.tensor([1.0, 0.5]))
        4.5
    """
    w, v = weight.double(), approximation.double()
    a, b, s = paired.dense_xtx.double(), paired.cross.double(), paired.shifted_xtx.double()
    rows = torch.einsum("oi,ij,oj->o", w, a, w) - 2 * torch.einsum("oi,ij,oj->o", w, b, v) + torch.einsum("oi,ij,oj->o", v, s, v)
    if row_weights is not None:
        rows = rows * row_weights.double().to(rows.device)
    return rows.sum().item()


def anchored_subset_refit(
    weight: torch.Tensor,
    dense_xtx: torch.Tensor,
    cross: torch.Tensor,
    shifted_xtx: torch.Tensor,
    kept: torch.Tensor,
    anchor: float,
    damp: float = 0.0,
    name: str = "",
) -> torch.Tensor:
    """The anchored refit of a layer that keeps only the inputs ``kept`` (MoDeGPT's down projection).

    The compressed model feeds the layer x̃ ∈ Rᵏ, the kept inputs only (computed from compressed
    inputs), the dense one x ∈ Rⁿ. Over B (out × k) it minimizes

        (1 − α)·‖W X − B X̃‖²_F + α·‖W X − B X_S‖²_F,

    the same anchored objective as :func:`anchored_target` with the dense stream restricted to the
    kept inputs X_S. With A = XXᵀ, C = XX̃ᵀ (n × k), S = X̃X̃ᵀ (k × k):

        B = W·((1 − α)·C + α·A_{:S})·((1 − α)·S + α·A_{SS})⁻¹.

    α = 1 is the Nyström refit W·A_{:S}·A_{SS}⁻¹ (:func:`lowrank.linalg.nystrom.nystrom_refit`),
    α = 0 the least-squares fit of the dense output on the compressed inputs.

    Args:
        weight: (out, n) dense W.
        dense_xtx: (n, n) Σ x xᵀ, dense inputs.
        cross: (n, k) Σ x x̃ᵀ, dense against the compressed model's (kept) inputs of the same tokens.
        shifted_xtx: (k, k) Σ x̃ x̃ᵀ.
        kept: (k,) indices S of the kept inputs among the n, in the order x̃ holds them.
        anchor: α in [0, 1].
        damp: damping of the Gram matrix relative to its mean diagonal (0: only when singular, logged).
        name: layer name for the log.

    Returns:
        (out, k) float64 B.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> kept = torch.tensor([0])
        >>> anchored_subset_refit(torch.tensor([[1.0, 1.0]]), a, a[:, kept], a[kept][:, kept], kept, anchor=0.3)  # unshifted: the Nyström refit
        tensor([[1.5000]], dtype=torch.float64)
    """
    from .nystrom import _cholesky, _mean_diagonal

    _check_anchor(anchor)
    a, c, s = dense_xtx.double(), cross.double(), shifted_xtx.double()
    gram = (1 - anchor) * s + anchor * a[kept][:, kept]
    coupling = (1 - anchor) * c + anchor * a[:, kept]
    eye = torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    factor = _cholesky(gram + damp * _mean_diagonal(gram) * eye, name)
    return torch.cholesky_solve((weight.double() @ coupling).T, factor).T
