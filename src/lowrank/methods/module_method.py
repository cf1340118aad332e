"""Methods that plan and compress whole modules rather than single matrices (MoDeGPT's MLPs, Basis
Sharing's groups of blocks): their registry record, and the steps each shares around its own math —
the one-line checks of the model before anything changes, and the report with exact counts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..configs import config_to_dict
from ..errors import LowrankError
from ..nn import ReplacementLinear, linear_weight
from .registry import Method


@dataclass(frozen=True)
class ModuleMethod(Method):
    """A method that sizes and compresses whole modules, not single matrices: its ``plan``
    (see :class:`~lowrank.methods.registry.Method`) sizes the modules.

    Attributes:
        compress: ``(model, plan, stats, config, progress) -> CompressionReport``.
        corrects: whether ``compress`` also takes ``sequential=`` batches and ``anchor=`` (the
            cross-layer correction).
    """

    compress: Callable | None = field(default=None)
    corrects: bool = False


def check_dense(model: nn.Module) -> None:
    """A one-line error if any layer of ``model`` is already compressed.

    Example:
        >>> check_dense(nn.Sequential(nn.Linear(4, 4)))  # dense: no error
    """
    compressed = next((name for name, module in model.named_modules() if isinstance(module, ReplacementLinear)), None)
    if compressed is not None:
        raise LowrankError(f"this model is already compressed (layer {compressed}); start from the dense model")


def check_layers(model: nn.Module, names: Iterable[str], stats: dict[str, LayerStatistics]) -> None:
    """One-line errors for a layer without calibration statistics or with non-finite weights.

    Example:
        >>> check_layers(nn.ModuleDict({"a": nn.Linear(2, 2)}), ["a"], {})
        Traceback (most recent call last):
        lowrank.errors.LowrankError: no calibration statistics for layer a; calibrate with the same --include/--exclude
    """
    for name in names:
        if name not in stats:
            raise LowrankError(f"no calibration statistics for layer {name}; calibrate with the same --include/--exclude")
        if not torch.isfinite(linear_weight(model.get_submodule(name))).all():
            raise LowrankError(f"layer {name} has NaN or Inf weights; repair the checkpoint or --exclude that layer")


def factor_the_rest(model: nn.Module, plan, members: set[str], method: str, stats, config, progress: bool) -> tuple[dict[str, int], dict[str, dict]]:
    """Factor the plan's layers outside ``members`` (the ones the module method itself replaces)
    one matrix at a time with ``method``; returns their ranks and the report's module entries."""
    from ..allocation.plan import Plan
    from ..compress import compress_layers_

    factored = {name: rank for name, rank in plan.ranks.items() if name not in members}
    if not factored:
        return factored, {}
    sub_plan = Plan(ratio=plan.ratio, strategy=plan.strategy, shapes={name: plan.shapes[name] for name in factored}, ranks=factored)
    report = compress_layers_(model, sub_plan, method=method, stats=stats, config=config, sequential=None, progress=progress)
    return factored, dict(report.modules)


def planned_total(plan, replaced: dict[str, int]) -> int:
    """Weight parameters of the plan's layers after compression: ``replaced`` gives the count of
    each layer the module method itself replaces (a shared basis on one member only), the others
    count as :attr:`Plan.planned_parameters` counts them (factored at their rank, or dense).

    Example:
        >>> from lowrank.allocation import Plan
        >>> plan = Plan(0.5, "uniform", {"a": (4, 4), "b": (4, 4), "c": (4, 4)}, {"a": 1, "b": 2})
        >>> planned_total(plan, {"b": 5})  # a: 1·(4 + 4), b: 5, c: dense 16
        29
    """
    from ..linalg import lowrank_parameters

    return sum(
        replaced[name] if name in replaced else lowrank_parameters(out, inp, plan.ranks[name]) if name in plan.ranks else out * inp
        for name, (out, inp) in plan.shapes.items()
    )


def distinct_parameters(model: nn.Module, names: Iterable[str]) -> int:
    """Parameters of the named layers, each counted once (a basis shared by several, once).

    Example:
        >>> shared = nn.Linear(3, 2, bias=False)
        >>> distinct_parameters(nn.ModuleDict({"a": shared, "b": shared}), ["a", "b"])
        6
    """
    seen, total = set(), 0
    for name in names:
        for parameter in model.get_submodule(name).parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return total


def counts_before(model: nn.Module, plan) -> dict[str, int]:
    """The plan's layers' parameters and stored bits, and the model's parameters, before compression."""
    from ..compress import storage_bits
    from ..evaluation.size import count_parameters

    return {
        "targeted_before": distinct_parameters(model, plan.shapes),
        "targeted_bits_before": sum(storage_bits(model.get_submodule(name)) for name in plan.shapes),
        "model_before": count_parameters(model),
    }


def module_report(method: str, config, plan, modules: dict[str, dict], model: nn.Module, before: dict[str, int]):
    """The :class:`~lowrank.CompressionReport` of a module method: ``modules`` in the plan's order,
    counts before (:func:`counts_before`) and after, from the modules now in ``model``."""
    from ..compress import CompressionReport, storage_bits
    from ..evaluation.size import count_parameters

    order = list(plan.shapes)
    report = CompressionReport(
        method=method, method_config=config_to_dict(config), plan=plan, modules=dict(sorted(modules.items(), key=lambda item: order.index(item[0])))
    )
    report.parameters = {
        "targeted_before": before["targeted_before"],
        "targeted_after": distinct_parameters(model, plan.shapes),
        "targeted_bits_before": before["targeted_bits_before"],
        "targeted_bits_after": sum(storage_bits(model.get_submodule(name)) for name in plan.shapes),
        "model_before": before["model_before"],
        "model_after": count_parameters(model),
    }
    return report
