"""MoDeGPT type II for ``modegpt``: each attention's query/key pair keeps k of head_dim/2 rotary pairs per head.

With ``ModegptConfig(attention="query_key")`` (or ``"all"``, with type III's value/output units too)
every attention block whose q_proj and k_proj are targeted, bias-free and fully rotary is one unit:
each key/value head g keeps k rotary dimension pairs (i, i + head_dim/2), chosen by MoDeGPT's CR score
summed over the pair's two dimensions and over the ``heads / kv_heads`` query heads that read g (so
every query head keeps exactly its key head's pairs, which a zero product needs), and q_proj and
k_proj keep those rows, nothing refit (:mod:`lowrank.linalg.query_key`). All heads keep the same k,
and the layers become :class:`~lowrank.nn.head_resized_linear.HeadScatteredLinear`: the dropped
dimensions are zeros at their positions, so the model's ``head_dim`` (which v_proj/o_proj and the
attention's scaling still use) is unchanged and the attention computes exactly the kept logits for
every attention implementation and KV cache; it loads with :func:`lowrank.load`.

What the selection approximates: the CR score bounds the logit error q_t·k_s of the dropped dimensions
*without* rotary; with it, a pair contributes its rotated 2-D product, which the score ignores, so
the kept pairs are MoDeGPT's choice, not the best for the rotated logits.

The unit's curve over k (what the knapsack and the fallback read) is not that score but the cost of
the dropped pairs in the metric every other layer is budgeted in: zeroing a pair's query dimensions
already removes its logit contributions (zeroing its key dimensions too changes nothing more), so it
is one perturbation, estimated as the output error it makes on the calibration tokens, once on
q_proj's outputs (Σ_t Σ_{i dropped} f_i·q_{t,i}²) and once on k_proj's, and averaged; f is the
diagonal Fisher information of that projection's outputs (½·f·error per token: a predicted loss
increase, as ``global`` budgets it) or 1 without gradients. It ignores how the error propagates through
the softmax and the correlations between dimensions' gradients, as every layer's curve does. Priced at
k·2·(heads + kv_heads)·hidden parameters, compared with q_proj and k_proj factored at the same
parameters (:class:`~lowrank.methods.modegpt_attention.PairFactoredForm`, whose two factored layers
are two perturbations, so their errors add), falling back to the factored pair where it predicts less.
A unit whose factored pair predicts less at *every* size leaves the knapsack as a unit: its q_proj and
k_proj are sized as two ordinary layers (a pair step costs about heads + kv_heads ranks of parameters,
too coarse for the knapsack to size the factored pair as well as it sizes two layers; the plan lists
them with ``"dominated": True``).

Measured (``benchmarks/results/modegpt-query-key.md``, reference model, ``factored=fisher-whiten`` +
``global``, one seed): the fallback factors every q/k unit at ratios 0.2 and 0.4 (held-out perplexity
13.02 / 13.45, against 13.02 / 13.44 with type I alone: the pair's coarser size steps move the allocation
a little); forced (``fallback=False``), type II raises it from 13.09 to 13.18 at 0.2 and from 13.60 to
13.90 at 0.4. A trained model's q/k rows are far cheaper to store as low-rank factors than as kept
dimensions. On SmolLM2-135M at 0.4 (``modegpt-query-key-smollm2.md``, first 24 windows) 27 of 30 units
are dominated and no unit shrinks, yet perplexity rises from 18.65 (type I alone) to 18.93 (predicted
loss 0.2703 → 0.2737): the three units that stay in the knapsack, with their coarse steps, cost more
than they save. Not yet never worse: a plan-level comparison (with and without the query/key units,
keep the smaller prediction) would be. With type III (``attention="all"``, ``o_proj``) 18.44.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..linalg.query_key import cr_pair_scores, dropped_pair_errors, kept_dimensions, pair_costs, pair_order, projection_energies
from ..linalg.weighted import row_weights
from ..nn import linear_bias, linear_shape, linear_weight, set_submodule
from ..nn.head_resized_linear import HeadScatteredLinear, HeadWeight

log = logging.getLogger(__name__)

QUERY_KEY = ("q_proj", "k_proj")


@dataclass
class QueryKeyUnit:
    """One attention block's query/key pair; sizes count rotary pairs per head (2 dimensions each).

    Attributes:
        module: the attention module (``model.layers.0.self_attn``).
        query / key: the full names of q_proj and k_proj.
        hidden: their input width.
        heads / kv_heads: query heads and key/value heads.
        head_dim: the dimensions per head before shrinking (even).
    """

    module: str
    query: str
    key: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    noun = "rotary pairs"

    @property
    def name(self) -> str:
        """The unit's key in the knapsack (its type III unit, if any, is keyed by ``module``)."""
        return f"{self.module}[query_key]"

    @property
    def members(self) -> tuple[str, str]:
        return (self.query, self.key)

    @property
    def size(self) -> int:
        return self.head_dim // 2

    @property
    def step(self) -> int:
        """Weight parameters of one rotary pair of every head: two q_proj rows per query head, two k_proj rows per key head."""
        return 2 * (self.heads + self.kv_heads) * self.hidden

    def member_parameters(self, kept: int) -> dict[str, int]:
        return {self.query: self.heads * 2 * kept * self.hidden, self.key: self.kv_heads * 2 * kept * self.hidden}

    @property
    def group(self) -> int:
        """Query heads per key/value head (query head j reads key head j // group)."""
        return self.heads // self.kv_heads


def find_query_key_units(model: nn.Module, names: Sequence[str]) -> list[QueryKeyUnit]:
    """The attention blocks (``q_proj`` and ``k_proj`` children, an even ``head_dim`` and a config with
    ``num_attention_heads``, Llama-style) whose q_proj and k_proj are both among ``names``; left out
    (logged): a projection with a bias (C_q is then not W·C_x·Wᵀ) and partial rotary (its pairs are not
    (i, i + head_dim/2)).

    Example:
        >>> [unit.module for unit in find_query_key_units(model, lowrank.find_targets(model))]  # doctest: +SKIP
        ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    """
    targeted, units = set(names), []
    for prefix, module in model.named_modules():
        children = dict(module.named_children())
        config = getattr(module, "config", None)
        head_dim = getattr(module, "head_dim", None)
        if not all(child in children for child in QUERY_KEY) or config is None or not isinstance(head_dim, int):
            continue
        query, key = (f"{prefix}.{child}" if prefix else child for child in QUERY_KEY)
        if not {query, key} <= targeted:
            continue
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        (query_out, hidden), (key_out, key_in) = linear_shape(model.get_submodule(query)), linear_shape(model.get_submodule(key))
        if not heads or heads % kv_heads or (query_out, key_out, key_in) != (heads * head_dim, kv_heads * head_dim, hidden) or head_dim % 2:
            continue  # not the shapes of a (grouped-query) attention with rotary pairs
        if any(linear_bias(model.get_submodule(name)) is not None for name in (query, key)):
            log.info("modegpt: %s keeps its query/key dimensions (q_proj or k_proj has a bias); they are factored", prefix)
            continue
        if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
            log.info("modegpt: %s keeps its query/key dimensions (partial rotary); they are factored", prefix)
            continue
        units.append(QueryKeyUnit(prefix, query, key, hidden, heads, kv_heads, head_dim))
    return units


def _fisher(stats: LayerStatistics, fisher_damp: float) -> torch.Tensor | None:
    fisher = stats.output_fisher
    return None if fisher is None else row_weights(fisher, fisher_damp).pow(2)


def pair_selection(
    model: nn.Module, unit: QueryKeyUnit, stats: dict[str, LayerStatistics], fisher_damp: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per key head g, its pairs in the order they are kept (CR score, descending) and each pair's cost
    (:func:`~lowrank.linalg.query_key.pair_costs`, Fisher-weighted when the statistics have gradients)."""
    query_stats, key_stats = stats[unit.query], stats[unit.key]
    query_weight = linear_weight(model.get_submodule(unit.query)).detach()
    key_weight = linear_weight(model.get_submodule(unit.key)).detach()
    query = projection_energies(query_weight.to(query_stats.xtx.device), query_stats.xtx).view(unit.heads, unit.head_dim)
    key = projection_energies(key_weight.to(key_stats.xtx.device), key_stats.xtx).view(unit.kv_heads, unit.head_dim)
    query_fisher, key_fisher = _fisher(query_stats, fisher_damp), _fisher(key_stats, fisher_damp)
    orders, costs = [], []
    for g in range(unit.kv_heads):
        heads = slice(g * unit.group, (g + 1) * unit.group)
        orders.append(pair_order(cr_pair_scores(query[heads], key[g])))
        costs.append(pair_costs(
            query[heads], key[g],
            None if query_fisher is None else query_fisher.to(query.device).view(unit.heads, unit.head_dim)[heads],
            None if key_fisher is None else key_fisher.to(key.device).view(unit.kv_heads, unit.head_dim)[g],
        ))  # fmt: skip
    return orders, costs


def query_key_errors(model: nn.Module, unit: QueryKeyUnit, stats: dict[str, LayerStatistics], fisher_damp: float) -> torch.Tensor:
    """(head_dim/2 + 1,) the unit's cost per token when every head keeps k = 0 … head_dim/2 rotary pairs
    (the module docstring's measure), times ½ with Fisher weights (a predicted loss increase)."""
    orders, costs = pair_selection(model, unit, stats, fisher_damp)
    errors = sum(dropped_pair_errors(cost, order) for cost, order in zip(costs, orders))
    scale = 0.5 if stats[unit.query].output_fisher is not None else 1.0
    return errors.cpu() / max(stats[unit.query].num_tokens, 1) * scale


def shrink_query_key(model: nn.Module, unit: QueryKeyUnit, kept: int, stats: dict[str, LayerStatistics], fisher_damp: float) -> dict[str, dict]:
    """Replace the unit's q_proj and k_proj by their ``kept``-pair forms; returns their module entries."""
    orders, _ = pair_selection(model, unit, stats, fisher_damp)
    dimensions = torch.stack([kept_dimensions(order, kept, unit.head_dim) for order in orders])  # (kv_heads, 2k)
    layouts = {unit.query: (unit.heads, dimensions.repeat_interleave(unit.group, dim=0)), unit.key: (unit.kv_heads, dimensions)}
    entries = {}
    for name, (heads, positions) in layouts.items():
        layer = model.get_submodule(name)
        weight = linear_weight(layer).detach()
        rows = (positions + torch.arange(heads)[:, None] * unit.head_dim).flatten().to(weight.device)
        new = HeadScatteredLinear.from_factors(
            HeadWeight(weight[rows], heads, unit.head_dim, positions), None, dtype=weight.dtype, device=weight.device
        )
        set_submodule(model, name, new)
        entries[name] = {
            "structure": type(new).__name__,
            "in_features": new.in_features,
            "out_features": new.out_features,
            "bias": False,
            **new.spec(),
        }
    return entries


__all__ = ["QueryKeyUnit", "find_query_key_units", "pair_selection", "query_key_errors", "shrink_query_key"]
