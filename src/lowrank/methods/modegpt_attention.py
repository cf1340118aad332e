"""MoDeGPT type III for ``modegpt``: each attention's value/output pair keeps k of head_dim value dimensions.

With ``ModegptConfig(attention="value")`` every attention block whose v_proj and o_proj are targeted
(and v_proj has no bias) is one unit: each key/value head g keeps k value dimensions, P_g (k × in)
replacing its v_proj rows and O'_j (out × k) the o_proj columns of every query head j it serves
(grouped-query attention: ``heads / kv_heads`` query heads per key/value head), the best rank-k
approximation of the head's value→output map in the calibration metric — a whitened SVD of the
stacked products O_j·V_g (closed form, derivation and why that map is linear per head in
:mod:`lowrank.linalg.value_output`). All heads of a block keep the same k, so the attention runs
as one call; the layers become :class:`~lowrank.nn.head_resized_linear.HeadPaddedLinear` (v_proj)
and :class:`~lowrank.nn.head_resized_linear.HeadSlicedLinear` (o_proj), which keep the model's
``head_dim`` outside (see there), and load with :func:`lowrank.load` like every structure.

The unit's curve over k is Σ_g Σ_{i>k} σ_{g,i}² (½·Fisher-weighted per token with gradients, as the
MLP units' and the factored layers' curves), priced at k·(heads + kv_heads)·hidden parameters.

``value_metric="o_proj"`` measures the map where o_proj reads it instead: after the attention mix,
with o_proj's input correlation (the metric the factored o_proj's curve is in). Each head's kept
subspace comes from its own query heads' blocks of that correlation, then o_proj is refit to all of
them at once in closed form, so the curve is the block's exact calibration output error given its
attention weights (derivation in :mod:`lowrank.linalg.value_output`). MoDeGPT's metric ignores the
mix (the tokens' average the attention hands o_proj has far less energy than v_proj's inputs when
attention is spread out) and the correlation between heads. The unit is
compared, as the MLP units are, with v_proj and o_proj factored with the same parameters split
between them as well as possible (:class:`PairFactoredForm`: their rank-one components cost
different amounts under grouped-query attention). The unit's curve measures the value path on
v_proj's inputs before the attention mix (MoDeGPT's objective); the factored o_proj's measures it
on the mixed inputs o_proj really reads.

Measured (``benchmarks/results/modegpt-attention*.md``, ``factored=fisher-whiten`` + ``global``): on
the reference model at ratio 0.4 held-out perplexity 13.36 (``v_proj``) / 13.34 (``o_proj``) against
13.44 without type III; on SmolLM2-135M at 0.4 18.18 (``o_proj``, 27 of 30 units shrunk) against
18.65, while ``v_proj`` (blind to the attention mix) gives 19.35.

MoDeGPT's type II (query/key by CR decomposition, ``attention="query_key"`` or ``"all"``) lives in
:mod:`lowrank.methods.modegpt_query_key`; with ``attention="value"`` q_proj and k_proj stay factored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..calibration.statistics import one_pass
from ..linalg.rank import max_factored_rank
from ..linalg.value_output import ValueOutputDecomposition, mixed_value_basis, nested_output_errors, refit_output, value_output_decomposition
from ..linalg.weighted import row_weights
from ..nn import linear_bias, linear_shape, linear_weight, set_submodule
from ..nn.head_resized_linear import HeadPaddedLinear, HeadSlicedLinear, HeadWeight

log = logging.getLogger(__name__)

VALUE_OUTPUT = ("v_proj", "o_proj")


@dataclass
class AttentionUnit:
    """One attention block's value/output pair.

    Attributes:
        name: the attention module (``model.layers.0.self_attn``).
        value / output: the full names of v_proj and o_proj.
        hidden: v_proj's input width (and o_proj's output width).
        heads / kv_heads: query heads and key/value heads.
        head_dim: the value dimensions per head before shrinking.
    """

    name: str
    value: str
    output: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    noun = "value dimensions"

    @property
    def members(self) -> tuple[str, str]:
        return (self.value, self.output)

    @property
    def size(self) -> int:
        return self.head_dim

    @property
    def step(self) -> int:
        """Weight parameters of one value dimension of every head: a v_proj row per key/value head, an o_proj column per query head."""
        return (self.kv_heads + self.heads) * self.hidden

    def member_parameters(self, kept: int) -> dict[str, int]:
        return {self.value: self.kv_heads * kept * self.hidden, self.output: self.hidden * self.heads * kept}

    @property
    def group(self) -> int:
        """Query heads per key/value head (transformers' ``repeat_kv``: query head j reads key/value head j // group)."""
        return self.heads // self.kv_heads


def find_attention_units(model: nn.Module, names: Sequence[str]) -> list[AttentionUnit]:
    """The attention blocks (``v_proj`` and ``o_proj`` children, a ``head_dim`` and a config with
    ``num_attention_heads``, Llama-style) whose v_proj and o_proj are both among ``names``; a v_proj
    with a bias is left out (its bias passes through the attention mix, which the closed form ignores).

    Example:
        >>> [unit.name for unit in find_attention_units(model, lowrank.find_targets(model))]  # doctest: +SKIP
        ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    """
    targeted, units = set(names), []
    for prefix, module in model.named_modules():
        children = dict(module.named_children())
        config = getattr(module, "config", None)
        if not all(child in children for child in VALUE_OUTPUT) or config is None or not isinstance(getattr(module, "head_dim", None), int):
            continue
        value, output = (f"{prefix}.{child}" if prefix else child for child in VALUE_OUTPUT)
        if not {value, output} <= targeted:
            continue
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = module.head_dim
        (value_out, hidden), (out, output_in) = linear_shape(model.get_submodule(value)), linear_shape(model.get_submodule(output))
        if not heads or heads % kv_heads or (value_out, output_in) != (kv_heads * head_dim, heads * head_dim) or out != hidden:
            continue  # not the shapes of a (grouped-query) attention
        if linear_bias(model.get_submodule(value)) is not None:
            log.info("modegpt: %s keeps its value dimensions (v_proj has a bias); its v_proj and o_proj are factored", prefix)
            continue
        units.append(AttentionUnit(prefix, value, output, hidden, heads, kv_heads, head_dim))
    return units


def _weights(unit: AttentionUnit, stats: dict[str, LayerStatistics], fisher_damp: float, device) -> torch.Tensor | None:
    fisher = stats[unit.output].output_fisher
    return None if fisher is None else row_weights(fisher, fisher_damp).to(device)


def _query_columns(unit: AttentionUnit, g: int) -> list[slice]:
    """o_proj's column blocks of the query heads that read key/value head g."""
    return [slice(j * unit.head_dim, (j + 1) * unit.head_dim) for j in range(g * unit.group, (g + 1) * unit.group)]


def head_decompositions(model: nn.Module, unit: AttentionUnit, stats: dict[str, LayerStatistics], fisher_damp: float) -> list[ValueOutputDecomposition]:
    """Per key/value head, the decomposition of its value→output map in MoDeGPT's metric (v_proj's
    inputs, :func:`value_output_decomposition`), o_proj's outputs weighted by √Fisher when the
    statistics have gradients."""
    with one_pass(stats, [unit.value]):  # the root is released after this unit, not kept for q/k
        root = stats[unit.value].whitening().root
    value = linear_weight(model.get_submodule(unit.value)).detach().double().to(root.device)  # (kv·d_h, in)
    output = linear_weight(model.get_submodule(unit.output)).detach().double().to(root.device)  # (out, heads·d_h)
    weights = _weights(unit, stats, fisher_damp, root.device)
    decompositions = []
    for g in range(unit.kv_heads):
        stacked = torch.cat([output[:, columns] for columns in _query_columns(unit, g)])  # (G·out, d_h), query head by query head
        decompositions.append(value_output_decomposition(stacked, value[g * unit.head_dim : (g + 1) * unit.head_dim], root, weights))
    return decompositions


@dataclass
class OutputMetricReduction:
    """The unit in o_proj's metric: per key/value head its basis T_g (rows in order), and the exact
    refit of o_proj to the first k rows of every T_g (see :mod:`lowrank.linalg.value_output`)."""

    unit: AttentionUnit
    value: torch.Tensor  # (kv·d_h, in)
    output: torch.Tensor  # (out, heads·d_h)
    correlation: torch.Tensor  # o_proj's input correlation
    bases: list[torch.Tensor]  # per key/value head, (d_h, d_h)
    weights: torch.Tensor | None

    def _scaled(self, kept: int) -> list[torch.Tensor]:
        """T_g's first k rows, each scaled so that P_g = T_g·V_g keeps the size of V_g's entries."""
        scaled = []
        for g, basis in enumerate(self.bases):
            value = self.value[g * self.unit.head_dim : (g + 1) * self.unit.head_dim]
            t = basis[:kept]
            scale = value.pow(2).mean().sqrt() / (t @ value).pow(2).mean().sqrt() if kept else torch.ones((), dtype=t.dtype)
            scaled.append(t * scale if torch.isfinite(scale) and scale > 0 else t)
        return scaled

    def refit(self, kept: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(P (kv·k, in), O' (out, heads·k), E) at k = ``kept``."""
        t = self._scaled(kept)
        new_output, error = refit_output(self.output, self.correlation, [t[j // self.unit.group] for j in range(self.unit.heads)], self.weights)
        value = torch.cat([t[g] @ self.value[g * self.unit.head_dim : (g + 1) * self.unit.head_dim] for g in range(self.unit.kv_heads)])
        return value, new_output, error

    def errors(self) -> torch.Tensor:
        # All k from one factorization (the spans are nested; scaling T_g changes no span).
        errors = nested_output_errors(self.output, self.correlation, [self.bases[j // self.unit.group] for j in range(self.unit.heads)], self.weights)
        errors[-1] = 0.0  # every dimension kept: exact, whatever the rounding
        return errors


def output_metric_reduction(model: nn.Module, unit: AttentionUnit, stats: dict[str, LayerStatistics], fisher_damp: float) -> OutputMetricReduction:
    """The unit's :class:`OutputMetricReduction` (``value_metric="o_proj"``)."""
    correlation = stats[unit.output].xtx.double()
    value = linear_weight(model.get_submodule(unit.value)).detach().double().to(correlation.device)
    output = linear_weight(model.get_submodule(unit.output)).detach().double().to(correlation.device)
    weights = _weights(unit, stats, fisher_damp, correlation.device)
    bases = []
    for g in range(unit.kv_heads):
        columns = _query_columns(unit, g)
        bases.append(mixed_value_basis([output[:, block] for block in columns], [correlation[block, block] for block in columns], weights))
    return OutputMetricReduction(unit, value, output, correlation, bases, weights)


def value_output_errors(model: nn.Module, unit: AttentionUnit, stats: dict[str, LayerStatistics], fisher_damp: float, metric: str = "v_proj") -> torch.Tensor:
    """(head_dim + 1,) the unit's calibration error per token when every head keeps k = 0 … head_dim
    value dimensions, times ½ with Fisher weights (a predicted loss increase): Σ_g Σ_{i ≥ k} σ_{g,i}²
    in MoDeGPT's metric (``"v_proj"``), the exact block output error after o_proj's refit in ``"o_proj"``."""
    if metric == "v_proj":
        errors = sum(decomposition.errors() for decomposition in head_decompositions(model, unit, stats, fisher_damp))
    else:
        errors = output_metric_reduction(model, unit, stats, fisher_damp).errors()
    scale = 0.5 if stats[unit.output].output_fisher is not None else 1.0
    return errors / max(stats[unit.value].num_tokens, 1) * scale


@dataclass
class PairFactoredForm:
    """v_proj and o_proj factored instead, with the best split of the unit's parameters between them
    (and the same for type II's q_proj and k_proj: any unit of two members, a ``size`` and a ``step``).

    A rank-one component of v_proj costs in + kv_heads·head_dim parameters, one of o_proj
    out + heads·head_dim: unequal under grouped-query attention, so the split is found by trying
    every v_proj rank (o_proj takes every component the rest buys; its error only falls with rank).

    Attributes:
        errors: (size + 1,) the summed error at the parameters of k = 0 … size (``inf``
            where they buy less than rank 1 of each).
        floor: the two layers' summed error at their largest factored ranks, which ``gains`` stop
            short of (see :class:`~lowrank.methods.modegpt.FactoredForm`).
    """

    unit: AttentionUnit  # or a QueryKeyUnit
    gains: list[torch.Tensor]  # v_proj's, o_proj's non-increasing gains up to its largest factored rank
    costs: tuple[int, int]
    floor: float = 0.0
    errors: torch.Tensor = field(init=False)
    _ranks: dict[int, dict[str, int]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        value_gains, output_gains = self.gains
        value_tail = value_gains.sum() - torch.cat([value_gains.new_zeros(1), value_gains.cumsum(0)])  # error at rank r
        output_tail = output_gains.sum() - torch.cat([output_gains.new_zeros(1), output_gains.cumsum(0)])
        value_cost, output_cost = self.costs
        # Every (k, v_proj rank) at once: o_proj takes what the rest of k's budget buys.
        budgets = torch.arange(self.unit.size + 1, dtype=torch.int64)[:, None] * self.unit.step
        value_ranks = torch.arange(1, len(value_gains) + 1, dtype=torch.int64)[None, :]
        output_ranks = torch.div(budgets - value_ranks * value_cost, output_cost, rounding_mode="floor").clamp(max=len(output_gains))
        valid = output_ranks >= 1
        table = self.floor + (value_tail[value_ranks] + output_tail[output_ranks.clamp(min=0)]).clamp(min=0)
        table = table.to(torch.float64).masked_fill(~valid, float("inf"))
        self.errors, best = table.min(dim=1) if table.shape[1] else (torch.full((self.unit.size + 1,), float("inf"), dtype=torch.float64), None)
        for kept in torch.isfinite(self.errors).nonzero().flatten().tolist():
            rank = int(best[kept])  # the first minimum: the smallest v_proj rank among equals
            self._ranks[kept] = dict(zip(self.unit.members, (rank + 1, int(output_ranks[kept, rank]))))

    def ranks(self, kept: int) -> dict[str, int]:
        return dict(self._ranks[kept])


def pair_factored_form(model: nn.Module, unit, tails: dict[str, torch.Tensor]) -> PairFactoredForm:
    """The :class:`PairFactoredForm` of ``unit`` (an :class:`AttentionUnit` or a type II unit) from its members' factored error curves (``tails[name][r]``: the error at rank r)."""
    gains, costs, floor = [], [], 0.0
    for name in unit.members:
        out_features, in_features = linear_shape(model.get_submodule(name))
        largest = min(max_factored_rank(out_features, in_features), len(tails[name]) - 1)
        gains.append((tails[name][:-1] - tails[name][1:])[:largest].clamp(min=0))
        floor += tails[name][largest].clamp(min=0).item()
        costs.append(out_features + in_features)
    return PairFactoredForm(unit, gains, tuple(costs), floor)


def shrink_value_output(
    model: nn.Module, unit: AttentionUnit, kept: int, stats: dict[str, LayerStatistics], fisher_damp: float, metric: str = "v_proj"
) -> dict[str, dict]:
    """Replace the unit's v_proj and o_proj by their ``kept``-dimension forms; returns their module entries."""
    output_layer = model.get_submodule(unit.output)
    original = linear_weight(output_layer).detach()
    if metric == "v_proj":
        value_rows, output_columns = [], [None] * unit.heads
        for g, decomposition in enumerate(head_decompositions(model, unit, stats, fisher_damp)):
            factors = decomposition.factors(kept)
            value_rows.append(factors.value)
            for position, j in enumerate(range(g * unit.group, (g + 1) * unit.group)):
                output_columns[j] = factors.outputs[position * unit.hidden : (position + 1) * unit.hidden]
        new_value, new_output = torch.cat(value_rows), torch.cat(output_columns, dim=1)
    else:
        new_value, new_output, _ = output_metric_reduction(model, unit, stats, fisher_damp).refit(kept)
    layers = {
        unit.value: HeadPaddedLinear.from_factors(
            HeadWeight(new_value, unit.kv_heads, unit.head_dim), None, dtype=original.dtype, device=original.device
        ),
        unit.output: HeadSlicedLinear.from_factors(
            HeadWeight(new_output, unit.heads, unit.head_dim), linear_bias(output_layer), dtype=original.dtype, device=original.device
        ),
    }
    entries = {}
    for name, layer in layers.items():
        set_submodule(model, name, layer)
        entries[name] = {
            "structure": type(layer).__name__,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
            **layer.spec(),
        }
    return entries


__all__ = [
    "AttentionUnit",
    "PairFactoredForm",
    "find_attention_units",
    "head_decompositions",
    "pair_factored_form",
    "shrink_value_output",
    "value_output_errors",
]
