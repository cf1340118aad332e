"""Unstructured and N:M pruning masks by weight magnitude or by Wanda's score.

Magnitude pruning drops the weights of smallest |W_ij|. Wanda (Sun et al., 2023) weighs each
weight by the norm of the input it multiplies, |W_ij|·‖X_j‖₂ with ‖X_j‖₂² = (XᵀX)_jj: a small
weight on a large input can matter more than a larger weight on a quiet one. As in Wanda, weights
compete within their output row (every row keeps the same fraction), and the kept weights are not
changed. N:M sparsity (2:4 is what sparse tensor cores run) keeps the N largest scores of every M
consecutive inputs of a row.
"""

from __future__ import annotations

import torch


def pruning_scores(weight: torch.Tensor, xtx: torch.Tensor | None = None) -> torch.Tensor:
    """|W| (magnitude, ``xtx`` None) or Wanda's |W_ij|·‖X_j‖₂ with ‖X_j‖₂² = (XᵀX)_jj.

    Args:
        weight: (out, in) matrix.
        xtx: (in, in) Σ x xᵀ of the layer's calibration inputs, or ``None``.

    Example:
        >>> pruning_scores(torch.tensor([[1.0, -2.0]]), torch.diag(torch.tensor([9.0, 1.0]))).tolist()
        [[3.0, 2.0]]
    """
    scores = weight.abs().double()
    if xtx is not None:
        scores = scores * xtx.diagonal().double().clamp(min=0).sqrt()[None, :]
    return scores


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``sparsity`` fraction of lowest scores in every row (ties: lower index kept).

    Args:
        scores: (out, in) importance of each weight.
        sparsity: fraction of each row to drop, in [0, 1).

    Example:
        >>> unstructured_mask(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 0.5).tolist()
        [[False, True, False, True]]
    """
    assert 0 <= sparsity < 1, f"sparsity must be in [0, 1), got {sparsity}"
    _out_features, in_features = scores.shape
    dropped = int(in_features * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if dropped:
        # stable sort: equal scores drop the later column first, so the result is deterministic
        order = torch.sort(scores, dim=1, stable=True, descending=True).indices
        mask.scatter_(1, order[:, in_features - dropped :], False)
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive inputs of a row (N:M sparsity).

    Args:
        scores: (out, in) importance of each weight; ``in`` must be a multiple of ``m``.
        n: weights kept per group.
        m: group length.

    Example:
        >>> n_m_mask(torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0]]), 2, 4).int().tolist()
        [[0, 1, 0, 1, 1, 1, 0, 0]]
    """
    out_features, in_features = scores.shape
    assert 0 < n <= m and in_features % m == 0, f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_features}"
    groups = scores.reshape(out_features, in_features // m, m)
    order = torch.sort(groups, dim=2, stable=True, descending=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order[..., :n], True)
    return mask.reshape(out_features, in_features)
