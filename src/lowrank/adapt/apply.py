"""The adapt stage: swap targeted linear layers for adapter layers, in place; merge them back."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..nn import find_targets, linear_weight, set_submodule
from .config import INITS, AdapterConfig
from .layer import LoraLinear
from .singular_value import SingularValueLinear

log = logging.getLogger(__name__)

ADAPTER_LAYERS = (LoraLinear, SingularValueLinear)


@dataclass
class AdaptReport:
    """What :func:`adapt_` did.

    Attributes:
        init: the initialization's name.
        layers: adapted layer names.
        trainable_parameters / total_parameters: after adaptation (everything else is frozen).
        base_changed: whether base weights now hold residuals instead of the original weights.
    """

    init: str
    layers: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0
    base_changed: bool = False


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: adapter layer}`` of every adapter in ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ADAPTER_LAYERS)}


def warn_base_changed(what: str) -> None:
    """Say loudly (a ``UserWarning`` and a log warning) that base weights no longer hold the original."""
    message = f"lowrank: {what}. The base weights are no longer the original ones; export with against='original' to use the original base model."
    warnings.warn(message, UserWarning, stacklevel=3)
    log.warning(message)


@torch.no_grad()
def adapt_(model: nn.Module, config: AdapterConfig, stats: dict[str, LayerStatistics] | None = None, progress: bool = False) -> AdaptReport:
    """Replace the targeted linear layers of ``model`` by adapters initialized as ``config`` says (in place).

    Decompositions run in float64 whatever the model's dtype. Every parameter of the model is
    frozen except the adapters'. At step 0 the model computes what it computed before (up to one
    rounding of the residual weights). Works on dense and compressed models alike (the factors of
    a :class:`~lowrank.LowRankLinear` are linear layers too).

    Args:
        model: a dense or compressed model.
        config: :class:`PrincipalConfig`, :class:`MinorConfig`, :class:`CovarianceConfig`,
            :class:`SingularValueConfig` or :class:`RandomConfig`.
        stats: calibration statistics (``lowrank.calibrate``), needed by the covariance init.
        progress: show a progress bar.

    Returns:
        An :class:`AdaptReport`.

    Example:
        >>> report = adapt_(model, PrincipalConfig(rank=8))  # doctest: +SKIP
        >>> report.trainable_parameters  # doctest: +SKIP
    """
    if not isinstance(config, AdapterConfig) or config.name not in INITS or INITS[config.name].config_class is not type(config):
        raise LowrankError(f"{type(config).__name__} is not an adapter config; use PrincipalConfig, MinorConfig, ...")
    config.validate()
    if adapter_layers(model):
        raise LowrankError("this model already has adapters; merge them (merge_adapters_) or start from the plain model")
    names = find_targets(model, include=config.include, exclude=config.exclude)
    if config.needs_statistics:
        if stats is None:
            raise LowrankError(f"the {config.name} init needs calibration statistics; pass stats=lowrank.calibrate(...) (CLI: --calib FILE)")
        missing = [name for name in names if name not in stats]
        if missing:
            raise LowrankError(f"no calibration statistics for layer {missing[0]}; calibrate the same target layers")
    for name in names:
        if not torch.isfinite(linear_weight(model.get_submodule(name))).all():
            raise LowrankError(f"layer {name} has NaN or Inf weights; repair the checkpoint or exclude that layer")

    model.requires_grad_(False)
    build = INITS[config.name].build
    for name in tqdm(names, desc=f"adapt ({config.name})", disable=not progress, unit="layer"):
        layer = model.get_submodule(name)
        set_submodule(model, name, build(layer, stats.get(name) if stats else None, config, name))
    if config.changes_base:
        warn_base_changed(f"adapt_ ({config.name} init) moved r components out of {len(names)} base weights into the adapters")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("adapted %d layers with the %s init: %d trainable of %d parameters", len(names), config.name, trainable, total)
    return AdaptReport(config.name, names, trainable, total, config.changes_base)


def base_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter replaced by its (residual) ``base_layer``."""
    copied = copy.deepcopy(model)
    for name, layer in adapter_layers(copied).items():
        set_submodule(copied, name, layer.base_layer)
    return copied


@torch.no_grad()
def merge_adapters_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weight (in place) and put the plain layer back.

    The merged model computes what the adapted model computes, with no extra cost per token.

    Example:
        >>> merge_adapters_(model)  # doctest: +SKIP
    """
    for name, layer in adapter_layers(model).items():
        merged = layer.merged_weight().to(torch.float64)
        base = layer.base_layer
        linear_weight(base).copy_(merged)
        set_submodule(model, name, base)
    return model
