"""Compensating a whole model: choose each layer's correction rank, then compress in place.

Ranks come from one ``rank`` for every layer, or from a ``budget`` of extra storage shared by all
layers. With a budget, each layer's error curve is the whitened spectrum of its base's error ΔW
(σ_i² of ΔW·C^{1/2} per token: what keeping direction i saves, exactly, by the EoRA optimum),
put in units of the loss by half the mean output Fisher when the statistics have gradients (as
``--allocate global`` does for compression, :mod:`lowrank.allocation.curves`; with
``fisher_weighted``, half the spectrum of diag(√f)·ΔW·C^{1/2}, the weighted objective's), and the existing
knapsack (:func:`lowrank.allocation.knapsack.greedy_ranks`) picks the ranks (with ``iterations`` or
``lowrank_first`` the corrections end no worse than these curves, which are plain EoRA's). The knapsack starts
every matrix at rank 1, but a small budget is better spent leaving some layers uncorrected: each
curve gets a leading step that costs out + in and is paid for in advance, so the knapsack's
"rank 1" is rank 0 here and a layer may keep its base alone.

The budget is counted in bits, as a fraction of what the base itself stores: ``budget=0.05`` lets
the corrections (r·(out + in) values of the model dtype per layer) add 5 % to the targeted
layers' stored bits after base compression. With ``factor_bits`` a rank step is priced at what the
quantized factors store (:func:`~lowrank.nn.quantized_factors.factor_storage_bits`: codes, zero
points and float16 scales of one row of ``down`` and of ``up``ᵀ), so the same budget buys about
3.7 times the rank of bfloat16 factors at 4 bits; the packing's rounding to whole blocks of 8 codes
(at most 7 codes and 7 zero points per packed tensor) is reserved up front, so the stored
corrections never exceed the budget.

With ``bit_choices`` the budget also buys base width: each layer's options are (width, rank) pairs,
priced in units of one rank step above its narrowest base (:func:`width_curve`), their errors the
EoRA curves of each width's own base error; the knapsack spends the budget over those curves and
every layer gets the pair with the least predicted loss within what it won (:func:`width_option`).
The budget is then extra storage over the base at its own width in *every* layer: a wider base's
extra bits are paid from it, a narrower one's saving is added to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..allocation import Plan
from ..allocation.curves import whitened_energy
from ..allocation.knapsack import greedy_ranks
from ..calibration import LayerStatistics
from ..calibration.statistics import one_pass
from ..compress import CompressionReport, compress_
from ..errors import LowrankError
from ..linalg.quantize import num_groups
from ..linalg.weighted import weighted_energy
from ..nn import LowRankPlusSparseLinear, LowRankQuantLinear, find_targets, linear_shape, linear_weight
from ..nn.lowrank_sparse_linear import value_bits
from ..nn.quantized_factors import QuantizedCorrectionLinear, factor_storage_bits
from .eora import output_weights
from .layer import CompensateConfig, base_of

METHOD = "compensate"


def compensation_ranks(
    model: nn.Module,
    stats: dict[str, LayerStatistics],
    config: CompensateConfig,
    rank: int | None = None,
    budget: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Plan:
    """A :class:`~lowrank.allocation.Plan` of correction ranks: ``rank`` everywhere, or ranks under ``budget``.

    Args:
        model: the dense model.
        stats: calibration statistics of the targeted layers (with gradients, the budget is
            allocated in units of the loss; without, by output error alone).
        config: the compensation options (the base compressor decides the errors).
        rank: one correction rank for every layer (capped at min(out, in)).
        budget: extra storage for all corrections, as a fraction of the bases' stored bits.
        include: regular expressions selecting layers (default: linears in the blocks).
        exclude: regular expressions removing layers.

    Example:
        >>> plan = compensation_ranks(model, stats, CompensateConfig(base="gptq:3"), budget=0.05)  # doctest: +SKIP
        >>> plan.details["compensation"]["extra_storage"] <= 0.05  # doctest: +SKIP
        True
    """
    if (rank is None) == (budget is None):
        raise LowrankError("give either a correction rank (--rank) or an extra-storage budget (--budget), not both")
    if rank is not None and rank < 1:
        raise LowrankError(f"--rank must be at least 1, got {rank}")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise LowrankError(f"--budget must be a positive fraction of the base's storage (e.g. 0.05), got {budget}")
    if rank is not None and len(config.choices) > 1:
        raise LowrankError("--bit-choices are chosen with an extra-storage --budget; pass --budget instead of --rank, or drop --bit-choices")
    names = find_targets(model, include, exclude)
    missing = [name for name in names if name not in stats]
    if missing:
        raise LowrankError(f"no calibration statistics for layer {missing[0]}; calibrate with the same --include/--exclude")
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    details = {"base": config.base, "rank": rank, "budget": budget}
    if rank is not None:
        ranks = {name: min(rank, *shape) for name, shape in shapes.items()}
        strategy = "uniform"
    else:
        dtype = linear_weight(model.get_submodule(names[0])).dtype
        gains, base_bits = {}, 0
        widths = config.choices if len(config.choices) > 1 else (None,)  # None: the base's own width only
        # Per layer and base width: (the error curve's gains, the base's stored bits).
        options: dict[str, dict] = {name: {} for name in names}
        with one_pass(stats, names):
            for name in names:
                weight = linear_weight(model.get_submodule(name)).detach()
                for width in widths:
                    options[name][width] = error_curve(weight, stats[name], width_config(config, width), dtype, name)
                base_bits += options[name][widths[0] if widths[0] is None else config.spec.bits][1]
        gains = {name: curves[widths[0] if widths[0] is None else config.spec.bits][0] for name, curves in options.items()}
        layer_options = {}
        # The knapsack's rank 1 stands for rank 0: its step (any gain, here the first one again, to
        # keep the curve non-increasing) and its cost are given for free.
        shifted = {name: torch.cat([curve[:1], curve]) for name, curve in gains.items()}
        if config.factor_bits is None and widths == (None,):
            allowed = int(budget * base_bits) // value_bits(dtype)  # parameters of the model dtype
            smallest = min(out + inp for out, inp in shapes.values())
            if smallest > allowed:
                raise LowrankError(
                    f"--budget {budget} buys {allowed:,} correction values, less than a rank-1 correction of the smallest layer ({smallest:,}); "
                    f"raise --budget to at least {smallest * value_bits(dtype) / base_bits:.4f}"
                )
            prepaid = sum(out + inp for out, inp in shapes.values())
            chosen = greedy_ranks(shifted, shapes, allowed + prepaid, allow_dense=False)
            ranks = {name: rank - 1 for name, rank in chosen.items()}
        else:
            steps = {name: correction_bits(shape, 1, dtype, config, packed=False) for name, shape in shapes.items()}
            # 4 packed factor tensors per layer, each rounded up by at most 7 codes.
            padding = len(shapes) * 4 * 7 * config.factor_bits if config.factor_bits is not None else 0
            allowed = int(budget * base_bits) - padding  # bits
            if widths == (None,):
                # Knapsack sizes k = 1 … (the curve's length) stand for ranks 0 … min(out, in); size k costs k·step.
                prices = {name: (steps[name], len(shifted[name]) * steps[name] + 1) for name in shapes}
                freed = 0
            else:
                shifted, prices, freed = {}, {}, 0
                for name in names:
                    shifted[name], prices[name], saving = width_curve(options[name], config.spec.bits, steps[name])
                    freed += saving
            if min(steps.values()) > allowed + freed:
                raise LowrankError(
                    f"--budget {budget} buys {max(allowed, 0):,} bits of corrections, less than a rank-1 correction of the smallest layer "
                    f"({min(steps.values()):,} bits); raise --budget to at least {(min(steps.values()) + padding) / base_bits:.4f}"
                )
            chosen = greedy_ranks(shifted, shapes, allowed + freed + sum(steps.values()), allow_dense=False, prices=prices)
            if widths == (None,):
                ranks = {name: rank - 1 for name, rank in chosen.items()}
            else:
                ranks, widths_chosen = {}, {}
                for name, size in chosen.items():
                    widths_chosen[name], ranks[name] = width_option(options[name], steps[name], size - 1)
                    if widths_chosen[name] != config.spec.bits:
                        layer_options[name] = {"base": f"{config.spec.kind}:{widths_chosen[name]}"}
                details["bits"] = {str(width): sum(chosen == width for chosen in widths_chosen.values()) for width in config.choices}
        strategy = "global" if all(stats[name].output_fisher is not None for name in names) else "output-error"
        details["base_bits"] = base_bits
        details["factor_bits"] = config.factor_bits
        extra = sum(correction_bits(shapes[name], r, dtype, config) for name, r in ranks.items())
        if layer_options:  # a wider base's extra bits (a narrower one's saving) count with the corrections
            for name, chosen_options in layer_options.items():
                width = int(chosen_options["base"].split(":")[1])
                extra += options[name][width][1] - options[name][config.spec.bits][1]
        details["extra_storage"] = extra / base_bits
        if layer_options:  # read by compress_ (lowrank.compress.layer_config): these layers' base width
            return Plan(ratio=0.0, strategy=strategy, shapes=shapes, ranks=ranks, details={"compensation": details, "layer_options": layer_options})
    return Plan(ratio=0.0, strategy=strategy, shapes=shapes, ranks=ranks, details={"compensation": details})


def width_config(config: CompensateConfig, width: int | None) -> CompensateConfig:
    """``config`` with its base at ``width`` bits (``None``: unchanged)."""
    if width is None or width == config.spec.bits:
        return config
    return dataclasses.replace(config, base=f"{config.spec.kind}:{width}", bit_choices="")


def error_curve(
    weight: torch.Tensor, statistics: LayerStatistics, config: CompensateConfig, dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, int]:
    """(gains, base bits): the predicted loss each correction direction of ``config``'s base error removes
    (largest first; the error at rank r is ``gains[r:].sum()``), and the base's stored bits in ``dtype``."""
    base = base_of(weight, statistics, config, name)
    error = weight.to(base.approximation.dtype) - base.approximation
    fisher = statistics.output_fisher
    if config.fisher_weighted:  # the spectrum of the weighted objective the corrections minimize
        gains = 0.5 * weighted_energy(error, output_weights(statistics), statistics.whitening()) / max(statistics.num_tokens, 1)
    else:
        gains = whitened_energy(error, statistics) * (0.5 * fisher.mean().item() if fisher is not None else 1.0)
    return gains, base.storage_bits(dtype)


def width_curve(curves: dict[int, tuple[torch.Tensor, int]], own: int, step: int) -> tuple[torch.Tensor, tuple[int, int], int]:
    """One layer's choice of base width and correction rank as a knapsack curve in units of one rank ``step`` (bits).

    A width w whose base stores b_w bits is offset by u_w = ⌈(b_w − b_min)/step⌉ units above the
    narrowest; size k then stands for the least error of any (w, r) with u_w + r ≤ k. Returns the
    gains :func:`~lowrank.allocation.knapsack.greedy_ranks` reads (size k' = k + 1, as the
    rank-0 convention of :func:`compensation_ranks`), its price (step, above the largest size) and
    the bits the narrowest base saves over the layer's own width (≥ 0, given to the budget).

    Example:
        >>> curves = {3: (torch.tensor([4.0, 1.0]), 100), 4: (torch.tensor([1.0, 0.5]), 120)}
        >>> gains, price, saving = width_curve(curves, own=3, step=10)
        >>> [round(gains[k:].sum().item(), 3) for k in (1, 2, 3, 4)]  # the error at k = 0, 1, 2, 3 units
        [5.0, 1.0, 0.0, 0.0]
    """
    errors = width_errors(curves, step)
    gains = torch.cat([errors.new_zeros(1), errors[:-1] - errors[1:], errors[-1:]])
    cheapest = min(bits for _, bits in curves.values())
    return gains, (step, len(errors) * step + 1), curves[own][1] - cheapest


def width_errors(curves: dict[int, tuple[torch.Tensor, int]], step: int) -> torch.Tensor:
    """The least error reachable with k = 0, 1, … units of ``step`` bits above the narrowest base (see :func:`width_curve`)."""
    cheapest = min(bits for _, bits in curves.values())
    offsets = {width: -(-(bits - cheapest) // step) for width, (_, bits) in curves.items()}
    size = max(offsets[width] + len(gains) for width, (gains, _) in curves.items()) + 1
    errors = torch.full((size,), float("inf"), dtype=torch.float64)
    for width, (gains, _) in curves.items():
        tail = torch.cat([gains.double().flip(0).cumsum(0).flip(0), gains.new_zeros(1, dtype=torch.float64)])  # error at rank 0 … len
        row = torch.cat([torch.full((offsets[width],), float("inf"), dtype=torch.float64), tail, tail.new_zeros(size - offsets[width] - len(tail))])
        errors = torch.minimum(errors, row)
    return errors.cummin(0).values


def width_option(curves: dict[int, tuple[torch.Tensor, int]], step: int, units: int) -> tuple[int, int]:
    """(width, rank) reaching the least error within ``units`` steps above the narrowest base; the narrower on a tie."""
    cheapest = min(bits for _, bits in curves.values())
    best = None
    for width, (gains, bits) in sorted(curves.items()):
        offset = -(-(bits - cheapest) // step)
        if offset > units:
            continue
        rank = min(units - offset, len(gains))
        error = gains[rank:].sum().item()
        if best is None or error < best[0]:
            best = (error, width, rank)
    return best[1], best[2]


def correction_bits(shape: tuple[int, int], rank: int, dtype: torch.dtype, config: CompensateConfig, packed: bool = True) -> int:
    """Bits a rank-``rank`` correction of an (out, in) layer stores: factors in ``dtype``, or quantized with ``config.factor_bits``.

    ``packed=False``: without the packing's rounding to whole blocks of 8 codes (the price of one rank step).

    Example:
        >>> correction_bits((256, 256), 2, torch.bfloat16, CompensateConfig(base="rtn:3"))
        16384
    """
    out, inp = shape
    if config.factor_bits is None or rank == 0:
        return rank * (out + inp) * value_bits(dtype)
    if not packed:  # a row of down (in codes) and of upᵀ (out codes), each with its groups' zero points and float16 scales
        bits, groups = config.factor_bits, config.factor_groups
        return rank * (bits * (out + inp) + (num_groups(inp, groups) + num_groups(out, groups)) * (16 + bits))
    return factor_storage_bits(out, inp, rank, config.factor_bits, config.factor_groups)


def split_bits(module: nn.Module) -> tuple[int, int]:
    """(base bits, correction bits) a compensated layer stores; the bias counts with the base."""
    if isinstance(module, QuantizedCorrectionLinear):
        correction = module.correction_storage_bits()
    elif isinstance(module, (LowRankQuantLinear, LowRankPlusSparseLinear)):
        correction = module.rank * (module.in_features + module.out_features) * value_bits(module.up.weight.dtype)
    else:
        raise LowrankError(f"{type(module).__name__} is not a compensated layer")
    return module.storage_bits() - correction, correction


@torch.no_grad()
def compensate_(
    model: nn.Module,
    stats: dict[str, LayerStatistics],
    config: CompensateConfig | None = None,
    rank: int | None = None,
    budget: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Base-compress every targeted layer and add its EoRA correction, in place.

    Args:
        model: the dense model (modified in place).
        stats: calibration statistics (``lowrank.calibrate``; ``gradients=True`` makes a
            ``budget`` allocation loss-aware).
        config: the options; default ``CompensateConfig()`` (GPTQ 4-bit, groups of 64).
        rank: one correction rank for every layer, or
        budget: extra storage for the corrections as a fraction of the bases' bits.
        include / exclude: layer selection, as in :func:`lowrank.nn.find_targets`.
        progress: show a progress bar.

    Returns:
        The :class:`~lowrank.CompressionReport` to save with (``lowrank.save``). Its
        ``parameters`` add ``base_bits`` and ``correction_bits`` (all stored bits of the targeted
        layers: codes, zero points, scales, sparse values and indices; factors); ``plan.ratio`` is
        the fraction of the targeted layers' dense storage removed.

    Example:
        >>> stats = lowrank.calibrate(model, tokenizer, text, gradients=True)  # doctest: +SKIP
        >>> report = compensate_(model, stats, CompensateConfig(base="gptq:3"), budget=0.05)  # doctest: +SKIP
        >>> lowrank.save(model, "out/gptq3-eora", report=report, tokenizer=tokenizer)  # doctest: +SKIP
    """
    config = config if config is not None else CompensateConfig()
    plan = compensation_ranks(model, stats, config, rank=rank, budget=budget, include=include, exclude=exclude)
    report = compress_(model, plan, method=METHOD, stats=stats, config=config, progress=progress)
    base_bits = correction_bits = 0
    for name in plan.ranks:
        base, extra = split_bits(model.get_submodule(name))
        base_bits, correction_bits = base_bits + base, correction_bits + extra
    report.parameters.update(base_bits=base_bits, correction_bits=correction_bits)
    plan.ratio = 1 - report.parameters["targeted_bits_after"] / report.parameters["targeted_bits_before"]
    return report
