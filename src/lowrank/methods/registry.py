"""Method name → factorizer. Adding a method means adding one file that calls :func:`register_method`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..registry import Registry


@dataclass(frozen=True)
class Method:
    """A factorization method.

    Attributes:
        name: what users type after ``--method``.
        config_class: the method's dataclass config (all fields defaulted).
        factorize: pure function ``(weight (out, in), statistics or None, rank, config) -> factors``.
        build: ``(factors, bias, dtype) -> module`` replacing the linear layer.
        needs_statistics: whether calibration statistics are required.
        needs_gradients: whether those statistics must include Fisher information (a backward pass).
        description: one line for ``--help`` and the README.
        sequential: whether the method compresses block by block against the dense model's outputs
            (closed-form refit), so :func:`lowrank.compress_` needs calibration batches.
        reads_statistics: whether calibration statistics change the result when given (always true
            when ``needs_statistics``; options such as ``whiten=true`` make optional use of them).
        nested: whether the rank-r factors are the first r components of the full factors, so an
            ``--elastic`` model of this method can be resized by truncation.
        needs_weight_gradients: whether the gradient statistics must include squared *weight*
            gradients (``weight_grad_sq``); others need only output gradients, a cheaper backward pass.
        fisher_weighted: whether the factorization minimizes the whitened error with outputs
            weighted by √(output Fisher), so the ``global`` allocator's loss curve is the method's
            own spectrum; otherwise it scales the whitened spectrum by the mean Fisher.
        plan: ``(model, ratio, stats=, strategy=, include=, exclude=, allow_dense=,
            strategy_config=, config=) -> Plan``, for a method that makes its own plan (whole
            modules, or per-layer options): :func:`lowrank.allocate` calls it instead of a
            per-matrix strategy, with the method's options as ``config`` (older callers passed
            them as ``strategy_config``, which is still read). ``None``: the strategies' plan.
        output_gram: ``(model, targets, config) -> layer names`` whose full output Fisher
            (``LayerStatistics.output_fisher_matrix``) the method reads with those options;
            calibration with gradients collects it for them (``output_gram=``). ``None``: none.
    """

    name: str
    config_class: type
    factorize: Callable[[torch.Tensor, LayerStatistics | None, int, Any], Any]
    build: Callable[[Any, torch.Tensor | None, torch.dtype], nn.Module]
    needs_statistics: bool
    description: str
    needs_gradients: bool = False
    sequential: bool = False
    reads_statistics: bool = True
    nested: bool = True
    needs_weight_gradients: bool = False
    fisher_weighted: bool = False
    plan: Callable | None = None
    output_gram: Callable | None = None


# Every module of lowrank.methods registers its methods when imported; the registry imports them all.
METHODS: Registry[Method] = Registry("method", "lowrank.methods")


def register_method(method: Method) -> Method:
    """Make ``method`` available under ``method.name`` (``--method``)."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a one-line error listing the known ones."""
    return METHODS.get_entry(name)


def method_names() -> list[str]:
    return METHODS.names()


def output_gram_layers(method: Method, model: nn.Module, targets, config) -> list[str]:
    """The layers whose full output Fisher ``method`` reads with the options ``config`` (:attr:`Method.output_gram`),
    for ``calibrate(..., output_gram=)``; none for most methods.

    Example:
        >>> output_gram_layers(get_method("whiten"), None, [], None)
        []
    """
    return list(method.output_gram(model, targets, config)) if method.output_gram is not None else []


def choices_plan(method: str, config_class: type, option: str, planner: Callable[[], Callable]) -> Callable:
    """A :attr:`Method.plan` for a method whose option ``option`` lists structures the ``global``
    knapsack chooses among per layer (``lowrank-quant``'s ``bit_choices``, ``lowrank-sparse``'s
    ``sparse_choices``); without choices (or at ratio 0) the per-matrix strategies plan it as any
    method, ``strategy_config`` then going to the strategy unless it is this method's config.

    Args:
        method: the method's name (for the plan and the error message).
        config_class: its config dataclass, whose ``choices`` property parses ``option``.
        option: the option's name.
        planner: returns the choices planner, ``(model, ratio, stats, config, include=, exclude=,
            allow_dense=) -> Plan``; called late, because :mod:`lowrank.allocation` imports the methods.
    """

    def plan(model, ratio: float, stats=None, strategy: str = "uniform", include=None, exclude=None, allow_dense: bool = True, strategy_config=None, batches=None, predict_error=None, config=None, **_):
        from ..allocation.allocate import allocate_matrices

        if isinstance(strategy_config, config_class):  # the method's options passed the older way
            config, strategy_config = config or strategy_config, None
        if config is not None and not isinstance(config, config_class):
            raise LowrankError(f"{method} takes a {config_class.__name__}, got {type(config).__name__}")
        if config is None or not config.choices or ratio == 0.0:
            return allocate_matrices(model, ratio, method, stats, strategy, include, exclude, allow_dense, batches, strategy_config, predict_error)
        if strategy != "global":
            raise LowrankError(f"{method}'s {option} are chosen by --allocate global, not {strategy}; pass --allocate global or drop {option}")
        return planner()(model, ratio, stats, config, include=include, exclude=exclude, allow_dense=allow_dense)

    return plan
