"""Shrinking an attention head's value dimension: the best rank-k value→output map in the
calibration metric (MoDeGPT, Lin et al. 2024, type III).

Why the map is linear per head. Query head j reads the value head g it shares with the other query
heads of its group (grouped-query attention: one key/value head serves ``heads / kv_heads`` query
heads). Its attention output at token t is z_{j,t} = Σ_s a_{j,ts}·V_g·x_s, where V_g (d_h × in) are
v_proj's rows of head g and a_{j,ts} the softmax weights: one scalar per token pair, the same for
every value dimension. o_proj adds O_j·z_{j,t} (O_j: its d_h columns of query head j), so the block
output depends on head g only through the products O_j·V_g (out × in), mixed over tokens by
weights that do not see the value dimension. Replacing V_g by P (k × in) and every O_j by O'_j
(out × k) shrinks the head dimension of the value path to k.

The objective, as MoDeGPT measures it: the error of the products on v_proj's calibration inputs x_t
(token by token, before the attention mix, which is a convex combination of those tokens), with
o_proj's outputs weighted by D = diag(√Fisher) when the loss should decide (D = I otherwise)::

    E(P, O') = Σ_j Σ_t ‖D·(O_j·V_g − O'_j·P)·x_t‖² = ‖D̃·(M − M')·S‖²_F

with the group's products stacked, M = [O_1; …; O_G]·V_g (G·out × in), M' = [O'_1; …; O'_G]·P of
rank ≤ k, D̃ = diag(D, …, D) and S any root of C = Σ_t x_t x_tᵀ (S·Sᵀ = C). Every rank-k M' is such
a product, so by Eckart–Young the optimum is M' = D̃⁻¹·(D̃·M·S)_k·S⁻¹ with error Σ_{i>k} σ_i², the
σ_i the singular values of D̃·M·S.

Computed without forming M or inverting S: the thin QR factorization D̃·[O_1; …; O_G] = Q·R
(Q: G·out × d_h with orthonormal columns) gives D̃·M·S = Q·(R·V_g·S), whose singular values are
those of the small d_h × in matrix R·V_g·S = U·Σ·Wᵀ, with left singular vectors Q·U. Then
(D̃·M·S)_k = Q·U_k·U_kᵀ·(R·V_g·S), hence

    O'_stack = D̃⁻¹·Q·U_k,   P = U_kᵀ·R·V_g,

and S⁻¹ cancels (C may be singular). A scalar moves between P and O' (P·s, O'/s) so that P's
entries keep the size of V_g's: the product is unchanged, and no fp16/bf16 value over- or
underflows because Fisher weights are tiny.

Everything runs in float64; the caller casts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowrankError


@dataclass
class ValueOutputFactors:
    """One key/value head's reduced value path: P (k × in) replaces V_g, ``outputs`` (G·out × k) the
    stacked O'_j of its G query heads (rows j·out … (j+1)·out − 1 for the j-th)."""

    value: torch.Tensor
    outputs: torch.Tensor


@dataclass
class ValueOutputDecomposition:
    """The SVD of one head's whitened, weighted value→output map D̃·M·S (see the module docstring).

    Attributes:
        q: (G·out, d_h) orthonormal columns, D̃·O_stack = q·r.
        r: (d_h, d_h).
        left: (d_h, d_h) left singular vectors U of r·V_g·S (columns by decreasing σ).
        energies: (d_h,) σ_i², decreasing (zeros past the rank of the map).
    """

    q: torch.Tensor
    r: torch.Tensor
    left: torch.Tensor
    energies: torch.Tensor
    value: torch.Tensor
    row_weights: torch.Tensor | None

    def errors(self) -> torch.Tensor:
        """(d_h + 1,) E at k = 0 … d_h: Σ_{i ≥ k} σ_i², ending at 0."""
        tails = self.energies.flip(0).cumsum(0).flip(0)
        return torch.cat([tails, tails.new_zeros(1)])

    def factors(self, kept: int) -> ValueOutputFactors:
        """The optimal rank-``kept`` P and O' (the module docstring's closed form)."""
        head_dim = self.r.shape[0]
        if not 0 <= kept <= head_dim:
            raise LowrankError(f"a head of dimension {head_dim} can keep 0 … {head_dim} value dimensions, not {kept}")
        basis = self.left[:, :kept]  # (d_h, k)
        value = basis.T @ self.r @ self.value  # (k, in)
        outputs = self.q @ basis  # (G·out, k)
        if self.row_weights is not None:
            outputs = outputs / self.row_weights.repeat(outputs.shape[0] // self.row_weights.shape[0])[:, None]
        scale = self.value.pow(2).mean().sqrt() / value.pow(2).mean().sqrt().clamp(min=torch.finfo(value.dtype).tiny)
        if kept == 0 or not torch.isfinite(scale) or scale == 0:
            scale = torch.ones((), dtype=value.dtype)
        return ValueOutputFactors(value * scale, outputs / scale)


def value_output_decomposition(
    outputs: torch.Tensor, value: torch.Tensor, root: torch.Tensor, row_weights: torch.Tensor | None = None
) -> ValueOutputDecomposition:
    """The decomposition behind the best rank-k value→output map of one key/value head.

    Args:
        outputs: (G·out, d_h) the o_proj columns of the head's G query heads, stacked (query head by
            query head).
        value: (d_h, in) the head's v_proj rows V_g.
        root: (in, in) S with S·Sᵀ = C, the correlation of v_proj's calibration inputs (any root:
            Cholesky or symmetric; :meth:`LayerStatistics.whitening`'s ``root``).
        row_weights: (out,) positive weights of o_proj's outputs (√Fisher), or ``None`` for equal ones.

    Returns:
        A :class:`ValueOutputDecomposition`: ``errors()`` at every k, ``factors(k)`` the optimum.

    Example:
        >>> o, v = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> d = value_output_decomposition(o, v, torch.eye(5, dtype=torch.float64))
        >>> f = d.factors(2)
        >>> bool(torch.isclose(((o @ v - f.outputs @ f.value) ** 2).sum(), d.errors()[2]))
        True
    """
    o, v, s = outputs.double(), value.double(), root.double()
    if o.shape[1] != v.shape[0] or v.shape[1] != s.shape[0]:
        raise LowrankError(f"value→output shapes do not chain: outputs {list(o.shape)}, value {list(v.shape)}, root {list(s.shape)}")
    weights = None
    if row_weights is not None:
        weights = row_weights.double().to(o.device)
        if o.shape[0] % weights.shape[0] != 0:
            raise LowrankError(f"{weights.shape[0]} output weights do not divide the {o.shape[0]} stacked o_proj rows")
        o = o * weights.repeat(o.shape[0] // weights.shape[0])[:, None]
    q, r = torch.linalg.qr(o)  # (G·out, d_h), (d_h, d_h); G·out ≥ d_h for every real attention
    head_dim = v.shape[0]
    # Fewer inputs than head dimensions: the full U (the extra columns carry zero energy).
    left, singular, _ = torch.linalg.svd(r @ v @ s, full_matrices=v.shape[1] < head_dim)  # U: (d_h, d_h)
    energies = torch.zeros(head_dim, dtype=torch.float64, device=singular.device)
    energies[: singular.shape[0]] = singular.pow(2)
    return ValueOutputDecomposition(q, r, left, energies, v, weights)


# o_proj's metric: what the attention really hands o_proj.
#
# P_g = T_g·V_g (T_g: k × d_h, rows in V_g's row space, as the closed form above also gives) makes
# query head j's new attention output T_g·z_{j,t}, z_{j,t} = Σ_s a_{j,ts}·V_g·x_s its old one,
# exactly: the mix is linear and leaves the value dimension alone. With T̂ = blockdiag(T_{g(j)}) over
# the query heads, o_proj's new input is T̂·z_t and the block's output error is
#
#     E(T̂, O') = Σ_t ‖D·(O − O'·T̂)·z_t‖² = tr(D·(O − O'·T̂)·C·(O − O'·T̂)ᵀ·D),
#
# C = Σ_t z_t z_tᵀ o_proj's input correlation (which calibration already holds). Given T̂ the best O'
# is a least-squares fit, O' = O·C·T̂ᵀ·(T̂·C·T̂ᵀ)⁺ (row by row, so D does not change it), with error
# tr(D·O·C·Oᵀ·D) − tr(D·O·C·T̂ᵀ·(T̂·C·T̂ᵀ)⁺·T̂·C·Oᵀ·D): exact, cross-head correlations included (the
# analogue of type I's down_proj refit). The T_g themselves have no joint closed form; each is taken
# from its own heads, ignoring the others: with one query head per key/value head, Eckart–Young on
# D·O_j·S_j (S_j·S_jᵀ = C_jj, the head's diagonal block) gives T = U_kᵀ·D·O_j from the left singular
# vectors U; a group of query heads sharing T_g uses their pooled block C̄ = Σ_j C_jj,
# T_g = U_kᵀ·D̃·O_stack from the SVD of D̃·O_stack·S̄ (exact when their blocks agree).


def mixed_value_basis(outputs: list[torch.Tensor], correlations: list[torch.Tensor], row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(d_h, d_h) the rows of T_g in order (keep the first k) for one key/value head, in o_proj's metric.

    Args:
        outputs: per query head of the group, its (out, d_h) o_proj columns O_j.
        correlations: per query head, its (d_h, d_h) diagonal block C_jj of o_proj's input correlation.
        row_weights: (out,) positive weights of o_proj's outputs (√Fisher), or ``None``.

    Example:
        >>> o, z = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
        >>> t = mixed_value_basis([o], [z @ z.T])[:2]
        >>> refit = refit_output(o, z @ z.T, [t])
        >>> best = torch.linalg.svdvals(o @ z)[2:].pow(2).sum()  # Eckart–Young on O·Z
        >>> bool(torch.isclose(torch.tensor(refit[1], dtype=torch.float64), best))
        True
    """
    weights = None if row_weights is None else row_weights.double().to(outputs[0].device)
    stacked = torch.cat([block.double() if weights is None else weights[:, None] * block.double() for block in outputs])  # D̃·O_stack
    eigenvalues, eigenvectors = torch.linalg.eigh(sum(block.double() for block in correlations))
    root = eigenvectors * eigenvalues.clamp(min=0).sqrt()  # S̄ with S̄·S̄ᵀ = C̄ (C̄ may be singular)
    left = torch.linalg.svd(stacked @ root, full_matrices=False).U  # (G·out, d_h)
    return left.T @ stacked


def refit_output(
    output: torch.Tensor, correlation: torch.Tensor, reductions: list[torch.Tensor], row_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """O' = O·C·T̂ᵀ·(T̂·C·T̂ᵀ)⁺ and its exact error E (see the comment above).

    Args:
        output: (out, H·d_h) o_proj's weight O.
        correlation: (H·d_h, H·d_h) o_proj's input correlation C.
        reductions: per query head, its (k, d_h) T (the T_g of the key/value head it reads).
        row_weights: (out,) D, or ``None``.

    Returns:
        (O' (out, H·k) float64, E).
    """
    o, c = output.double(), correlation.double()
    t = torch.block_diag(*[block.double() for block in reductions])  # (H·k, H·d_h)
    weighted = o if row_weights is None else row_weights.double()[:, None] * o
    total = (weighted @ c * weighted).sum()
    if t.shape[0] == 0:
        return o.new_zeros(o.shape[0], 0), total.clamp(min=0).item()
    cross = c @ t.T  # (H·d_h, H·k)
    gram = t @ cross  # T̂·C·T̂ᵀ
    inverse = torch.linalg.pinv(gram, hermitian=True)  # T̂·C·T̂ᵀ is singular where C is (dead heads, few tokens)
    new = o @ cross @ inverse
    captured = ((weighted @ cross) @ inverse * (weighted @ cross)).sum()
    return new, (total - captured).clamp(min=0).item()


def nested_output_errors(
    output: torch.Tensor, correlation: torch.Tensor, bases: list[torch.Tensor], row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(d_h + 1,) :func:`refit_output`'s error E at k = 0 … d_h, every head keeping the first k rows
    of its basis, from one Cholesky factorization instead of d_h + 1 refits.

    Why one factorization serves every k. The error depends on T̂ only through its row span (a
    scale per head, as :class:`~lowrank.methods.modegpt_attention.OutputMetricReduction` applies,
    changes nothing), and the spans are nested: order the rows of the full T̂ by their index within
    the head first, then by head, and T̂ at k is the first H·k rows. With G = T̂·C·T̂ᵀ = L·Lᵀ in that
    order and B = T̂·C·Oᵀ·D, the captured energy tr(Bᵀ·G⁺·B) of the first m rows is the squared norm
    of the first m rows of L⁻¹·B (a leading block of a Cholesky factor is the factor of the leading
    block). G is damped by 10⁻¹² of its mean diagonal, so directions C does not see (dead heads)
    capture nothing, as the pseudo-inverse has them.

    Args:
        output: (out, H·d_h) o_proj's weight O.
        correlation: (H·d_h, H·d_h) o_proj's input correlation C.
        bases: per query head, its (d_h, d_h) basis (rows in the order they are kept).
        row_weights: (out,) D, or ``None``.

    Example:
        >>> o, z = torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 20, dtype=torch.float64)
        >>> bases = [torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] for _ in range(2)]
        >>> errors = nested_output_errors(o, z @ z.T, bases)
        >>> bool(torch.isclose(errors[2], torch.tensor(refit_output(o, z @ z.T, [b[:2] for b in bases])[1], dtype=torch.float64)))
        True
    """
    o, c = output.double(), correlation.double()
    heads, head_dim = len(bases), bases[0].shape[1]
    weighted = o if row_weights is None else row_weights.double()[:, None] * o
    total = (weighted @ c * weighted).sum().clamp(min=0)
    t = torch.block_diag(*[basis.double() for basis in bases])  # (H·d_h, H·d_h), rows head by head
    order = torch.arange(heads * head_dim, device=t.device).view(heads, head_dim).T.reshape(-1)  # row i of every head, then i + 1
    t = t[order]
    cross = t @ c  # T̂·C
    gram = cross @ t.T
    gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * (1e-12 * gram.diagonal().mean().clamp(min=1e-300))
    factor, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:  # not positive definite even damped (non-finite statistics): refit every k
        return torch.tensor([refit_output(output, correlation, [b[:k] for b in bases], row_weights)[1] for k in range(head_dim + 1)], dtype=torch.float64)
    solved = torch.linalg.solve_triangular(factor, cross @ weighted.T, upper=False)  # L⁻¹·B, (H·d_h, out)
    captured = torch.cat([solved.new_zeros(1), solved.pow(2).sum(dim=1).view(head_dim, heads).sum(dim=1).cumsum(0)])
    return (total - captured).clamp(min=0)
