"""``dictionary``: every output row of W is a sparse combination of a few atoms of a learned dictionary.

W (out × in) ≈ Codes·Atoms, Atoms dense (k × in), Codes (out × k) with s non-zeros per row.

Why rows (the transposed form of W ≈ D·C with column-sparse C): the data-aware error is
‖(W − W′)X‖²_F = ‖(W − W′)·C^{1/2}‖²_F with C = XᵀX acting on the input side. Whitening the
atoms, Codes·Atoms·C^{1/2} = Codes·(Atoms·C^{1/2}), leaves the codes untouched, so the codes can
be learned in the whitened space and stay sparse in the original one: dictionary learning on the
rows of W·C^{1/2} minimizes exactly the layer's output error on the calibration data. (Sparse codes
on the input side would be mixed by C^{1/2} and lose their sparsity.) Without statistics the
Frobenius error of W is minimized.

Budget: a plan's rank r buys r·(out + in) values of the model dtype, in bytes. The codes cost
out·s·(value + index) bytes, the index being int16 when k ≤ 32768 (else int32); the atoms get the
rest: k = floor((budget − codes) / (in·value)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors, truncated_svd
from ..linalg.omp import orthogonal_matching_pursuit
from ..nn import DictionaryLinear
from ..nn.dictionary_linear import DictionaryFactors
from .registry import Method, register_method
from .structured import build_with_fallback

log = logging.getLogger(__name__)

# Relative ridge of the least-squares dictionary update (atoms no row uses are re-seeded instead).
RIDGE = 1e-10


@dataclass
class DictionaryConfig:
    """Options of sparse dictionary factorization.

    Attributes:
        nonzeros: atoms per output row, s. Below 1: a fraction of the plan's rank (s = round(nonzeros·r));
            from 1: the count itself.
        iterations: alternations of sparse coding (orthogonal matching pursuit) and least-squares
            dictionary update.
        precision: ``"float64"`` or ``"float32"``, the dtype the decomposition runs in.

    Example:
        >>> DictionaryConfig(nonzeros=16).nonzeros
        16
    """

    version: int = 1
    nonzeros: float = 0.5
    iterations: int = 5
    precision: str = "float64"


def dictionary_shape(out_features: int, in_features: int, rank: int, nonzeros: float, value_bytes: int) -> tuple[int, int]:
    """(atoms k, non-zeros per row s) that fit the byte budget of ``rank``·(out + in) values; (0, 0) if none do.

    Example:
        >>> dictionary_shape(256, 256, 64, 0.5, value_bytes=4)  # s = 32 codes of 6 bytes per row
        (80, 32)
    """
    budget = rank * (out_features + in_features) * value_bytes
    count = int(nonzeros) if nonzeros >= 1 else max(1, round(nonzeros * rank))
    for index_bytes in (2, 4):
        num_atoms = (budget - out_features * count * (value_bytes + index_bytes)) // (in_features * value_bytes)
        if num_atoms <= 2**15:
            break
    if num_atoms < 1:
        return 0, 0
    return num_atoms, min(count, num_atoms)


def initial_atoms(target: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """The top right singular vectors of ``target``; beyond its rank, its largest rows (normalized)."""
    vh = torch.linalg.svd(target, full_matrices=False).Vh
    atoms = vh[:num_atoms]
    if num_atoms > atoms.shape[0]:
        norms = target.norm(dim=1)
        extra = norms.topk(min(num_atoms - atoms.shape[0], target.shape[0])).indices
        atoms = torch.cat([atoms, target[extra] / norms[extra, None].clamp(min=torch.finfo(target.dtype).tiny)])
    if num_atoms > atoms.shape[0]:  # more atoms than rows and columns: repeat (the update moves them apart)
        atoms = atoms.repeat(math.ceil(num_atoms / atoms.shape[0]), 1)[:num_atoms]
    return atoms


def update_atoms(target: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Least-squares atoms for fixed codes; atoms no row uses are re-seeded with the worst-fit rows."""
    gram = codes.T @ codes
    ridge = RIDGE * gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny)
    atoms = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), codes.T @ target)
    unused = (codes != 0).sum(dim=0) == 0
    if unused.any():
        residual = target - codes @ atoms
        norms = residual.norm(dim=1)
        worst = norms.topk(min(int(unused.sum()), target.shape[0])).indices
        seeds = residual[worst] / norms[worst, None].clamp(min=torch.finfo(target.dtype).tiny)
        slots = unused.nonzero().flatten()[: worst.numel()]
        atoms[slots] = seeds
    return atoms


def learn_dictionary(target: torch.Tensor, num_atoms: int, nonzeros: int, iterations: int) -> DictionaryFactors:
    """Alternate orthogonal matching pursuit and least-squares atoms on the rows of ``target``; keep the best fit.

    Example:
        >>> w = torch.randn(16, 8, dtype=torch.float64)
        >>> f = learn_dictionary(w, num_atoms=8, nonzeros=8, iterations=1)  # dense codes, complete atoms
        >>> torch.allclose(f.dense(), w)
        True
    """
    atoms = initial_atoms(target, num_atoms)
    best, best_error = None, math.inf
    for step in range(iterations + 1):
        indices, values = orthogonal_matching_pursuit(target, atoms, nonzeros)
        factors = DictionaryFactors(atoms=atoms, indices=indices, values=values)
        codes = factors.codes()
        error = (target - codes @ atoms).pow(2).sum().item()
        if error < best_error:
            best, best_error = factors, error
        if step < iterations:
            atoms = update_atoms(target, codes)
    return best


def factorize(
    weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: DictionaryConfig, name: str = ""
) -> DictionaryFactors | LowRankFactors:
    """Learn Codes·Atoms for W (on W·C^{1/2} when statistics are given), within the budget of ``rank``.

    Atoms start from the SVD; then ``iterations`` rounds of OMP coding and least-squares atoms. If
    the result is not better (in the error minimized) than the rank-r SVD (whitened when statistics
    are given) at the same budget, that SVD is returned instead, built as a plain ``LowRankLinear``.

    Args:
        weight: (out, in) matrix.
        statistics: calibration statistics of the layer's input, or ``None`` (Frobenius error).
        rank: the plan's rank, i.e. a budget of rank·(out + in) values.
        config: the method's options.
        name: layer name for messages.

    Example:
        >>> f = factorize(torch.randn(32, 16), None, 12, DictionaryConfig(nonzeros=4))
        >>> f.dense().shape
        torch.Size([32, 16])
    """
    if config.nonzeros <= 0 or config.iterations < 0:
        raise LowrankError(f"dictionary needs nonzeros > 0 and iterations ≥ 0, got {config.nonzeros} and {config.iterations}")
    dtype = getattr(torch, config.precision)
    out_features, in_features = weight.shape
    white = None
    if statistics is not None:
        white = statistics.whitening(0.0, dtype, symmetric=True, name=name)
    target = weight.to(dtype) @ white.root if white is not None else weight.to(dtype)

    baseline = truncated_svd(target, min(rank, out_features, in_features), dtype=dtype)
    baseline_error = (target - baseline.dense()).pow(2).sum().item()
    if white is not None:
        baseline = LowRankFactors(up=baseline.up, down=baseline.down @ white.inverse_root)
    num_atoms, nonzeros = dictionary_shape(out_features, in_features, rank, config.nonzeros, weight.element_size())
    if num_atoms < 1:
        return baseline
    factors = learn_dictionary(target, num_atoms, nonzeros, config.iterations)
    if (target - factors.dense()).pow(2).sum().item() >= baseline_error:
        log.info("dictionary: %s keeps the rank-%d SVD (the dictionary fit was not better)", name or "a layer", rank)
        return baseline
    if white is not None:
        factors = DictionaryFactors(atoms=factors.atoms @ white.inverse_root, indices=factors.indices, values=factors.values)
    return factors


build = build_with_fallback(DictionaryLinear)


register_method(
    Method(
        name="dictionary",
        config_class=DictionaryConfig,
        factorize=factorize,
        build=build,
        needs_statistics=False,
        nested=False,
        description="W ≈ Codes·Atoms, s atoms per output row, by OMP + least squares (on W·C^½ with --calib)",
    )
)
