"""``lowrank-quant``: W ≈ A·B + Q (+ S), a high-precision low-rank part plus a low-bit quantized residual.

The budget is counted in bits: a plan's rank r buys r·(out + in) values of the model dtype
(32 bits each for float32, 16 for bfloat16). The quantized residual Q costs ``bits`` per weight
plus, per group of ``group_size`` input columns, a float16 scale and a ``bits``-bit zero point
(:func:`lowrank.linalg.quantize.quantized_bits`); optional outliers S (``outliers``, SqueezeLLM's
dense-and-sparse) cost what ``lowrank-sparse``'s sparse part costs, a value in the model dtype
plus a 16-bit column index each (32-bit past 32768 inputs) and 32-bit row pointers
(:func:`lowrank.nn.lowrank_quant_linear.sparse_bits`); A·B gets the largest rank r′ that fits in
the rest. Each saved layer records its ``bits_per_weight`` (all stored bits / (out·in)).

The order in which A·B and Q are fitted is the ``order`` option; every order is judged by the same
error (Frobenius, or the calibration output error with ``whiten``) at the same stored bits:

=================  ====================================================================  ==========
order              what it does                                                          after
=================  ====================================================================  ==========
``alternate``      A·B = best rank-r′ fit of W, then ``iterations`` rounds of             LoftQ,
                   Q = quantize(W − A·B), A·B = best fit of W − Q (the default)          LQ-LoRA
``lowrank-first``  A·B = best rank-r′ fit of W, Q = quantize(W − A·B), once               SVDQuant
``quantize-first`` Q = quantize(W), A·B = best fit of W − Q, once (with ``whiten``,        EoRA
                   :func:`lowrank.compensate.correction`, the closed-form optimum)
``best``           all three; each layer keeps the one with the least error
=================  ====================================================================  ==========

The steps are :mod:`lowrank.compensate.orders`' (``lowrank compensate --lowrank-first`` takes the
same low-rank-first step, then refits its correction as ``alternate`` does). "best fit" is the
truncated SVD, or with ``whiten`` the whitened SVD; "quantize" is round-to-nearest or, with
``quantizer=gptq``, GPTQ on the calibration statistics (both through
:func:`lowrank.compensate.compress_base`), after taking out the outliers. Whatever the order, a layer
whose plain rank-r low-rank fit is better at the same budget gets that instead (a ``LowRankLinear``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..compensate.base import BaseSpec, compress_base
from ..compensate.eora import correction
from ..compensate.orders import alternate, lowrank_first
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..linalg.fit import ResidualFit
from ..linalg.quantize import GroupQuantized, quantized_bits
from ..nn import LowRankQuantLinear
from ..nn.lowrank_quant_linear import LowRankQuantFactors, LowRankQuantSparseFactors, LowRankQuantSparseLinear
from ..nn.lowrank_sparse_linear import sparse_bits, value_bits
from .registry import Method, choices_plan, register_method
from .structured import BestFit, residual_fit
from .svd import build_lowrank

ORDERS = ("alternate", "lowrank-first", "quantize-first", "best")
QUANTIZERS = ("rtn", "gptq")
OUTLIER_SELECTIONS = ("magnitude", "sensitivity")


@dataclass
class LowRankQuantConfig:
    """Options of low-rank plus quantized residual.

    Attributes:
        bits: bits per residual weight, 2 to 8 (4 and 3 are the useful ones).
        group_size: input columns sharing one scale and zero point.
        iterations: with ``order="alternate"``, alternations between quantizing W − A·B and refitting A·B to W − Q.
        whiten: fit the low-rank part by whitened SVD, minimizing the output error (needs --calib).
        precision: ``"float64"`` or ``"float32"``, the dtype the decomposition runs in.
        order: ``"alternate"`` (LoftQ, the default), ``"lowrank-first"`` (SVDQuant), ``"quantize-first"``
            (EoRA) or ``"best"`` (all three, the best per layer); see the module docstring.
        quantizer: ``"rtn"`` (round-to-nearest) or ``"gptq"`` (error feedback on the calibration
            statistics, :mod:`lowrank.linalg.gptq`; needs --calib).
        outliers: fraction of each layer's weights kept as full-precision sparse outliers (SqueezeLLM's
            dense-and-sparse), in [0, 1); paid for from the same budget, so the low-rank rank shrinks.
        outlier_selection: ``"magnitude"`` (the largest |entries| of the residual, those that set the
            quantization ranges) or ``"sensitivity"`` (the largest |entry|·‖x_j‖, the entry's share of
            the output error; needs --calib).
        bit_choices: bit widths separated by commas or slashes (e.g. ``"2,3,4"``) that ``--allocate global`` chooses
            from per layer, together with its budget (:mod:`lowrank.allocation.bits`); empty: every
            layer gets ``bits``. With choices, a layer whose budget holds no residual stays plain low-rank.

    Example:
        >>> LowRankQuantConfig(bits=3).group_size
        64
        >>> LowRankQuantConfig(order="lowrank-first", outliers=0.005).quantizer
        'rtn'
    """

    version: int = 1
    bits: int = 4
    group_size: int = 64
    iterations: int = 5
    whiten: bool = False
    precision: str = "float64"
    order: str = "alternate"
    quantizer: str = "rtn"
    outliers: float = 0.0
    outlier_selection: str = "magnitude"
    bit_choices: str = ""

    def __post_init__(self) -> None:
        try:
            choices = self.choices
        except ValueError:
            choices = ()
        if self.bit_choices.strip() and (not choices or any(not 2 <= bits <= 8 for bits in choices)):
            raise LowrankError(f"lowrank-quant option bit_choices must list bit widths in 2..8 separated by commas or slashes (e.g. 2,3,4), got {self.bit_choices!r}")
        for option, value, choices in (
            ("order", self.order, ORDERS),
            ("quantizer", self.quantizer, QUANTIZERS),
            ("outlier_selection", self.outlier_selection, OUTLIER_SELECTIONS),
        ):
            if value not in choices:
                raise LowrankError(f"lowrank-quant option {option} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers < 1:
            raise LowrankError(f"lowrank-quant option outliers must be a fraction in [0, 1) (e.g. 0.005), got {self.outliers!r}")

    @property
    def choices(self) -> tuple[int, ...]:
        """The bit widths of ``bit_choices``, ascending (empty: none)."""
        return tuple(sorted({int(part) for part in re.split(r"[,/\s]+", self.bit_choices) if part}))

    @property
    def needs_statistics(self) -> bool:
        """Whether these options read calibration statistics."""
        return self.whiten or self.quantizer == "gptq" or (self.outliers > 0 and self.outlier_selection == "sensitivity")


def outlier_count(out_features: int, in_features: int, outliers: float) -> int:
    """Outliers kept in an (out, in) layer: ⌊``outliers``·out·in⌋.

    Example:
        >>> outlier_count(256, 768, 0.005)
        983
    """
    return math.floor(outliers * out_features * in_features)


def lowrank_rank(out_features: int, in_features: int, rank: int, bits: int, group_size: int, model_bits: int, num_outliers: int = 0) -> int:
    """The rank r′ of A·B that fits beside a ``bits``-bit residual (and ``num_outliers`` sparse entries) in the
    budget of ``rank``·(out + in) values.

    Example:
        >>> lowrank_rank(256, 256, 64, bits=4, group_size=64, model_bits=32)  # 64 - 4.31 bpw of 32
        46
        >>> lowrank_rank(256, 256, 64, bits=4, group_size=64, model_bits=32, num_outliers=328)  # minus 328 entries of 48 bits and 257 row pointers
        45
    """
    budget = rank * (out_features + in_features) * model_bits
    left = budget - quantized_bits(out_features, in_features, bits, group_size)
    if num_outliers:
        left -= sparse_bits(out_features, in_features, num_outliers, model_bits)
    return min(left // ((out_features + in_features) * model_bits), min(out_features, in_features))


@dataclass
class _Residual:
    """What one quantization step produced: Q, the outliers (or none) and the matrix they stand for together."""

    quantized: GroupQuantized
    approximation: torch.Tensor
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def with_low_rank(self, low: LowRankFactors) -> LowRankQuantFactors | LowRankQuantSparseFactors:
        if self.rows is None:
            return LowRankQuantFactors(low.up, low.down, self.quantized)
        return LowRankQuantSparseFactors(low.up, low.down, self.quantized, self.rows, self.cols, self.values)


@dataclass
class _Quantizer:
    """Splits a matrix into outliers and a quantized rest, as the config says."""

    statistics: LayerStatistics | None
    config: LowRankQuantConfig
    num_outliers: int
    name: str = ""

    def __call__(self, matrix: torch.Tensor) -> _Residual:
        spec = BaseSpec(self.config.quantizer, bits=self.config.bits)
        if not self.num_outliers:
            base = compress_base(matrix, self.statistics, spec, self.config.group_size, dtype=matrix.dtype, name=self.name)
            return _Residual(base.quantized, base.approximation)
        score = matrix.abs()
        if self.config.outlier_selection == "sensitivity":
            # |ΔW_ij|·‖x_j‖: the entry's own share of the output error, as lowrank-sparse's weighted selection.
            score = score * self.statistics.xtx.diagonal().to(device=matrix.device, dtype=matrix.dtype).clamp(min=0).sqrt()
        positions = score.flatten().topk(self.num_outliers).indices
        rows, cols = positions // matrix.shape[1], positions % matrix.shape[1]
        rest = matrix.index_put((rows, cols), matrix.new_zeros(()))
        base = compress_base(rest, self.statistics, spec, self.config.group_size, dtype=matrix.dtype, name=self.name)
        # Round-to-nearest codes 0 exactly (the zero point is an integer code), so the outlier is the entry
        # itself; GPTQ's error feedback may have moved the code, and the outlier takes up what is left.
        values = (matrix - base.approximation)[rows, cols]
        approximation = base.approximation.index_put((rows, cols), values, accumulate=True)
        return _Residual(base.quantized, approximation, rows, cols, values)


def _alternate(fit: ResidualFit, quantize: _Quantizer, rank: int, config: LowRankQuantConfig, **_) -> Iterator:
    def fit_rank(matrix: torch.Tensor) -> LowRankFactors:
        return fit.factors(matrix, rank)

    start, _ = lowrank_first(fit.target, fit_rank, quantize)  # LoftQ starts from the (whitened) truncated SVD of W
    for residual, low in alternate(fit.target, fit_rank, quantize, start, max(1, config.iterations)):
        yield residual.with_low_rank(low)


def _lowrank_first(fit: ResidualFit, quantize: _Quantizer, rank: int, **_) -> Iterator:
    residual, low = lowrank_first(fit.target, lambda matrix: fit.factors(matrix, rank), quantize)  # SVDQuant keeps its first branch
    yield residual.with_low_rank(low)


def _quantize_first(fit: ResidualFit, quantize: _Quantizer, rank: int, statistics: LayerStatistics | None, name: str, **_) -> Iterator:
    residual = quantize(fit.target)
    error = fit.target - residual.approximation
    # EoRA: the whitened SVD of the quantization error is the exact minimizer of the output error.
    low = correction(error, statistics, rank, name=name) if fit.white is not None else fit.factors(error, rank)
    yield residual.with_low_rank(low)


_ORDER_STEPS = {"alternate": _alternate, "lowrank-first": _lowrank_first, "quantize-first": _quantize_first}


def factorize(
    weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: LowRankQuantConfig, name: str = ""
) -> LowRankQuantFactors | LowRankQuantSparseFactors | LowRankFactors:
    """Fit A·B and the quantized residual Q (plus outliers S) in ``config.order``; keep the best candidate.

    The error tracked is Frobenius, or the output error with ``whiten``. If the rank-r low-rank fit
    alone is better at the same budget, it is returned (as :class:`LowRankFactors`, built into a plain
    ``LowRankLinear``).

    Args:
        weight: (out, in) matrix.
        statistics: calibration statistics, needed with ``whiten``, ``quantizer="gptq"`` and
            ``outlier_selection="sensitivity"``.
        rank: the plan's rank, i.e. a budget of rank·(out + in) values of the model dtype.
        config: the method's options.
        name: layer name for messages.

    Raises:
        LowrankError: when the budget cannot hold the quantized residual (and outliers) plus rank 1.

    Example:
        >>> f = factorize(torch.randn(64, 128), None, 40, LowRankQuantConfig())
        >>> f.residual.bits, f.up.shape[1]
        (4, 34)
        >>> f = factorize(torch.randn(64, 128), None, 40, LowRankQuantConfig(order="lowrank-first", outliers=0.01))
        >>> f.values.numel(), f.up.shape[1]
        (81, 33)
    """
    if not 2 <= config.bits <= 8 or config.group_size < 1:
        raise LowrankError(f"lowrank-quant needs bits in 2..8 and group_size ≥ 1, got bits={config.bits}, group_size={config.group_size}")
    if config.needs_statistics and statistics is None:
        raise LowrankError(
            "lowrank-quant with whiten, quantizer=gptq or outlier_selection=sensitivity needs calibration statistics; pass --calib FILE"
        )
    out_features, in_features = weight.shape
    model_bits = value_bits(weight.dtype)
    num_outliers = outlier_count(out_features, in_features, config.outliers)
    inner_rank = lowrank_rank(out_features, in_features, rank, config.bits, config.group_size, model_bits, num_outliers)
    if inner_rank < 1 and config.choices:  # the allocator gave this layer a budget for the low-rank part alone
        return BestFit.plain(residual_fit(weight, statistics, config.precision, config.whiten, name), rank).factors
    if inner_rank < 1:
        fixed = quantized_bits(out_features, in_features, config.bits, config.group_size) + (out_features + in_features) * model_bits
        if num_outliers:
            fixed += sparse_bits(out_features, in_features, num_outliers, model_bits)
        needed, given = fixed / (out_features * in_features), rank * (out_features + in_features) * model_bits / (out_features * in_features)
        fix = f"lower --ratio or pass --option bits={max(2, config.bits - 1)}" + (" or a smaller outliers fraction" if num_outliers else "")
        raise LowrankError(
            f"lowrank-quant: layer {name or '(unnamed)'} needs at least {needed:.2f} bits per weight at {config.bits} bits"
            f"{f' with {num_outliers} outliers' if num_outliers else ''}, the plan gives {given:.2f}; {fix}"
        )
    fit = residual_fit(weight, statistics, config.precision, config.whiten, name)
    quantize = _Quantizer(statistics, config, num_outliers, name)
    best = BestFit.plain(fit, rank)
    orders = ORDERS[:3] if config.order == "best" else (config.order,)
    for order in orders:
        for candidate in _ORDER_STEPS[order](fit, quantize, inner_rank, config=config, statistics=statistics, name=name):
            best.offer(candidate, fit.error(candidate.dense()))
    return best.result("lowrank-quant", name, rank, "quantized split")


def build(factors, bias: torch.Tensor | None, dtype: torch.dtype):
    """The module for ``factors``: ``LowRankQuantLinear``, ``LowRankQuantSparseLinear`` with outliers, or the
    plain ``LowRankLinear`` of a layer that fell back to the low-rank fit."""
    if isinstance(factors, LowRankFactors):
        return build_lowrank(factors, bias, dtype)
    structure = LowRankQuantSparseLinear if isinstance(factors, LowRankQuantSparseFactors) else LowRankQuantLinear
    return structure.from_factors(factors, bias, dtype=dtype)


def _bits_plan():
    from ..allocation.bits import bits_plan

    return bits_plan


plan = choices_plan("lowrank-quant", LowRankQuantConfig, "bit_choices", _bits_plan)


register_method(
    Method(
        name="lowrank-quant",
        config_class=LowRankQuantConfig,
        factorize=factorize,
        build=build,
        needs_statistics=False,
        nested=False,
        description="W ≈ A·B + Q (+ sparse outliers), Q the residual quantized to 4 or 3 bits in groups, fitted in a chosen order (budget counted in bits)",
        plan=plan,
    )
)
