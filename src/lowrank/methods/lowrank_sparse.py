"""``lowrank-sparse``: W ≈ A·B + S, a low-rank part plus the largest entries of what it misses.

The budget of a plan's rank r is the storage of r·(out + in) values of the model's dtype,
counted in bytes. It is split between a smaller rank r′ and k sparse entries; each sparse entry
costs its value plus its column index (int16 when in ≤ 32768, else int32), and the CSR row
pointers cost 4·(out + 1) bytes. So a float32 entry costs 6 bytes (1.5 values), a bfloat16 entry
4 bytes (2 values).

With ``sparse_choices`` (e.g. ``--option sparse_choices=0,0.25,0.5``) ``--allocate global`` chooses
each layer's sparse share together with its budget, from each candidate's predicted loss
(:mod:`lowrank.allocation.sparse_choices`); share 0 is the plain low-rank fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..nn import LowRankPlusSparseLinear
from ..nn.lowrank_sparse_linear import LowRankSparseFactors, index_dtype
from .registry import Method, choices_plan, register_method
from .structured import BestFit, build_with_fallback, residual_fit

ROW_POINTER_BYTES = 4


@dataclass
class LowRankPlusSparseConfig:
    """Options of the low-rank plus sparse factorization.

    Attributes:
        sparse_fraction: share of each layer's byte budget given to the sparse part (the rest buys
            rank r′ = floor(r·(1 − sparse_fraction)), the sparse part gets what is left).
        iterations: alternations between the low-rank fit of W − S and the selection of S.
        weighted_selection: score residual entries by |ΔW_ij|·sqrt(C_jj), C = XᵀX (needs --calib),
            so entries on busy input channels are kept first.
        whiten: fit the low-rank part by whitened SVD, minimizing the output error (needs --calib).
        precision: ``"float64"`` or ``"float32"``, the dtype the decomposition runs in.
        sparse_choices: sparse shares separated by commas or slashes (e.g. ``"0,0.25,0.5"``), each in
            [0, 1), that ``--allocate global`` chooses from per layer, together with its budget
            (:mod:`lowrank.allocation.sparse_choices`); 0 is the plain low-rank fit. Empty: every
            layer gets ``sparse_fraction``.

    Example:
        >>> LowRankPlusSparseConfig(sparse_fraction=0.2).iterations
        5
        >>> LowRankPlusSparseConfig(sparse_choices="0/0.25,0.5").choices
        (0.0, 0.25, 0.5)
    """

    version: int = 1
    sparse_fraction: float = 0.25
    iterations: int = 5
    weighted_selection: bool = False
    whiten: bool = False
    precision: str = "float64"
    sparse_choices: str = ""

    def __post_init__(self) -> None:
        try:
            choices = self.choices
        except ValueError:
            choices = ()
        if self.sparse_choices.strip() and (not choices or any(not 0.0 <= share < 1.0 for share in choices)):
            raise LowrankError(
                f"lowrank-sparse option sparse_choices must list shares in [0, 1) separated by commas or slashes (e.g. 0,0.25,0.5), got {self.sparse_choices!r}"
            )

    @property
    def choices(self) -> tuple[float, ...]:
        """The shares of ``sparse_choices``, ascending (empty: none)."""
        return tuple(sorted({float(part) for part in re.split(r"[,/\s]+", self.sparse_choices) if part}))


def split_budget(out_features: int, in_features: int, rank: int, sparse_fraction: float, value_bytes: int) -> tuple[int, int]:
    """(rank r′, sparse entries k) that fit the byte budget of ``rank``·(out + in) values.

    Example:
        >>> split_budget(256, 256, 64, 0.25, value_bytes=4)  # float32: 6 bytes per sparse entry
        (48, 5290)
    """
    budget = rank * (out_features + in_features) * value_bytes
    entry = value_bytes + torch.iinfo(index_dtype(in_features)).bits // 8
    pointers = ROW_POINTER_BYTES * (out_features + 1)
    lowrank_rank = min(math.floor(rank * (1 - sparse_fraction)), min(out_features, in_features))
    while lowrank_rank >= 1:
        num_nonzero = (budget - lowrank_rank * (out_features + in_features) * value_bytes - pointers) // entry
        if num_nonzero >= 1:
            return lowrank_rank, min(num_nonzero, out_features * in_features)
        lowrank_rank -= 1
    return 0, 0


def factorize(
    weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: LowRankPlusSparseConfig, name: str = ""
) -> LowRankSparseFactors | LowRankFactors:
    """Alternate A·B = best rank-r′ fit of W − S and S = the k largest entries of W − A·B.

    Starting from S = 0, each step is optimal given the other, so in Frobenius norm the error never
    grows. ``sparse_fraction`` 0 is the plain low-rank fit (no sparse part). The best iterate (by Frobenius error, or output error when statistics are used) is
    returned; if it is not better than the rank-r low-rank fit at the same budget, that fit is
    returned instead (as :class:`LowRankFactors`, built into a plain ``LowRankLinear``), so this
    method is never worse than ``svd`` (or ``whiten`` with ``whiten=true``).

    Args:
        weight: (out, in) matrix.
        statistics: calibration statistics, used by ``weighted_selection`` and ``whiten``.
        rank: the plan's rank, i.e. a budget of rank·(out + in) values.
        config: the method's options.
        name: layer name for messages.

    Example:
        >>> w = torch.randn(32, 32); w[3, 5] = 50.0  # one outlier spoils plain SVD
        >>> f = factorize(w, None, 8, LowRankPlusSparseConfig())
        >>> type(f).__name__, bool(f.dense()[3, 5].item() > 49)
        ('LowRankSparseFactors', True)
    """
    uses_statistics = config.whiten or config.weighted_selection
    if uses_statistics and statistics is None:
        raise LowrankError("lowrank-sparse with whiten or weighted_selection needs calibration statistics; pass --calib FILE")
    if not 0.0 <= config.sparse_fraction < 1.0:
        raise LowrankError(f"sparse_fraction must be in [0, 1), got {config.sparse_fraction}")
    fit = residual_fit(weight, statistics, config.precision, uses_statistics, name, whitened_fit=config.whiten)
    target = fit.target
    out_features, in_features = target.shape

    best = BestFit.plain(fit, rank)
    lowrank_rank, num_nonzero = split_budget(out_features, in_features, rank, config.sparse_fraction, weight.element_size())
    if lowrank_rank < 1 or config.sparse_fraction == 0.0:
        return best.factors
    channel_weight = statistics.xtx.diagonal().to(device=target.device, dtype=target.dtype).sqrt() if config.weighted_selection else None
    sparse = torch.zeros_like(target)
    for _ in range(max(1, config.iterations)):
        low = fit.factors(target - sparse, lowrank_rank)
        residual = target - low.dense()
        score = residual.abs() * channel_weight if channel_weight is not None else residual.abs()
        flat = score.flatten().topk(num_nonzero).indices
        rows, cols = flat // in_features, flat % in_features
        candidate = LowRankSparseFactors(up=low.up, down=low.down, rows=rows, cols=cols, values=residual[rows, cols])
        sparse = candidate.sparse_dense()
        best.offer(candidate, fit.error(low.dense() + sparse))
    return best.result("lowrank-sparse", name, rank, "sparse split")


build = build_with_fallback(LowRankPlusSparseLinear)


def _sparse_plan():
    from ..allocation.sparse_choices import sparse_plan

    return sparse_plan


plan = choices_plan("lowrank-sparse", LowRankPlusSparseConfig, "sparse_choices", _sparse_plan)


register_method(
    Method(
        name="lowrank-sparse",
        config_class=LowRankPlusSparseConfig,
        factorize=factorize,
        build=build,
        needs_statistics=False,
        nested=False,
        description="W ≈ A·B + S with S the largest entries of the residual (RPCA-style; never worse than svd)",
        plan=plan,
    )
)
