"""MoDeGPT type II's math: which rotary dimension pairs of a query/key head to keep, and what dropping the others costs.

MoDeGPT (Lin et al. 2024) shrinks a head's query/key dimension by a CR (column-row) decomposition of
the logit map: dimension i of a head is scored by ‖C_q^{1/2}[:, i]‖·‖C_k^{1/2}[:, i]‖, C_q and C_k
the correlations Σ_t q_t q_tᵀ and Σ_t k_t k_tᵀ of the head's query and key outputs on the calibration
tokens, and the highest-scoring dimensions are kept (rows of W_q and W_k selected, nothing refit).
Since ‖C^{1/2}[:, i]‖² = (C^{1/2}·C^{1/2})_ii = C_ii, the score needs only the diagonals, and for a
bias-free projection q = W_q·x they come from the input correlation C_x: C_q,ii = w_iᵀ·C_x·w_i.

Rotary position embeddings (HF Llama's ``rotate_half`` convention) rotate dimension i together with
i + head_dim/2 by an angle that depends on the position, so a kept dimension must keep its partner:
the unit of selection is the *pair* p = (i, i + head_dim/2), scored by the sum of its two dimensions'
scores; under grouped-query attention one key head serves several query heads, which all keep the
key head's pairs, and the pair's score is summed over those query heads. Zeroed query and key
dimensions of a pair contribute exactly 0 to every logit whatever the rotation does (it mixes the two
zeros), so the kept model is exact given the kept rows; but the score ignores the rotation, so the
selection is approximate: it is MoDeGPT's bound on the logit error without rotary, where the
contribution q_{t,i}·k_{s,i} of a dimension becomes the rotated 2-D product of the pair.

The cost of dropping a set D of pairs (:func:`pair_costs`): zeroing the query dimensions of D alone
already removes their contribution to every logit (and so does zeroing the key ones alone), so it is
one perturbation of the logits, estimated from each side in the metric every other layer is
budgeted in — the (optionally output-weighted) squared error of that projection's outputs,
Σ_t Σ_{i∈D} f_i·q_{t,i}² = Σ_{i∈D} f_i·C_q,ii, with f the diagonal Fisher information of the
projection's outputs (a predicted loss increase, up to ½) — and the two estimates averaged. Additive
over pairs, so the curve along any order is a cumulative sum (:func:`dropped_pair_errors`).
"""

from __future__ import annotations

import torch

from ..errors import LowrankError


def projection_energies(weight: torch.Tensor, correlation: torch.Tensor) -> torch.Tensor:
    """(out,) diag(W·C·Wᵀ): each output's energy Σ_t (w_i·x_t)² on inputs whose correlation is C.

    Args:
        weight: (out, in) a bias-free projection W.
        correlation: (in, in) C = Σ_t x_t x_tᵀ of its inputs.

    Example:
        >>> w, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
        >>> bool(torch.allclose(projection_energies(w, x @ x.T), (w @ x).pow(2).sum(1)))
        True
    """
    w, c = weight.double(), correlation.double().to(weight.device)
    return ((w @ c) * w).sum(1).clamp(min=0)


def rotary_pairs(head_dim: int) -> torch.Tensor:
    """(head_dim/2, 2) the dimension pairs (i, i + head_dim/2) rotary embeddings rotate together.

    Example:
        >>> rotary_pairs(4).tolist()
        [[0, 2], [1, 3]]
    """
    if head_dim < 2 or head_dim % 2:
        raise LowrankError(f"rotary pairs need an even head dimension, got {head_dim}")
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1)


def cr_pair_scores(query_energies: torch.Tensor, key_energies: torch.Tensor) -> torch.Tensor:
    """(head_dim/2,) MoDeGPT's CR score of each rotary pair of one key head: Σ_j Σ_{i∈p} √(C_q_j,ii·C_k,ii),
    summed over the query heads j that read the key head.

    Args:
        query_energies: (G, head_dim) the diagonals C_q_j,ii of the G query heads (one row each).
        key_energies: (head_dim,) the diagonal C_k,ii of the key head.

    Example:
        >>> cr_pair_scores(torch.tensor([[1.0, 4.0, 9.0, 16.0]]), torch.ones(4)).tolist()  # pairs (0, 2), (1, 3)
        [4.0, 6.0]
    """
    if query_energies.dim() != 2 or query_energies.shape[1] != key_energies.shape[0]:
        raise LowrankError(f"query energies {list(query_energies.shape)} do not match key energies {list(key_energies.shape)}")
    per_dimension = (query_energies.double().clamp(min=0) * key_energies.double().clamp(min=0)).sqrt().sum(0)  # (d,)
    return per_dimension[rotary_pairs(per_dimension.shape[0])].sum(1)


def pair_costs(
    query_energies: torch.Tensor,
    key_energies: torch.Tensor,
    query_weights: torch.Tensor | None = None,
    key_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(head_dim/2,) the cost of dropping each rotary pair of one key head and its G query heads: the
    mean of the query side's Σ_j Σ_{i∈p} f_q_j,i·C_q_j,ii and the key side's Σ_{i∈p} f_k,i·C_k,ii
    (the module docstring says why the mean of two estimates of one perturbation).

    Args:
        query_energies: (G, head_dim) as :func:`cr_pair_scores`.
        key_energies: (head_dim,).
        query_weights / key_weights: the same shapes, each output's weight f (Fisher), or ``None`` for 1.

    Example:
        >>> pair_costs(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([5.0, 0.0, 1.0, 0.0])).tolist()
        [5.0, 3.0]
    """
    query = query_energies.double() * (1.0 if query_weights is None else query_weights.double())
    key = key_energies.double() * (1.0 if key_weights is None else key_weights.double())
    pairs = rotary_pairs(key.shape[0])
    return 0.5 * (query.sum(0)[pairs].sum(1) + key[pairs].sum(1))


def pair_order(scores: torch.Tensor) -> torch.Tensor:
    """The pairs by decreasing score (ties by index): keep the first k.

    Example:
        >>> pair_order(torch.tensor([1.0, 3.0, 2.0])).tolist()
        [1, 2, 0]
    """
    return torch.sort(scores, descending=True, stable=True).indices


def dropped_pair_errors(costs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(pairs + 1,) the summed cost of the pairs dropped when the first k of ``order`` are kept, k = 0 … pairs.

    Example:
        >>> dropped_pair_errors(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2, 0, 1])).tolist()
        [7.0, 3.0, 2.0, 0.0]
    """
    ordered = costs.double()[order]
    tail = ordered.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def kept_dimensions(order: torch.Tensor, kept: int, head_dim: int) -> torch.Tensor:
    """(2·kept,) the head dimensions of the first ``kept`` pairs of ``order``, ascending.

    Example:
        >>> kept_dimensions(torch.tensor([1, 0]), 1, 4).tolist()
        [1, 3]
    """
    pairs = rotary_pairs(head_dim)
    if not 0 <= kept <= pairs.shape[0]:
        raise LowrankError(f"a head of dimension {head_dim} can keep 0 … {pairs.shape[0]} rotary pairs, not {kept}")
    return pairs[order[:kept].cpu()].flatten().sort().values


__all__ = ["cr_pair_scores", "dropped_pair_errors", "kept_dimensions", "pair_costs", "pair_order", "projection_energies", "rotary_pairs"]
