"""Randomized SVD (Halko, Martinsson & Tropp 2011): the top singular triplets of a big matrix fast.

Cost O(m·n·(r + p)·(2q + 1)) instead of O(m·n·min(m, n)) for the exact SVD, with r the rank,
p the oversampling and q the number of power iterations.
"""

from __future__ import annotations

import torch


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    power_iterations: int = 4,
    oversample: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` SVD: ``(u (m, r), s (r,), vh (r, n))``, largest first.

    A Gaussian sketch Y = M Ω captures the range of M; ``power_iterations`` rounds of
    Y ← M (Mᵀ Y), each re-orthonormalized, raise the spectrum to the power 2q + 1 so the
    top directions dominate the tail. The small SVD of Qᵀ M then gives the triplets.

    Args:
        matrix: (m, n) matrix.
        rank: triplets to return (≤ min(m, n)).
        power_iterations: q; 0 is a plain sketch, 4 is near exact on trained weights.
        oversample: p extra sketch columns, which make the top-r subspace more accurate.
        seed: seed of the Gaussian sketch.
        dtype: precision of the computation.
        generator: draw the sketch from this generator instead (``seed`` is then unused), so a
            caller that refreshes a basis many times (GaLore) continues one random stream.

    Example:
        >>> m = torch.randn(200, 8) @ torch.randn(8, 100)
        >>> u, s, vh = randomized_svd(m, 8)
        >>> torch.allclose((u * s) @ vh, m.double(), atol=1e-4)
        True
    """
    assert matrix.ndim == 2 and 1 <= rank <= min(matrix.shape), f"rank {rank} out of range for {tuple(matrix.shape)}"
    m = matrix.to(dtype)
    width = min(rank + oversample, min(m.shape))
    if generator is None:
        generator = torch.Generator(device=m.device).manual_seed(seed)
    sketch = torch.randn(m.shape[1], width, generator=generator, dtype=dtype, device=generator.device).to(m.device)
    basis, _ = torch.linalg.qr(m @ sketch)  # (m, width)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(m.T @ basis)  # (n, width)
        basis, _ = torch.linalg.qr(m @ basis)  # (m, width)
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]
