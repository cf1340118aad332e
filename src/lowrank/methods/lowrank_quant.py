"""``lowrank-quant``: W ≈ A·B + Q, a high-precision low-rank part plus a low-bit quantized residual.

The budget is counted in bits: a plan's rank r buys r·(out + in) values of the model dtype
(32 bits each for float32, 16 for bfloat16). The quantized residual Q costs ``bits`` per weight
plus, per group of ``group_size`` input columns, a float16 scale and a ``bits``-bit zero point
(:func:`lowrank.linalg.quantize.quantized_bits`); A·B gets the largest rank r′ that fits in the
rest. Each saved layer records its ``bits_per_weight`` (all stored bits / (out·in)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import LowRankFactors
from ..linalg.quantize import quantize_groups, quantized_bits
from ..nn import LowRankQuantLinear
from ..nn.lowrank_quant_linear import LowRankQuantFactors
from ..nn.lowrank_sparse_linear import value_bits
from .registry import Method, register_method
from .structured import BestFit, build_with_fallback, residual_fit


@dataclass
class LowRankQuantConfig:
    """Options of low-rank plus quantized residual.

    Attributes:
        bits: bits per residual weight, 2 to 8 (4 and 3 are the useful ones).
        group_size: input columns sharing one scale and zero point.
        iterations: alternations between quantizing W − A·B and refitting A·B to W − Q.
        whiten: fit the low-rank part by whitened SVD, minimizing the output error (needs --calib).
        precision: ``"float64"`` or ``"float32"``, the dtype the decomposition runs in.

    Example:
        >>> LowRankQuantConfig(bits=3).group_size
        64
    """

    version: int = 1
    bits: int = 4
    group_size: int = 64
    iterations: int = 5
    whiten: bool = False
    precision: str = "float64"


def lowrank_rank(out_features: int, in_features: int, rank: int, bits: int, group_size: int, model_bits: int) -> int:
    """The rank r′ of A·B that fits beside a ``bits``-bit residual in the budget of ``rank``·(out + in) values.

    Example:
        >>> lowrank_rank(256, 256, 64, bits=4, group_size=64, model_bits=32)  # 64 - 4.31 bpw of 32
        46
    """
    budget = rank * (out_features + in_features) * model_bits
    left = budget - quantized_bits(out_features, in_features, bits, group_size)
    return min(left // ((out_features + in_features) * model_bits), min(out_features, in_features))


def factorize(
    weight: torch.Tensor, statistics: LayerStatistics | None, rank: int, config: LowRankQuantConfig, name: str = ""
) -> LowRankQuantFactors | LowRankFactors:
    """Alternate Q = quantize(W − A·B) and A·B = best rank-r′ fit of W − Q; keep the best pair.

    Starts from A·B = truncated SVD of W (as LoftQ does). The error tracked is Frobenius, or the
    output error with ``whiten``. If the rank-r low-rank fit alone is better at the same budget, it
    is returned (as :class:`LowRankFactors`, built into a plain ``LowRankLinear``).

    Args:
        weight: (out, in) matrix.
        statistics: calibration statistics, needed with ``whiten``.
        rank: the plan's rank, i.e. a budget of rank·(out + in) values of the model dtype.
        config: the method's options.
        name: layer name for messages.

    Raises:
        LowrankError: when the budget cannot hold the quantized residual plus rank 1.

    Example:
        >>> f = factorize(torch.randn(64, 128), None, 40, LowRankQuantConfig())
        >>> f.residual.bits, f.up.shape[1]
        (4, 34)
    """
    if not 2 <= config.bits <= 8 or config.group_size < 1:
        raise LowrankError(f"lowrank-quant needs bits in 2..8 and group_size ≥ 1, got bits={config.bits}, group_size={config.group_size}")
    if config.whiten and statistics is None:
        raise LowrankError("lowrank-quant with whiten needs calibration statistics; pass --calib FILE")
    out_features, in_features = weight.shape
    model_bits = value_bits(weight.dtype)
    inner_rank = lowrank_rank(out_features, in_features, rank, config.bits, config.group_size, model_bits)
    if inner_rank < 1:
        needed = (quantized_bits(out_features, in_features, config.bits, config.group_size) + (out_features + in_features) * model_bits) / (
            out_features * in_features
        )
        given = rank * (out_features + in_features) * model_bits / (out_features * in_features)
        raise LowrankError(
            f"lowrank-quant: layer {name or '(unnamed)'} needs at least {needed:.2f} bits per weight at {config.bits} bits, "
            f"the plan gives {given:.2f}; lower --ratio or pass --option bits={max(2, config.bits - 1)}"
        )
    fit = residual_fit(weight, statistics, config.precision, config.whiten, name)
    target = fit.target

    best = BestFit.plain(fit, rank)
    low = fit.factors(target, inner_rank)
    for _ in range(max(1, config.iterations)):
        residual = quantize_groups(target - low.dense(), config.bits, config.group_size)
        quantized = residual.dequantize(target.dtype)
        # The refit is optimal for this Q, so the pair after it is the one worth comparing.
        low = fit.factors(target - quantized, inner_rank)
        best.offer(LowRankQuantFactors(low.up, low.down, residual), fit.error(low.dense() + quantized))
    return best.result("lowrank-quant", name, rank, "quantized split")


build = build_with_fallback(LowRankQuantLinear)


register_method(
    Method(
        name="lowrank-quant",
        config_class=LowRankQuantConfig,
        factorize=factorize,
        build=build,
        needs_statistics=False,
        nested=False,
        description="W ≈ A·B + Q, Q the residual quantized to 4 or 3 bits in groups (budget counted in bits)",
    )
)
