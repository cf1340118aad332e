"""One layer's compensation: base-compress W, then add the EoRA correction of the error.

The result has the structures lowrank already stores and runs: a quantized base plus correction
is W ≈ up·down + Q, a :class:`~lowrank.nn.LowRankQuantLinear` (packed codes, int4 kernel on CPU);
a pruned base plus correction is W ≈ up·down + S, a :class:`~lowrank.nn.LowRankPlusSparseLinear`.
With ``factor_bits`` (EoRA's quantized correction) the factors are group-quantized too, a
:class:`~lowrank.nn.quantized_factors.QuantizedCorrectionLinear` (:func:`quantize_correction`).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..linalg.gptq import DEFAULT_DAMP
from ..linalg.quantize import quantize_groups
from ..linalg.whiten import output_error
from ..nn import LowRankPlusSparseLinear, LowRankQuantLinear
from ..nn.lowrank_quant_linear import LowRankQuantFactors
from ..nn.lowrank_sparse_linear import LowRankSparseFactors
from ..nn.quantized_factors import QuantizedCorrectionFactors, QuantizedCorrectionLinear
from .base import BaseSpec, CompressedBase, compress_base
from .eora import correction, output_weights, weighted_output_error
from .orders import alternate, lowrank_first

log = logging.getLogger(__name__)


@dataclass
class CompensateConfig:
    """Options of compensation (``lowrank compensate``; the method ``compensate``).

    Attributes:
        base: the base compressor, e.g. ``gptq:4``, ``rtn:3``, ``wanda:0.5``, ``wanda:2:4``
            (see :mod:`lowrank.compensate.base`).
        group_size: input columns sharing one quantization scale and zero point.
        gptq_damp: GPTQ's damping of XᵀX, relative to its mean diagonal.
        damp: damping of XᵀX for the correction's whitening (0: only when singular).
        iterations: alternations after the first correction, each re-compressing W − L with the base
            compressor and refitting L to W − B (LQ-LoRA's W ≈ Q + L₁L₂); the pair with the least
            calibration output error is kept, so never worse than plain EoRA (``0``).
        lowrank_first: also try the other order (SVDQuant's, :func:`lowrank.compensate.orders.lowrank_first`,
            the step ``lowrank-quant``'s orders take too): L first, the whitened rank-r fit of W
            itself, then the base compresses only W − L (whose range the low-rank part has
            shrunk), then L is refit to W − B; with ``iterations`` it alternates likewise. The
            better of the two orders is kept, so still never worse than plain EoRA.
        precision: ``"float64"`` or ``"float32"``, the dtype the computation runs in.
        factor_bits: store the correction's factors group-quantized at this many bits (2..8, e.g. 4
            as EoRA does; quantized bases only) instead of in the model dtype, so a storage budget
            buys about 16 / (factor_bits + (16 + factor_bits) / factor_group_size) times the
            rank of bfloat16 factors (3.7× at 4 bits in groups of 64).
            ``None``: factors in the model dtype.
        factor_group_size: values of one factor row (one rank component of ``down`` along the
            input, of ``up`` along the output) sharing a scale and zero point; default ``group_size``.
        fisher_weighted: fit the correction to the layer's loss rather than its output error:
            minimize Σ_o f_o‖(ΔW − L)_o X‖² with f the output Fisher E[(∂L/∂y_o)²] of the
            calibration gradients (the two-sided weighted SVD, :func:`lowrank.compensate.eora.correction`),
            choose among candidates (orders, alternations, quantized factors) by that weighted
            error, and allocate a ``budget`` by its spectrum. A candidate whose *unweighted* output
            error would exceed the base's is never kept (the layer falls back to plain EoRA, or to a
            lower rank with quantized factors). Needs statistics with output gradients.
        bit_choices: base bit widths a ``budget`` may give each layer, besides the base's own, separated
            by commas (e.g. ``"4"`` or ``"2,4"`` with ``rtn:3``; quantized bases only): the allocator
            picks every layer's (bits, correction rank) pair at once (:func:`lowrank.compensate.compensation_ranks`),
            paying a wider base's extra bits from the same budget (a narrower one frees bits), so
            the budget is extra storage over the base at its own width in every layer.
            The guarantee that a correction never raises a layer's calibration output error holds
            against the base the layer got: a layer given a narrower base can end with more error
            than the base's own width would have had (that is the trade the predicted loss chose).
            ``""``: every layer keeps the base's width.

    Example:
        >>> CompensateConfig(base="rtn:3").spec.bits
        3
        >>> CompensateConfig(base="rtn:3", factor_bits=4).factor_groups
        64
    """

    version: int = 1
    base: str = "gptq:4"
    group_size: int = 64
    gptq_damp: float = DEFAULT_DAMP
    damp: float = 0.0
    iterations: int = 0
    lowrank_first: bool = False
    precision: str = "float64"
    factor_bits: int | None = None
    factor_group_size: int | None = None
    fisher_weighted: bool = False
    bit_choices: str = ""

    @property
    def spec(self) -> BaseSpec:
        return BaseSpec.parse(self.base)

    @property
    def choices(self) -> tuple[int, ...]:
        """The base widths a budget may choose from, ascending, the base's own included (just it without ``bit_choices``).

        Example:
            >>> CompensateConfig(base="rtn:3", bit_choices="4, 2").choices
            (2, 3, 4)
        """
        if not self.spec.quantizes:
            return ()
        return tuple(sorted({self.spec.bits, *(int(part) for part in re.split(r"[,/\s]+", self.bit_choices.strip()) if part)}))

    @property
    def factor_groups(self) -> int:
        """The group size of the quantized factors."""
        return self.factor_group_size or self.group_size

    def __post_init__(self) -> None:
        self.spec  # noqa: B018  (a bad spec fails when the config is made, not in the middle of a model)
        if self.group_size < 1 or self.precision not in ("float64", "float32") or self.gptq_damp < 0 or self.damp < 0 or self.iterations < 0:
            raise LowrankError(
                f"compensate needs group_size ≥ 1, gptq_damp ≥ 0, damp ≥ 0, iterations ≥ 0 and precision float64 or float32; got "
                f"group_size={self.group_size}, gptq_damp={self.gptq_damp}, damp={self.damp}, iterations={self.iterations}, "
                f"precision={self.precision!r}"
            )
        if self.factor_bits is not None and not (2 <= self.factor_bits <= 8 and self.spec.quantizes):
            raise LowrankError(
                f"--factor-bits must be 2..8 (omit it to keep the factors in the model dtype) and needs a quantized base (rtn or gptq); "
                f"got factor_bits={self.factor_bits} with base {self.base!r}"
            )
        if self.bit_choices.strip():
            hint = f"--bit-choices lists base widths in 2..8 separated by commas (e.g. 4) and needs a quantized base (rtn or gptq); got {self.bit_choices!r} with base {self.base!r}"
            try:
                choices = self.choices
            except ValueError:
                raise LowrankError(hint) from None
            if not choices or any(not 2 <= bits <= 8 for bits in choices):
                raise LowrankError(hint)
        if self.factor_group_size is not None and self.factor_group_size < 1:
            raise LowrankError(f"--factor-group-size must be at least 1, got {self.factor_group_size}")


def base_of(weight: torch.Tensor, statistics: LayerStatistics | None, config: CompensateConfig, name: str = "") -> CompressedBase:
    """The base compressor's result for ``weight`` under ``config``, in ``config.precision``."""
    return compress_base(weight, statistics, config.spec, config.group_size, config.gptq_damp, getattr(torch, config.precision), name)


def factorize(
    weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: CompensateConfig, name: str = "", base: CompressedBase | None = None
) -> LowRankQuantFactors | LowRankSparseFactors | QuantizedCorrectionFactors:
    """Base-compress ``weight`` and add the rank-``rank`` correction of its calibration output error.

    Args:
        weight: (out, in) matrix.
        statistics: the layer's calibration statistics (the correction needs them).
        rank: rank of the correction (0: the base alone, which a budget may leave a layer with).
        config: the options.
        name: layer name for messages.
        base: the base already computed for this weight and config (``base_of``), to skip recomputing it.

    Example:
        >>> from lowrank.calibration import LayerStatistics
        >>> stats = LayerStatistics.zeros(64); stats.inputs.update(torch.randn(500, 64))
        >>> factors = factorize(torch.randn(32, 64), stats, 4, CompensateConfig(base="rtn:3"))
        >>> factors.up.shape, factors.residual.bits
        (torch.Size([32, 4]), 3)
    """
    if statistics is None:
        raise LowrankError(f"compensate needs calibration statistics for layer {name or '(unnamed)'}; pass --calib FILE")
    if rank < 0:
        raise LowrankError(f"compensate needs a correction rank ≥ 0, got {rank} for layer {name or '(unnamed)'}")
    base = base if base is not None else base_of(weight, statistics, config, name)
    target = weight.to(base.approximation.dtype)
    weights = output_weights(statistics) if config.fisher_weighted else None

    def fit(matrix: torch.Tensor) -> LowRankFactors:
        return correction(matrix, statistics, rank, config.damp, name, weights)

    def compress(matrix: torch.Tensor) -> CompressedBase:
        return base_of(matrix, statistics, config, name)

    starts = [base]
    if rank > 0 and config.lowrank_first:
        starts.append(lowrank_first(target, fit, compress)[0])  # SVDQuant: the base compresses only W − L
    rounds = 1 + config.iterations if rank > 0 else 1
    pairs = (pair for start in starts for pair in alternate(target, fit, compress, start, rounds))
    if config.factor_bits is not None and rank > 0 and base.quantized is not None:
        return quantized_factorize(target, statistics, rank, config, name, base, list(pairs))
    if len(starts) == 1 and rounds == 1 and weights is None:
        base, low = next(pairs)  # plain EoRA: one pair, no error to compare
    else:  # the first pair with the least (weighted) calibration output error: plain EoRA's on a tie
        base, low = best_pair(target, statistics, [(pair[0], pair[1], pair[1].dense()) for pair in pairs], weights, base)[:2]
        if low is None:  # every weighted fit raised the unweighted error over the base's: plain EoRA never does
            low = correction(target - base.approximation, statistics, rank, config.damp, name)
    if base.quantized is not None:
        return LowRankQuantFactors(low.up, low.down, base.quantized)
    rows, cols = base.mask.nonzero(as_tuple=True)
    return LowRankSparseFactors(low.up, low.down, rows, cols, base.approximation[rows, cols])


def best_pair(target: torch.Tensor, statistics: LayerStatistics, candidates: list, weights: torch.Tensor | None, base: CompressedBase) -> tuple:
    """The first of ``candidates`` (base, correction, its dense matrix) with the least weighted output error
    among those whose unweighted error is no larger than ``base``'s alone; ``(base, None, None)`` if none is.

    Without ``weights`` the plain output error decides, and a correction fitted to the base's own
    error (plain EoRA) always qualifies.
    """
    baseline = output_error(target, base.approximation, statistics.xtx)
    best, best_error = (base, None, None), float("inf")
    for candidate in candidates:
        approximation = candidate[0].approximation + candidate[2]
        if weights is not None and output_error(target, approximation, statistics.xtx) > baseline:
            continue
        error = weighted_output_error(target, approximation, statistics.xtx, weights)
        if error < best_error:
            best, best_error = candidate, error
    return best


def quantize_correction(error: torch.Tensor, low: LowRankFactors, xtx: torch.Tensor, bits: int, group_size: int) -> tuple:
    """Quantize a correction's factors: ``down`` first, then ``up`` refit to the quantized ``down`` and quantized.

    ``down`` (rank, in) is quantized in groups along each component's row. Given it, the best ``up``
    for the calibration output error ‖(ΔW − U D̂)X‖² is the least-squares U = ΔW C D̂ᵀ (D̂ C D̂ᵀ)⁻¹
    (C = XᵀX), which absorbs part of ``down``'s rounding (as GPTQ's error feedback does); its
    transpose (rank, out) is then quantized in groups along each component's row.

    Args:
        error: ΔW = W − B, (out, in), in the precision to compute in.
        low: the unquantized correction (up (out, r), down (r, in)).
        xtx: the layer's XᵀX.
        bits: bits per factor code (2..8).
        group_size: values of a factor row per scale.

    Returns:
        (upᵀ, down) as :class:`~lowrank.linalg.quantize.GroupQuantized`.

    Example:
        >>> x, delta = torch.randn(200, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
        >>> from lowrank.linalg.svd import truncated_svd
        >>> up, down = quantize_correction(delta, truncated_svd(delta, 4), x.T @ x, bits=4, group_size=16)
        >>> up.codes.shape, down.codes.shape
        (torch.Size([4, 16]), torch.Size([4, 32]))
    """
    down = quantize_groups(low.down, bits, group_size)
    d = down.dequantize(error.dtype)
    c = xtx.to(error.dtype)
    gram = d @ c @ d.T
    # A rank-deficient XᵀX can leave D̂ C D̂ᵀ singular: a relative damping 1e-10 keeps the solve defined.
    gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype) * (1e-10 * gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny))
    up = torch.linalg.solve(gram, d @ c @ error.T)  # (rank, out) = Uᵀ
    return quantize_groups(up, bits, group_size), down


def quantized_factorize(
    target: torch.Tensor,
    statistics: LayerStatistics,
    rank: int,
    config: CompensateConfig,
    name: str,
    base: CompressedBase,
    pairs: list,
) -> QuantizedCorrectionFactors | LowRankQuantFactors:
    """The best (base, correction) pair of ``pairs`` with its factors quantized, never worse than ``base`` alone.

    Every candidate pair (plain EoRA, low-rank first, alternations) is compared *after* quantizing
    its factors. If even the best is worse than the base alone under the calibration statistics
    (possible for coarse factor codes), the rank is halved until it is not; at rank 0 the layer
    keeps its base alone (a rank-0 :class:`~lowrank.nn.LowRankQuantLinear`). Each fallback is logged.
    """
    baseline = output_error(target, base.approximation, statistics.xtx)
    bits, groups = config.factor_bits, config.factor_groups
    weights = output_weights(statistics) if config.fisher_weighted else None
    while True:
        candidates = []
        for pair_base, low in pairs:
            up, down = quantize_correction(target - pair_base.approximation, low, statistics.xtx, bits, groups)
            factors = QuantizedCorrectionFactors(up, down, pair_base.quantized)
            candidates.append((pair_base, factors, factors.dense(target.dtype) - pair_base.approximation))
        best = best_pair(target, statistics, candidates, None, base)[1]
        error = output_error(target, best.dense(target.dtype), statistics.xtx)
        if error <= baseline:
            return best_pair(target, statistics, candidates, weights, base)[1] if weights is not None else best
        smaller = rank // 2
        log.warning(
            "layer %s: the rank-%d correction with %d-bit factors has calibration output error %.4g > the base's %.4g; trying rank %d",
            name or "(unnamed)", rank, bits, error, baseline, smaller,
        )  # fmt: skip
        if smaller == 0:
            empty = target.new_zeros(target.shape[0], 0), target.new_zeros(0, target.shape[1])
            return LowRankQuantFactors(*empty, base.quantized)
        rank = smaller
        pairs = [(pair_base, correction(target - pair_base.approximation, statistics, rank, config.damp, name, weights)) for pair_base, _ in pairs]


def build(factors: LowRankQuantFactors | LowRankSparseFactors, bias: torch.Tensor | None, dtype: torch.dtype):
    """The replacement module for compensated ``factors``, in the model's ``dtype``."""
    if isinstance(factors, QuantizedCorrectionFactors):
        return QuantizedCorrectionLinear.from_factors(factors, bias, dtype=dtype)
    structure = LowRankQuantLinear if isinstance(factors, LowRankQuantFactors) else LowRankPlusSparseLinear
    with warnings.catch_warnings():
        # A rank-0 correction builds empty nn.Linear factors, whose initialization torch warns is a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return structure.from_factors(factors, bias, dtype=dtype)


def layer_errors(weight: torch.Tensor, statistics: LayerStatistics, config: CompensateConfig, rank: int) -> dict[str, float]:
    """Calibration output errors ‖(W − W′)X‖²_F of the base alone (of W itself) and of base + correction (float64).

    Example:
        >>> from lowrank.calibration import LayerStatistics
        >>> stats = LayerStatistics.zeros(64); stats.inputs.update(torch.randn(500, 64))
        >>> errors = layer_errors(torch.randn(32, 64), stats, CompensateConfig(base="rtn:3"), rank=8)
        >>> errors["compensated"] < errors["base"]
        True
    """
    base = base_of(weight, statistics, config)
    factors = factorize(weight, statistics, rank, config, base=base)
    return {
        "base": output_error(weight, base.approximation, statistics.xtx),
        "compensated": output_error(weight, factors.dense(), statistics.xtx),
    }
