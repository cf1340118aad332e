"""Cross-layer correction for ``modegpt``: compress block by block, refitting what each unit keeps.

One-shot ``modegpt`` sizes and fits every unit from the dense model's statistics, so a block after
compressed ones is fit to inputs it no longer receives. With ``sequential`` calibration batches,
:func:`compress_modegpt_sequentially_` compresses the blocks in order, stage by stage inside a block
(q/k/v, then o, then gate/up, then down: :func:`lowrank.calibration.paired.input_stages`), and fits
each stage to reproduce the *dense* model's outputs from the inputs the compressed stages before it
produce, under the anchored objective of :mod:`lowrank.linalg.cross_layer`
((1 − α)‖WX − W′X̃‖² + α‖(W − W′)X‖², α = ``anchor``):

- a layer the plan factors (attention layers, units that fell back): the anchored refit of
  :func:`lowrank.compress.refit_layer`, as ``--sequential --anchor`` does for any method;
- a shrunk gated MLP: its neurons are chosen and sized as the plan says (one-shot statistics; the
  plan already paid for them), the kept gate/up rows are refit at full rank to the dense rows' outputs
  (:func:`~lowrank.linalg.cross_layer.anchored_target`), and down_proj, once the MLP's own inputs have
  changed, to the dense MLP's output from the kept neurons' compressed activations
  (:func:`~lowrank.linalg.cross_layer.anchored_subset_refit`, which is the Nyström refit at α = 1);
- value/output (type III) and query/key (type II) units are shrunk from the one-shot statistics
  at their stage, so that every later stage sees them.

Each refit is kept only where it reproduces the dense output better on the calibration tokens than
what it replaces (Fisher-weighted per output when the statistics have gradients); the report's
``refit_errors`` holds both errors per layer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation.plan import Plan
from ..calibration import LayerStatistics
from ..calibration.paired import BlockStream, PairedStatistics, collect_paired_statistics, input_stages
from ..compress import CompressionReport, block_groups, layer_replacer, refit_layer
from ..configs import config_to_dict
from ..linalg.cross_layer import anchored_subset_refit, anchored_target, weighted_shifted_error
from ..nn import linear_bias, linear_weight, set_submodule
from ..nn.resized_linear import ResizedLinear
from .modegpt_attention import AttentionUnit, shrink_value_output
from .modegpt_query_key import QueryKeyUnit, shrink_query_key
from .registry import get_method

log = logging.getLogger(__name__)


def _keep_better(model: nn.Module, name: str, target: torch.Tensor, current: torch.Tensor, refit: torch.Tensor, pair: PairedStatistics, weights) -> dict[str, float]:
    """Put ``refit`` into layer ``name`` unless ``current`` (its weight now) reproduces the dense output
    ``target``·x better on the calibration tokens, judged as :func:`lowrank.compress.refit_layer` judges
    (per output weighted by ``weights``); returns both errors, unweighted as the report holds them."""
    errors = {"refit": weighted_shifted_error(target, refit, pair), "without_refit": weighted_shifted_error(target, current, pair)}
    # (The tolerance keeps round-off ties, e.g. the first block, whose inputs are not shifted, out of the log.)
    if weighted_shifted_error(target, refit, pair, weights) <= weighted_shifted_error(target, current, pair, weights) * (1 + 1e-9):
        layer = model.get_submodule(name)
        layer.weight.data.copy_(refit.to(layer.weight.dtype))
    else:
        log.info("cross-layer: %s keeps its one-shot fit, which reproduces the dense output better", name)
        errors["refit"], errors["fell_back"] = errors["without_refit"], 1.0
    return errors


@torch.no_grad()
def compress_modegpt_sequentially_(
    model: nn.Module,
    plan: Plan,
    stats: dict[str, LayerStatistics],
    config,
    batches: Sequence[dict[str, torch.Tensor]],
    anchor: float,
    mlps: dict,
    values: dict,
    query_keys: dict,
    progress: bool = True,
    orders: dict | None = None,
) -> tuple[dict[str, int], dict[str, dict], dict[str, dict[str, float]]]:
    """Apply a ``modegpt`` plan block by block with the cross-layer correction (see the module docstring).

    Args:
        model: the dense model (modified in place).
        plan: the ``modegpt`` plan.
        stats: the one-shot calibration statistics the plan was made from.
        config: the :class:`~lowrank.methods.modegpt.ModegptConfig`.
        batches: calibration batches (the same tokens through the dense and the compressed model).
        anchor: α in [0, 1] of the anchored objective.
        mlps / values / query_keys: ``{unit name: (unit, kept size)}`` of the units the plan shrinks.
        progress: show a progress bar.
        orders: ``{MLP unit name: its neuron order}`` where the plan carries one (else recomputed).

    Returns:
        (ranks of the factored layers, module entries of every replaced layer, refit errors per layer).
    """
    from .modegpt import _shrink_unit, factored_method

    dense = copy.deepcopy(model)  # the reference whose outputs every stage must match
    members = {name for table in (mlps, values, query_keys) for unit, _ in table.values() for name in unit.members}
    factored = {name: rank for name, rank in plan.ranks.items() if name not in members}
    method, factored_config = factored_method(config)
    spec = get_method(method)
    sub_plan = Plan(ratio=plan.ratio, strategy=plan.strategy, shapes={name: plan.shapes[name] for name in factored}, ranks=factored)
    sub_report = CompressionReport(method=method, method_config=config_to_dict(factored_config), plan=sub_plan)
    replace = layer_replacer(model, sub_plan, spec, factored_config, sub_report)
    by_layer = {unit.gate: unit for unit, _ in mlps.values()} | {unit.up: unit for unit, _ in mlps.values()}
    by_down = {unit.down: (unit, kept) for unit, kept in mlps.values()}
    first_of = {unit.value: (unit, kept) for unit, kept in values.values()} | {unit.query: (unit, kept) for unit, kept in query_keys.values()}
    kept_neurons: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    refit_errors: dict[str, dict[str, float]] = {}

    names = list(factored) + sorted(members, key=list(plan.shapes).index)
    streams = BlockStream.for_models(dense, model, batches)  # each block's statistics from that block alone
    for block, block_names in tqdm(block_groups(model, names), desc="compress (modegpt, sequential)", disable=not progress, unit="block"):
        stream = streams.seek(dense, model, block) if streams is not None else None
        for stage in input_stages(model, block_names, batches[0], stop_after=block, stream=stream):
            for name in stage:  # attention units: shrunk at their first layer's stage (their second reads it)
                if name in first_of:
                    unit, kept = first_of[name]
                    if isinstance(unit, AttentionUnit):
                        modules.update(shrink_value_output(model, unit, kept, stats, config.fisher_damp, config.value_metric))
                    elif isinstance(unit, QueryKeyUnit):
                        modules.update(shrink_query_key(model, unit, kept, stats, config.fisher_damp))
            fitted = [name for name in stage if name in factored or name in by_layer or name in by_down]
            if not fitted:
                continue
            paired = collect_paired_statistics(dense, model, fitted, batches, stop_after=stage[-1], stream=stream)
            for name in fitted:
                weight = linear_weight(dense.get_submodule(name)).detach()
                if name in factored:
                    refit_errors[name] = refit_layer(name, weight, paired[name], stats.get(name), anchor, model, sub_plan, spec, factored_config, replace)
                    continue
                pair, weights = paired[name], stats[name].output_fisher
                current = model.get_submodule(name).weight.detach().double() if name in by_down else None
                if name in by_layer:
                    unit = by_layer[name]
                    if unit.name not in kept_neurons:  # the unit's first layer at this stage: shrink it one-shot
                        entries, kept_neurons[unit.name] = _shrink_unit(model, unit, mlps[unit.name][1], stats, config, (orders or {}).get(unit.name))
                        modules.update(entries)
                    # Its kept rows, refit at full rank to the dense rows' outputs from the shifted inputs.
                    rows = kept_neurons[unit.name].to(weight.device)
                    target, weights = weight.double()[rows], None if weights is None else weights[rows.to(weights.device)]
                    refit = anchored_target(target, pair.dense_xtx, pair.cross, pair.shifted_xtx, anchor, name=name).target
                    refit_errors[name] = _keep_better(model, name, target, target, refit, pair, weights)
                else:  # down_proj: the dense MLP output from the kept neurons' compressed activations
                    kept = kept_neurons[by_down[name][0].name].to(current.device)
                    refit = anchored_subset_refit(weight, pair.dense_xtx, pair.cross, pair.shifted_xtx, kept, anchor, config.damp, name=name)
                    refit_errors[name] = _keep_better(model, name, weight.double(), current, refit, pair, weights)
    modules.update(sub_report.modules)
    refit_errors = {name: refit_errors[name] for name in names if name in refit_errors}
    return factored, modules, refit_errors


__all__ = ["compress_modegpt_sequentially_"]
