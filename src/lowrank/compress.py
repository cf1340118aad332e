"""The compression stage: swap targeted linear layers for factored ones, in place."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Plan
from .calibration import InputStatistics, LayerStatistics
from .calibration.statistics import one_pass
from .calibration.paired import BlockStream, collect_paired_statistics, input_stages
from .configs import config_to_dict
from .errors import LowrankError
from .evaluation.size import count_parameters
from .linalg.cross_layer import anchored_target, weighted_shifted_error
from .linalg.refit import shifted_output_error
from .methods import get_method
from .nn import ReplacementLinear, find_blocks, linear_bias, linear_weight, set_submodule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class CompressionReport:
    """What :func:`compress_` did; saved as ``lowrank_config.json`` beside the weights.

    Attributes:
        method / method_config: the factorization and its options.
        plan: the allocation plan that was applied.
        modules: ``{name: {"structure": class name, "in_features", "out_features", "bias", **spec}}``
            for every replaced layer (what :func:`lowrank.load` needs to rebuild the model).
        parameters: exact counts before/after, for the targeted layers and the whole model, plus
            the bits the targeted layers store (values, indices, scales, packed codes).
    """

    method: str
    method_config: dict
    plan: Plan
    modules: dict[str, dict] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    refit_errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "method": self.method,
            "method_config": self.method_config,
            "ratio": self.plan.ratio,
            "allocation": self.plan.strategy,
            "parameters": self.parameters,
            "modules": self.modules,
            "plan": self.plan.to_dict(),
            "refit_errors": self.refit_errors,
        }


def block_groups(model: nn.Module, names) -> list[tuple[str | None, list[str]]]:
    """Layers grouped by the block that holds them, in execution order; others last (no block)."""
    groups: list[tuple[str | None, list[str]]] = []
    remaining = list(names)
    for stack_name, stack in find_blocks(model):
        for index in range(len(stack)):
            prefix = f"{stack_name}.{index}."
            members = [name for name in remaining if name.startswith(prefix)]
            if members:
                groups.append((prefix[:-1], members))
                remaining = [name for name in remaining if name not in members]
    if remaining:
        groups.append((None, remaining))
    return groups


def _compress_sequentially(model, plan, spec, config, stats, batches, replace, report, progress, anchor: float | None, staged: bool) -> None:
    dense = copy.deepcopy(model)  # the reference whose outputs every compressed layer must match
    streams = BlockStream.for_models(dense, model, batches)  # each block's statistics from that block alone
    for block, names in tqdm(block_groups(model, plan.ranks), desc=f"compress ({spec.name}, sequential)", disable=not progress, unit="block"):
        stream = streams.seek(dense, model, block) if streams is not None else None
        # Staged: o_proj is refit after q/k/v are replaced, so it sees the inputs the finished model feeds it.
        stages = input_stages(model, names, batches[0], stop_after=block, stream=stream) if staged else [names]
        for stage in stages:
            paired = collect_paired_statistics(dense, model, stage, batches, stop_after=stage[-1] if staged else block, stream=stream)
            for name in stage:
                layer = stats.get(name) if stats else None
                report.refit_errors[name] = refit_layer(name, linear_weight(dense.get_submodule(name)).detach(), paired[name], layer, anchor, model, plan, spec, config, replace)


def layer_replacer(model: nn.Module, plan: Plan, spec, config: Any, report: CompressionReport):
    """``replace(name, target, layer_stats)``: factor ``target`` (the layer's weight, or a refit's
    target) at the plan's rank, swap the result into ``model`` and record it in ``report.modules``;
    returns the new module."""

    def replace(name: str, target: torch.Tensor, layer_stats: LayerStatistics | None) -> nn.Module:
        layer = model.get_submodule(name)
        weight, bias = linear_weight(layer), linear_bias(layer)
        factors = spec.factorize(target, layer_stats, plan.ranks[name], layer_config(config, plan, name), name=name)
        replacement = spec.build(factors, bias, weight.dtype).to(device=weight.device)
        set_submodule(model, name, replacement)
        out_features, in_features = weight.shape
        report.modules[name] = {
            "structure": type(replacement).__name__,
            "in_features": in_features,
            "out_features": out_features,
            "bias": bias is not None,
            **replacement.spec(),
        }
        return replacement

    return replace


def refit_layer(name, weight, pair, layer, anchor, model, plan, spec, config, replace) -> dict[str, float]:
    """Replace one layer by its (anchored) refit, or by its uncorrected fit where that is better; return both errors.

    ``anchor`` ``None`` is the refit as it always was (no fallback); a number α also falls back.
    """
    correct = anchor is not None
    anchor = anchor or 0.0
    # anchor = 0 is the plain refit P = W·XX̃ᵀ(X̃X̃ᵀ)⁻¹ under X̃X̃ᵀ; above 0 the dense inputs pull it toward W.
    anchored = anchored_target(weight, pair.dense_xtx, pair.cross, pair.shifted_xtx, anchor, name=name)
    abs_sum = pair.shifted_abs_sum
    if anchor > 0 and layer is not None:  # Σ|x| of the same token mixture (the dense sums rescaled to the paired token count)
        abs_sum = (1 - anchor) * abs_sum + anchor * layer.abs_sum.double().to(abs_sum.device) * (pair.num_tokens / max(layer.num_tokens, 1))
    shifted = LayerStatistics(
        InputStatistics(xtx=anchored.gram, abs_sum=abs_sum, num_tokens=pair.num_tokens),
        output_grad_sq=layer.output_grad_sq if layer is not None else None,
        weight_grad_sq=layer.weight_grad_sq if layer is not None else None,
        num_grad_tokens=layer.num_grad_tokens if layer is not None else 0,
    )
    original = model.get_submodule(name)
    refit = replace(name, anchored.target, shifted).to_dense()
    plain = spec.factorize(weight, layer, plan.ranks[name], layer_config(config, plan, name), name=name).dense()
    errors = {
        "refit": shifted_output_error(weight, refit, pair.dense_xtx, pair.cross, pair.shifted_xtx),
        "without_refit": shifted_output_error(weight, plain, pair.dense_xtx, pair.cross, pair.shifted_xtx),
    }
    # Neither an anchored fit nor a structured method's refit is the minimizer of the calibration
    # objective ‖WX − W′X̃‖; where it is worse there than the uncorrected fit, that fit stays.
    weights = shifted.output_fisher if spec.fisher_weighted else None
    # (The tolerance keeps round-off ties, e.g. the first block, whose inputs are not shifted, out of the log.)
    if correct and weighted_shifted_error(weight, refit, pair, weights) > weighted_shifted_error(weight, plain, pair, weights) * (1 + 1e-9):
        log.info("cross-layer: %s keeps its uncorrected fit, which reproduces the dense output better", name)
        set_submodule(model, name, original)
        replace(name, weight, layer)
        errors["refit"], errors["fell_back"] = errors["without_refit"], 1.0
    return errors


def _layer_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def storage_bits(module: nn.Module) -> int:
    """Bits a layer stores: a replacement's ``storage_bits()`` (indices, scales, packed codes), a dense layer's tensors."""
    if isinstance(module, ReplacementLinear):
        return int(module.storage_bits())
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(tensor.numel() * tensor.element_size() * 8 for tensor in tensors)


@torch.no_grad()
def cast_(model: nn.Module, dtype: torch.dtype, counts: dict | None = None, names=()) -> nn.Module:
    """Cast a (compressed) model's floating weights to ``dtype`` in place, and recount its storage.

    ``model.to(dtype)`` would also cast buffers whose dtype is part of a layer's stored format (the
    float16 scales of a quantized residual): a module lists those in ``fixed_dtype_buffers`` and
    they are kept. With ``counts`` (a report's ``parameters``) and the targeted layer ``names``, the
    bit counts are recomputed for the new dtype (the dense layers' counts scaled to it, the
    compressed layers' counted from what they now store).
    """
    former = linear_weight_bits(model.get_submodule(next(iter(names)))) if counts is not None and names else 0
    for module in model.modules():
        keep = set(getattr(module, "fixed_dtype_buffers", ()))
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and name not in keep:
                module._buffers[name] = buffer.to(dtype)
    if former and "targeted_bits_before" in counts:
        # The dense layers were stored in the model's former dtype: the same values in `dtype`.
        counts["targeted_bits_before"] = counts["targeted_bits_before"] * torch.finfo(dtype).bits // former
        counts["targeted_bits_after"] = sum(storage_bits(model.get_submodule(name)) for name in names)
    return model


def linear_weight_bits(module: nn.Module) -> int:
    """Bits of one value of the layer's floating weights (its first floating parameter)."""
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    return torch.finfo(parameter.dtype).bits if parameter is not None else 0


def _finite_statistics(layer: LayerStatistics) -> bool:
    tensors = [layer.xtx, layer.abs_sum, layer.output_grad_sq, layer.weight_grad_sq]
    return all(torch.isfinite(tensor).all() for tensor in tensors if tensor is not None)


@torch.no_grad()
def layer_config(config: Any, plan: Plan, name: str) -> Any:
    """The method's config for layer ``name``: ``config`` with the options the plan sets for that
    layer (``plan.details["layer_options"]``, e.g. the bit width ``lowrank-quant``'s allocation chose)."""
    options = plan.details.get("layer_options", {}).get(name)
    return dataclasses.replace(config, **options) if options else config


def compress_(
    model: nn.Module,
    plan: Plan,
    method: str = "whiten",
    stats: dict[str, LayerStatistics] | None = None,
    config: Any = None,
    sequential: Sequence[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
    anchor: float | None = None,
) -> CompressionReport:
    """Factor every layer in ``plan`` with ``method`` and swap it into ``model`` (in place).

    With ``sequential`` calibration batches, blocks are compressed in order and every layer is fit
    to reproduce the *dense* layer's output from the inputs that the already-compressed layers
    before it produce: its statistics are re-collected on the compressed model (with ``anchor`` set,
    stage by stage inside a block: q/k/v, then o, then gate/up, then down, each stage seeing its own
    block's compressed stages), and the target W becomes the least-squares refit P = W·XX̃ᵀ(X̃X̃ᵀ)⁻¹ (see
    :mod:`lowrank.linalg.refit`). For ``whiten`` this is the exact rank-r minimizer of ‖WX − W′X̃‖.
    ``anchor`` α > 0 minimizes (1 − α)‖WX − W′X̃‖² + α‖(W − W′)X‖² instead, which keeps the
    correction from fitting the calibration text alone (:mod:`lowrank.linalg.cross_layer`). A
    layer whose corrected fit reproduces the dense output worse on the calibration tokens than the
    one-shot fit keeps the one-shot fit; ``report.refit_errors`` records both errors per layer.

    Factorization runs in float64 (or the method's ``precision``) whatever the model's dtype; the
    new modules are cast back to each layer's dtype and device. The model keeps no record of this:
    pass the returned report to :func:`lowrank.save`.

    Args:
        model: the dense model (modified in place).
        plan: from :func:`lowrank.allocate`.
        method: a registered method name (``"svd"``, ``"whiten"``, ...).
        stats: calibration statistics, required by data-aware methods.
        config: the method's config dataclass; default: its defaults.
        sequential: calibration batches (e.g. ``{"input_ids": ...}``) for sequential refitting;
            ``None`` factorizes every layer from ``stats`` alone.
        progress: show a progress bar.
        anchor: ``None`` (default): the sequential refit as before (each block's statistics collected
            once, no anchor, no fallback). α in [0, 1]: the cross-layer correction: statistics
            collected stage by stage, the anchored objective, the fallback; 0 is the unanchored
            staged refit, 1 the one-shot fit.

    Returns:
        A :class:`CompressionReport` with exact parameter counts.

    Raises:
        LowrankError: if ``model`` already holds compressed layers (start from the dense model), or
            the method's inputs are missing or unusable (nothing is changed then).

    Example:
        >>> report = compress_(model, plan, method="whiten", stats=stats)  # doctest: +SKIP
        >>> report.parameters["targeted_after"]  # doctest: +SKIP
        >>> lowrank.save(model, "out/pycode-30", report=report)  # doctest: +SKIP
    """
    compressed = next((name for name, module in model.named_modules() if isinstance(module, ReplacementLinear)), None)
    if compressed is not None:
        raise LowrankError(f"this model is already compressed (layer {compressed}); start from the dense model")
    spec = get_method(method)
    if getattr(spec, "compress", None) is not None:  # a method that shrinks whole modules (modegpt) has its own verb
        if sequential is None:
            return spec.compress(model, plan, stats, config, progress)
        if not spec.corrects:
            raise LowrankError(f"method {method!r} has no sequential refit; compress it without --sequential")
        return spec.compress(model, plan, stats, config, progress, sequential=sequential, anchor=anchor)
    return compress_layers_(model, plan, method=method, stats=stats, config=config, sequential=sequential, progress=progress, anchor=anchor)


@torch.no_grad()
def compress_layers_(model: nn.Module, plan: Plan, *, method: str, stats: dict | None, config: Any, sequential, progress: bool, anchor: float | None = None, staged: bool | None = None) -> CompressionReport:
    """:func:`compress_` (same arguments, all by name) for a model that may already hold compressed layers outside ``plan``.

    The block-by-block pipeline compresses one block's layer groups in turn, each with its own
    report; a user compresses a whole model with :func:`compress_`, whose report then covers every
    compressed layer (what :func:`lowrank.save` checks).
    ``staged`` (default: whether ``anchor`` is set) collects a block's sequential statistics stage by
    stage; ``False`` collects them once, before any of its layers is replaced (the refit as it was;
    ``benchmarks/cross_layer.py`` compares the two).
    """
    spec = get_method(method)
    config = config if config is not None else spec.config_class()
    if not isinstance(config, spec.config_class):
        raise LowrankError(f"method {method!r} takes a {spec.config_class.__name__}, got {type(config).__name__}")
    if spec.needs_statistics and stats is None:
        raise LowrankError(f"method {method!r} needs calibration statistics; pass --calib FILE (or stats=calibrate(...))")
    if spec.sequential and sequential is None:
        raise LowrankError(f"method {method!r} refits block by block; pass sequential=calibration_batches(...) (the CLI does)")
    if anchor is not None and not 0.0 <= anchor <= 1.0:
        raise LowrankError(f"the cross-layer anchor must lie in [0, 1] (0: plain refit, 1: no correction), got {anchor}")
    if anchor is not None and sequential is None:
        raise LowrankError("anchor applies to the sequential refit; pass sequential=calibration_batches(...) too, or drop anchor")
    staged = anchor is not None if staged is None else staged
    targeted_before = sum(_layer_parameters(model.get_submodule(name)) for name in plan.shapes)
    bits_before = sum(storage_bits(model.get_submodule(name)) for name in plan.shapes)
    model_before = count_parameters(model)

    # Check every weight before changing anything, so a bad checkpoint leaves the model untouched.
    for name in plan.ranks:
        weight = linear_weight(model.get_submodule(name))
        if not torch.isfinite(weight).all():
            raise LowrankError(f"layer {name} has NaN or Inf weights; repair the checkpoint or --exclude that layer")
    if spec.needs_statistics:
        missing = [name for name in plan.ranks if name not in stats]
        if missing:
            raise LowrankError(f"no calibration statistics for layer {missing[0]}; calibrate with the same --include/--exclude")
    if stats is not None:
        for name in plan.ranks:
            if name in stats and not _finite_statistics(stats[name]):
                raise LowrankError(
                    f"the calibration statistics of layer {name} hold NaN or Inf (the model overflows on the calibration text "
                    "in its dtype); calibrate in float32 (load with dtype='float32') or pass cleaner --calib text"
                )
    if spec.needs_gradients and any(stats[name].output_fisher is None for name in plan.ranks):
        raise LowrankError(f"method {method!r} needs gradient statistics; calibrate with gradients=True")

    report = CompressionReport(method=method, method_config=config_to_dict(config), plan=plan)
    replace = layer_replacer(model, plan, spec, config, report)
    if sequential is None:
        # Layers the plan keeps dense never fetch their input's whitening: release it without them.
        with one_pass(stats, plan.ranks):
            for name in tqdm(plan.ranks, desc=f"compress ({method})", disable=not progress, unit="layer"):
                replace(name, linear_weight(model.get_submodule(name)), stats.get(name) if stats else None)
    else:
        _compress_sequentially(model, plan, spec, config, stats, sequential, replace, report, progress, anchor, staged)

    targeted_after = sum(_layer_parameters(model.get_submodule(name)) for name in plan.shapes)
    report.parameters = {
        "targeted_before": targeted_before,
        "targeted_after": targeted_after,
        "targeted_bits_before": bits_before,
        "targeted_bits_after": sum(storage_bits(model.get_submodule(name)) for name in plan.shapes),
        "model_before": model_before,
        "model_after": count_parameters(model),
    }
    log.info(
        "compressed %d of %d targeted layers with %s: targeted parameters %d → %d (%.1f %% removed)",
        len(plan.ranks),
        len(plan.shapes),
        method,
        targeted_before,
        targeted_after,
        100 * (1 - targeted_after / targeted_before),
    )
    return report
