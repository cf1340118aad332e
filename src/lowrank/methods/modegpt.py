"""``modegpt``: module-level structured decomposition (MoDeGPT, Lin et al. 2024), types I (the MLP) and III (value/output).

A gated MLP y = W_d·(σ(W_g·x) ⊙ W_u·x) is treated as one unit whose inner dimension shrinks: of its
n intermediate neurons it keeps k, chosen by Nyström selection on the correlation C = Σ h hᵀ of the
intermediate activations h (down_proj's input, which calibration already collects), slices the rows
of gate_proj and up_proj to those neurons and refits down_proj in closed form to the kept neurons,
W_d' = W_d·C_{:S}·C_{SS}⁻¹ (the least-squares optimum given them; see :mod:`lowrank.linalg.nystrom`).
The kept neurons compute exactly what they computed before, so the unit's calibration output error
is exactly the W_d-weighted Nyström residual of C. The three layers become plain dense
:class:`~lowrank.nn.ResizedLinear` layers of shapes (k × hidden) and (hidden × k): no extra matmul,
and a model whose MLPs all keep the same k (attention untouched) is a standard transformers
checkpoint with ``intermediate_size = k`` (:func:`save_transformers`).

Per-unit sizes: ``--allocate uniform`` keeps ⌊(1 − ratio)·n⌋ neurons in every MLP; ``global`` gives
each unit a loss curve over k (its Nyström residual, Fisher-weighted by down_proj's outputs, in the
same units as the factored layers' curves), priced at k·3·hidden parameters, and the knapsack sizes
every unit and every other layer together.

Type III (``attention="value"``): each attention block's v_proj/o_proj pair is a unit too, every
value head keeping k of its head_dim dimensions by a whitened SVD of its value→output map, sized by
the same knapsack and compared with its factored form the same way (see
:mod:`lowrank.methods.modegpt_attention`; ``value_metric="o_proj"`` measures the map after the
attention mix and refits o_proj exactly). Measured (``benchmarks/results/modegpt-attention.md``,
reference model, ``factored=fisher-whiten`` + ``global``): type III lowers held-out perplexity from
13.02 / 13.44 (type I only) to 13.00 / 13.34 (``o_proj``; ``v_proj`` 13.00 / 13.36) at ratio 0.2 / 0.4.

Type II (``attention="query_key"``, or ``"all"`` for II and III): each attention block's q_proj/k_proj
pair is a unit whose heads keep k rotary dimension pairs chosen by MoDeGPT's CR score, the dropped
dimensions zero (see :mod:`lowrank.methods.modegpt_query_key`). The layers outside these units are
factored as low-rank layers by the method ``factored`` names (``whiten`` by default) at the plan's ranks.

Never worse than the factored method on the calibration objective: for each unit and size, the
predicted error of the unit (the loss-weighted Nyström residual) is compared with that of its three
layers factored with the same parameters, split among them as well as possible (:class:`FactoredForm`),
from the same statistics; the unit's curve in the knapsack is the smaller of the two at every size,
and a unit whose factored form wins is factored (logged). With gradient statistics both are
predicted loss increases (½·Σ f·error, as ``global`` budgets them); without, the factored one is the
sum of the three layers' whitened output errors, each in its own output's units.

The per-layer interface (:func:`lowrank.compress_`) compresses one matrix at a time and cannot shrink
a unit; plan with :func:`lowrank.allocate` (``method="modegpt"``) and compress with :func:`compress_modegpt_`.

Example:
    >>> stats = lowrank.calibrate(model, batches, gradients=True)  # doctest: +SKIP
    >>> plan = lowrank.allocate(model, 0.2, method="modegpt", stats=stats, strategy="global")  # doctest: +SKIP
    >>> report = compress_modegpt_(model, plan, stats)  # doctest: +SKIP
    >>> lowrank.save(model, "out/modegpt-20", report=report)  # doctest: +SKIP
    >>> config = ModegptConfig(factored="fisher-whiten", attention="value", value_metric="o_proj")  # types I and III  # doctest: +SKIP
    >>> plan = lowrank.allocate(model, 0.4, method="modegpt", stats=stats, strategy="global", strategy_config=config)  # doctest: +SKIP
    >>> report = compress_modegpt_(model, plan, stats, config)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import rank_for_ratio
from ..linalg.nystrom import greedy_order, leverage_order, nested_residuals, nystrom_refit
from ..linalg.rank import max_factored_rank
from ..linalg.weighted import matrix_weights, row_weights
from ..nn import ReplacementLinear, find_targets, linear_bias, linear_shape, linear_weight, set_submodule
from ..nn.resized_linear import ResizedLinear
from .modegpt_attention import AttentionUnit, find_attention_units, pair_factored_form, shrink_value_output, value_output_errors
from .modegpt_query_key import QueryKeyUnit, find_query_key_units, query_key_errors, shrink_query_key
from .module_method import ModuleMethod, check_dense, check_layers, counts_before, factor_the_rest, module_report, planned_total
from .registry import register_method
from .svd import build_lowrank

log = logging.getLogger(__name__)

SELECTIONS = ("leverage", "greedy", "fisher-greedy")
ATTENTION_TYPES = ("factored", "value", "query_key", "all")  # MoDeGPT type III on v_proj/o_proj, type II on q_proj/k_proj, both
VALUE_METRICS = ("v_proj", "o_proj")  # type III's metric: v_proj's inputs (MoDeGPT) or o_proj's
PLAN_KEY = "modegpt"  # Plan.details[PLAN_KEY]["units"]: what compress_modegpt_ does with each MLP
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
FACTORED = ("whiten", "fisher-whiten")  # what plans (and, without sparse_fraction, builds) the layers outside the units


@dataclass
class ModegptConfig:
    """Options of ``modegpt``.

    Attributes:
        selection: how the kept neurons are chosen: ``"leverage"`` (MoDeGPT: the largest ridge
            leverage scores of C), ``"greedy"`` (pivoted Cholesky, each step the neuron that
            lowers the unit's weighted output error most; reads W_d too, slower) or
            ``"fisher-greedy"`` (the same, with down_proj's outputs weighted by their full Fisher
            matrix G instead of its diagonal, so the error is the K-FAC loss ½·tr(G·R·C·Rᵀ) of the
            residual map R; the unit's curve in the knapsack is that loss too; needs the statistics'
            ``output_fisher_matrix``, which calibration collects for :func:`gram_layers`).
        ridge: λ of the ridge leverage scores, relative to the mean eigenvalue of C.
        damp: damping of C_{SS} in the refit, relative to its mean diagonal (0: only when singular).
        fisher_damp: added to each output's Fisher information, relative to the mean.
        factored: the low-rank method for the layers outside the units (attention) and for units
            where it predicts less error: ``"whiten"`` or ``"fisher-whiten"``.
        sparse_fraction: share of each factored layer's budget spent on the largest entries of its
            residual instead of rank (``lowrank-sparse`` with ``whiten=true``,
            ``weighted_selection=true``, at the rank the plan gives the layer); 0: plain low-rank.
            The plan still prices the layer by ``factored``'s low-rank curve, which the sparse
            entries can only lower (lowrank-sparse keeps the plain fit where it is better).
        fallback: compare every unit with its factored form and keep the better (``False``: always
            shrink, e.g. for a uniform model to save with :func:`save_transformers`).
        attention: ``"factored"`` (attention layers factored like any other layer), ``"value"``
            (MoDeGPT type III: each attention's value/output pair shrinks its head dimension),
            ``"query_key"`` (type II: each query/key pair keeps k rotary pairs per head) or ``"all"`` (II and III).
        value_metric: where type III measures the value path: ``"v_proj"`` (MoDeGPT: whitened by
            v_proj's inputs, before the attention mix) or ``"o_proj"`` (o_proj's inputs, after it).
        multiple_of: every shrunk MLP keeps a multiple of this many neurons (as Llama's configs
            round ``intermediate_size``): CPU matrix kernels run an inner dimension that is not a
            multiple of 8 up to 1.5× slower (a 512-token gate/up product on SmolLM2's width: 20 ms
            at 1216 neurons, 28–33 ms at 1213 or 1217). 1: any size.
    """

    version: int = 1
    selection: str = "leverage"
    ridge: float = 1e-2
    damp: float = 0.0
    fisher_damp: float = 1e-6
    factored: str = "whiten"
    sparse_fraction: float = 0.0
    fallback: bool = True
    attention: str = "factored"
    value_metric: str = "v_proj"
    multiple_of: int = 8


def _check_config(config: ModegptConfig) -> None:
    if config.selection not in SELECTIONS:
        raise LowrankError(f"modegpt's selection must be one of {', '.join(SELECTIONS)}, got {config.selection!r}")
    if not config.ridge > 0:
        raise LowrankError(f"modegpt's ridge must be > 0 (relative to C's mean eigenvalue), got {config.ridge}; e.g. 1e-2")
    if config.factored not in FACTORED:
        raise LowrankError(f"modegpt factors the other layers with {' or '.join(FACTORED)}, got factored={config.factored!r}")
    if not 0.0 <= config.sparse_fraction < 1.0:
        raise LowrankError(f"modegpt's sparse_fraction must lie in [0, 1), got {config.sparse_fraction}; e.g. 0.25")
    if config.attention not in ATTENTION_TYPES:
        raise LowrankError(f"modegpt's attention must be one of {', '.join(ATTENTION_TYPES)}, got {config.attention!r}")
    if config.value_metric not in VALUE_METRICS:
        raise LowrankError(f"modegpt's value_metric must be one of {', '.join(VALUE_METRICS)}, got {config.value_metric!r}")
    if config.multiple_of < 1:
        raise LowrankError(f"modegpt's multiple_of must be ≥ 1 (1: any MLP size), got {config.multiple_of}; e.g. 8")


def factored_method(config: ModegptConfig):
    """(name, config) of the method that builds the layers the units leave: ``factored``, or
    ``lowrank-sparse`` (whitened, weighted selection) when ``sparse_fraction`` > 0.

    Example:
        >>> name, options = factored_method(ModegptConfig(factored="fisher-whiten", sparse_fraction=0.25))
        >>> name, options.sparse_fraction, options.whiten
        ('lowrank-sparse', 0.25, True)
    """
    from .lowrank_sparse import LowRankPlusSparseConfig
    from .registry import get_method

    if config.sparse_fraction > 0:
        return "lowrank-sparse", LowRankPlusSparseConfig(sparse_fraction=config.sparse_fraction, whiten=True, weighted_selection=True)
    return config.factored, get_method(config.factored).config_class()


@dataclass
class MlpUnit:
    """One gated MLP: its three layers' names and sizes.

    Attributes:
        name: the MLP module (``model.layers.0.mlp``).
        gate / up / down: the full names of its projections.
        hidden: the model width (gate/up inputs, down outputs).
        neurons: n, the intermediate size (gate/up outputs, down inputs).
    """

    name: str
    gate: str
    up: str
    down: str
    hidden: int
    neurons: int
    noun = "neurons"

    @property
    def members(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)

    @property
    def size(self) -> int:
        return self.neurons

    def member_parameters(self, kept: int) -> dict[str, int]:
        return {self.gate: kept * self.hidden, self.up: kept * self.hidden, self.down: self.hidden * kept}

    @property
    def step(self) -> int:
        """Weight parameters of one neuron: a row of gate and of up, a column of down."""
        return 3 * self.hidden

    def factored_ranks(self, neurons: int) -> int:
        """How many rank-one components of its three (hidden + n)-parameter layers the parameters of ``neurons`` neurons buy."""
        return neurons * self.step // (self.hidden + self.neurons)


def find_mlp_units(model: nn.Module, names: Sequence[str]) -> list[MlpUnit]:
    """The gated MLPs (``gate_proj``, ``up_proj``, ``down_proj`` children, Llama-style) whose three
    layers are all among ``names``.

    Example:
        >>> [unit.name for unit in find_mlp_units(model, lowrank.find_targets(model))]  # doctest: +SKIP
        ['model.layers.0.mlp', 'model.layers.1.mlp']
    """
    targeted, units = set(names), []
    for prefix, module in model.named_modules():
        children = dict(module.named_children())
        if not all(child in children for child in GATED_MLP):
            continue
        gate, up, down = (f"{prefix}.{child}" if prefix else child for child in GATED_MLP)
        if not {gate, up, down} <= targeted:
            continue
        (neurons, hidden), (up_out, up_in), (down_out, down_in) = (linear_shape(model.get_submodule(n)) for n in (gate, up, down))
        if (up_out, up_in, down_out, down_in) != (neurons, hidden, hidden, neurons):
            continue  # not the shapes of a gated MLP
        units.append(MlpUnit(prefix, gate, up, down, hidden, neurons))
    return units


def _output_weights(stats: LayerStatistics, fisher_damp: float) -> torch.Tensor | None:
    fisher = stats.output_fisher
    return None if fisher is None else row_weights(fisher, fisher_damp)


def gram_layers(model: nn.Module, names: Sequence[str], config: ModegptConfig | None = None) -> list[str]:
    """The layers whose full output Fisher (``output_gram`` of :func:`lowrank.calibrate`) modegpt
    reads with ``config``: the gated MLPs' down_proj layers with ``selection="fisher-greedy"``, else none.

    Example:
        >>> stats = lowrank.calibrate(model, tokenizer, text, gradients=True,
        ...                           output_gram=gram_layers(model, lowrank.find_targets(model), ModegptConfig(selection="fisher-greedy")))  # doctest: +SKIP
    """
    if config is None or config.selection != "fisher-greedy":
        return []
    return [unit.down for unit in find_mlp_units(model, names)]


def _weighted_down(model: nn.Module, unit: MlpUnit, stats: dict[str, LayerStatistics], config: ModegptConfig) -> tuple[torch.Tensor, bool]:
    """W_d with its outputs weighted as ``config.selection`` measures the unit's error (by √diag
    Fisher, by the full G^{1/2} for ``fisher-greedy``, unweighted without gradients), and whether
    it was weighted by a Fisher (the error is then a predicted loss)."""
    down = stats[unit.down]
    weight = linear_weight(model.get_submodule(unit.down)).detach().double().to(down.xtx.device)
    if config.selection == "fisher-greedy":
        fisher = down.output_fisher_matrix
        if fisher is None:
            raise LowrankError(
                f"modegpt's selection=fisher-greedy weighs {unit.down}'s outputs by their full Fisher matrix, which these statistics lack; "
                "calibrate with gradients=True, output_gram=lowrank.methods.modegpt.gram_layers(model, targets, config) (the CLI does it)"
            )
        return matrix_weights(fisher, config.fisher_damp).to(weight.device) @ weight, True
    weights = _output_weights(down, config.fisher_damp)
    return (weight, False) if weights is None else (weights.to(weight.device)[:, None] * weight, True)


def neuron_order(model: nn.Module, unit: MlpUnit, stats: dict[str, LayerStatistics], config: ModegptConfig, weighted: torch.Tensor | None = None) -> torch.Tensor:
    """The unit's neurons in the order they are kept (the first k for size k), by ``config.selection``
    (``weighted``: :func:`_weighted_down`'s W_d when the caller has it)."""
    down = stats[unit.down]
    if config.selection == "leverage":
        return leverage_order(down.xtx, config.ridge)
    return greedy_order(_weighted_down(model, unit, stats, config)[0] if weighted is None else weighted, down.xtx)


def unit_errors(
    model: nn.Module, unit: MlpUnit, stats: dict[str, LayerStatistics], config: ModegptConfig, order: torch.Tensor | None = None
) -> torch.Tensor:
    """(n + 1,) the unit's calibration error per token when it keeps k = 0 … n neurons: the Nyström
    residual of down_proj's input correlation weighted by W_d, times ½·Fisher of its outputs when
    the statistics have gradients (then a predicted loss increase, as ``global`` budgets it; with
    ``fisher-greedy`` the full Fisher matrix: ½·tr(G·R·C·Rᵀ)/tokens). ``order``: the neurons in the
    order they are kept, when the caller has it (default :func:`neuron_order`)."""
    return _order_and_errors(model, unit, stats, config, order)[1]


def _order_and_errors(
    model: nn.Module, unit: MlpUnit, stats: dict[str, LayerStatistics], config: ModegptConfig, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`unit_errors` with the neuron order it used (the weighted W_d formed once for both)."""
    down = stats[unit.down]
    weighted, fisher = _weighted_down(model, unit, stats, config)
    order = neuron_order(model, unit, stats, config, weighted) if order is None else order
    residuals = nested_residuals(weighted, down.xtx, order)
    return order, residuals / max(down.num_tokens, 1) * (0.5 if fisher else 1.0)


def _unit_curve(model: nn.Module, unit, stats: dict[str, LayerStatistics], config: ModegptConfig) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The unit's own error curve over its sizes, by its type (I, II or III), with an MLP's neuron order (``None`` for the others)."""
    if isinstance(unit, QueryKeyUnit):
        return None, query_key_errors(model, unit, stats, config.fisher_damp)
    if isinstance(unit, AttentionUnit):
        return None, value_output_errors(model, unit, stats, config.fisher_damp, config.value_metric)
    return _order_and_errors(model, unit, stats, config)


def _planned_order(entry: dict, unit: MlpUnit) -> torch.Tensor | None:
    """The neuron order a plan carries for ``unit`` (greedy selections), checked to be a permutation of its neurons."""
    order = entry.get("order")
    if order is None:
        return None
    order = torch.as_tensor(order, dtype=torch.long)
    if order.shape != (unit.neurons,) or not torch.equal(order.sort().values, torch.arange(unit.neurons)):
        raise LowrankError(f"the plan's neuron order for {unit.name} is not a permutation of its {unit.neurons} neurons; plan again on this model")
    return order


def _factored_tails(model: nn.Module, names: Sequence[str], stats: dict[str, LayerStatistics], method: str) -> dict[str, torch.Tensor]:
    """Per layer, its error at every rank when factored by ``method`` (index r: the error at rank r):
    predicted loss increases with gradients, whitened output errors without."""
    from ..allocation.curves import loss_curves, whitened_energy
    from ..calibration.statistics import one_pass

    if all(stats[name].output_fisher is not None for name in names):
        gains = loss_curves(model, names, stats, method)
    else:
        with one_pass(stats, names):
            gains = {name: whitened_energy(linear_weight(model.get_submodule(name)).detach(), stats[name]) for name in names}
    return {name: torch.cat([g.double().flip(0).cumsum(0).flip(0), g.new_zeros(1, dtype=torch.float64)]) for name, g in gains.items()}


@dataclass
class FactoredForm:
    """The unit's three layers factored instead, with the best split of a parameter budget among them.

    Every rank-one component of any of the three layers costs the same (hidden + n) parameters and
    each layer's gains are non-increasing, so the best R components are the R largest gains of the
    three, with one forced into each layer (a factored layer has rank ≥ 1).

    Attributes:
        errors: (n + 1,) the summed error at the parameters of k = 0 … n neurons (``inf`` where they
            buy fewer than three components).
        ranks: ``ranks(k)`` = {member: rank} of that split.
        floor: the members' summed error at their largest factored ranks, which no affordable rank
            removes: ``gains`` stop there, so without it every error would be short by this much.
    """

    unit: MlpUnit
    gains: list[torch.Tensor]  # per member, its non-increasing gains up to its largest factored rank
    floor: float = 0.0
    errors: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        total = self.floor + sum(g.sum() for g in self.gains)
        rest = torch.cat([g[1:] for g in self.gains]).sort(descending=True).values
        captured = torch.cat([rest.new_zeros(1), rest.cumsum(0)])
        first = sum(g[0] for g in self.gains)
        self.errors = torch.full((self.unit.neurons + 1,), float("inf"), dtype=torch.float64)
        for k in range(self.unit.neurons + 1):
            components = self.unit.factored_ranks(k)
            if components >= 3:
                self.errors[k] = (total - first - captured[min(components - 3, len(rest))]).clamp(min=0)

    def ranks(self, neurons: int) -> dict[str, int]:
        components = self.unit.factored_ranks(neurons) - 3
        values = torch.cat([g[1:] for g in self.gains])
        owners = torch.cat([torch.full((len(g) - 1,), index) for index, g in enumerate(self.gains)])
        chosen = owners[torch.sort(values, descending=True, stable=True).indices[: max(components, 0)]]
        return {name: 1 + int((chosen == index).sum()) for index, name in enumerate(self.unit.members)}


def _factored_form(model: nn.Module, unit: MlpUnit, tails: dict[str, torch.Tensor]) -> FactoredForm:
    gains, floor = [], 0.0
    for name in unit.members:
        largest = min(max_factored_rank(*linear_shape(model.get_submodule(name))), len(tails[name]) - 1)
        gains.append((tails[name][:-1] - tails[name][1:])[:largest].clamp(min=0))
        floor += tails[name][largest].clamp(min=0).item()
    return FactoredForm(unit, gains, floor)


def modegpt_plan(
    model: nn.Module,
    ratio: float,
    stats: dict[str, LayerStatistics] | None = None,
    strategy: str = "uniform",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
    config: ModegptConfig | None = None,
    strategy_config: ModegptConfig | None = None,
    **_unused,
):
    """The plan of a ``modegpt`` run: neurons kept per gated MLP, ranks of the other layers.

    :func:`lowrank.allocate` calls this for ``method="modegpt"``. The plan's ``ranks`` give each
    member of a shrunk unit its kept neuron count k (the inner dimension, as a rank is for a factored
    layer; ``planned_parameters`` counts them as the kept neurons' rows and columns), each member of a unit that falls back the
    rank of its factored form, and the other layers their ranks; ``details["modegpt"]["units"]``
    says which unit is which, with both predicted errors, and ``details["modegpt"]["attention"]`` the
    same for the value/output units (``attention="value"``: ``head_dim`` kept of ``of``),
    ``details["modegpt"]["query_key"]`` for the query/key units (``pairs`` kept of ``of / 2``; their
    members' ranks are the kept dimensions, 2·pairs).

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' weight parameters to remove.
        stats: calibration statistics with down_proj's input correlation (``global``: with gradients).
        strategy: ``"uniform"`` or ``"global"``.
        include / exclude: layer selection, as :func:`lowrank.find_targets`.
        allow_dense: whether ``global`` may leave a unit or layer dense.
        config: the method's options (their ``selection`` changes the curves), as
            :func:`lowrank.allocate` passes its ``method_config``; also read from ``strategy_config``.

    Returns:
        A :class:`~lowrank.Plan` for :func:`compress_modegpt_`.

    Example:
        >>> plan = modegpt_plan(model, 0.2, stats, strategy="global")  # doctest: +SKIP
        >>> plan.details["modegpt"]["units"]["model.layers.0.mlp"]["neurons"]  # doctest: +SKIP
        614
    """
    config = config or strategy_config or ModegptConfig()
    if not isinstance(config, ModegptConfig):
        raise LowrankError(f"modegpt takes a ModegptConfig, got {type(config).__name__}")
    _check_config(config)
    if not 0.0 <= ratio < 1.0:
        raise LowrankError(f"ratio must be in [0, 1), got {ratio}; e.g. 0.3 removes 30 % of the targeted parameters")
    if stats is None:
        raise LowrankError("modegpt selects neurons from calibration statistics; pass --calib FILE (or stats=calibrate(...))")
    if strategy not in ("uniform", "global"):
        raise LowrankError(f"modegpt sizes its units with --allocate uniform or global, not {strategy!r}")
    names = find_targets(model, include=include, exclude=exclude)
    missing = next((name for name in names if name not in stats), None)
    if missing is not None:
        raise LowrankError(f"no calibration statistics for layer {missing}; calibrate with the same --include/--exclude")
    if strategy == "global" and not all(stats[name].output_fisher is not None for name in names):
        raise LowrankError("--allocate global needs gradient statistics; calibrate with gradients=True (the CLI does it)")
    curves = _curves(model, names, stats, config)
    plan = _sized_plan(curves, ratio, strategy, allow_dense, config)
    if strategy == "global" and config.fallback and any(not entry.get("dominated") for entry in plan.details[PLAN_KEY]["query_key"].values()):
        # Each unit falls back where its factored pair predicts less, but a q/k unit's coarse size steps
        # (a rotary pair in every head) can still cost the knapsack a worse plan overall: on SmolLM2 at
        # 0.4 they raised the predicted loss 0.2703 → 0.2737 (modegpt-query-key-smollm2.md). So the plan
        # without them is sized too, from the same curves, and the one that predicts less is kept: never
        # worse than without type II.
        without = _sized_plan(curves.without_query_key(), ratio, strategy, allow_dense, config)
        if without.predicted_error < plan.predicted_error:
            log.info("modegpt: the plan with query/key units predicts %.4g, without them %.4g; they are left out",
                     plan.predicted_error, without.predicted_error)  # fmt: skip
            without.details[PLAN_KEY]["query_key_left_out"] = {"predicted_error": plan.predicted_error}
            return without
    return plan


@dataclass
class _Curves:
    """What a ``modegpt`` plan is sized from, whatever the ratio: its units with their error curves
    (and greedy neuron orders), the factored forms they are compared with, the other layers' tails."""

    shapes: dict[str, tuple[int, int]]
    units: list
    others: list[str]  # the targeted layers outside every unit, sized as factored layers
    orders: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    tails: dict[str, torch.Tensor]
    factored: dict
    dominated: list  # query/key units whose factored pair predicts less at every size
    gradients: bool

    def without_query_key(self) -> _Curves:
        """The same curves with the query/key units dissolved: their q_proj and k_proj sized as two
        factored layers (their tails exist: the units' members get them whenever they can fall back)."""
        units = [unit for unit in self.units if not isinstance(unit, QueryKeyUnit)]
        members = {name for unit in units for name in unit.members}
        return replace(self, units=units, others=[name for name in self.shapes if name not in members], dominated=[])


def _curves(model: nn.Module, names: Sequence[str], stats: dict[str, LayerStatistics], config: ModegptConfig) -> _Curves:
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    units: list = find_mlp_units(model, names)
    if not units:
        raise LowrankError("modegpt found no gated MLP (gate_proj, up_proj, down_proj) among the targeted layers; use whiten or fisher-whiten")
    units += find_attention_units(model, names) if config.attention in ("value", "all") else []
    units += find_query_key_units(model, names) if config.attention in ("query_key", "all") else []
    members = {name for unit in units for name in unit.members}
    others = [name for name in names if name not in members]
    gradients = all(stats[name].output_fisher is not None for name in names)

    # A greedy order costs O(n³) per MLP, so the plan keeps it and compress reuses it (leverage orders take a second).
    orders, errors = {}, {}
    for unit in units:
        order, errors[unit.name] = _unit_curve(model, unit, stats, config)
        if order is not None and config.selection != "leverage":
            orders[unit.name] = order
    # Factored curves: of the other layers for the knapsack and the predicted error, of the units' members for the fallback.
    wanted = set(others) | (members if config.fallback else set())
    tail_names = [name for name in names if name in wanted]
    tails = _factored_tails(model, tail_names, stats, config.factored) if tail_names else {}
    factored = {
        unit.name: _factored_form(model, unit, tails) if isinstance(unit, MlpUnit) else pair_factored_form(model, unit, tails) for unit in units
    } if config.fallback else {}  # fmt: skip
    # A query/key unit whose factored pair predicts less at every size it can take is no unit: its q_proj and
    # k_proj enter the knapsack as two layers, at their rank steps (its pair steps, 2·(heads + kv_heads)·hidden
    # parameters each, are ~(heads + kv_heads) ranks' worth: coarse enough to cost a worse allocation).
    dominated = [
        unit for unit in units
        if config.fallback and isinstance(unit, QueryKeyUnit) and bool((factored[unit.name].errors[1:-1] <= errors[unit.name][1:-1]).all())
    ]  # fmt: skip
    if dominated:
        log.info("modegpt: %d query/key units are factored with %s (predicted less at every size)", len(dominated), config.factored)
        units = [unit for unit in units if unit not in dominated]
        members = {name for unit in units for name in unit.members}
        others = [name for name in names if name not in members]
    return _Curves(shapes, units, others, orders, errors, tails, factored, dominated, gradients)


def _sized_plan(curves: _Curves, ratio: float, strategy: str, allow_dense: bool, config: ModegptConfig):
    """The plan at ``ratio``: the knapsack (``global``) or one fraction (``uniform``) over ``curves``."""
    from ..allocation.knapsack import budget_for_ratio, greedy_ranks
    from ..allocation.plan import Plan

    shapes, units, others, orders, errors = curves.shapes, curves.units, curves.others, curves.orders, curves.errors
    tails, factored, dominated, gradients = curves.tails, curves.factored, curves.dominated, curves.gradients
    # The unit's curve is the better of its two forms at every size, so the knapsack prices what compress will build.
    best = {unit.name: torch.minimum(errors[unit.name], factored[unit.name].errors) if config.fallback else errors[unit.name] for unit in units}

    # MLP sizes on a grid of multiple_of neurons (the knapsack steps a grid's width at a time); a
    # unit no larger than one grid step keeps the exact sizes.
    grid = {unit.name: config.multiple_of if isinstance(unit, MlpUnit) and unit.size > config.multiple_of else 1 for unit in units}
    if ratio == 0.0:
        sizes: dict[str, int | None] = {name: None for name in [*others, *(unit.name for unit in units)]}
    elif strategy == "uniform":
        sizes = {name: rank_for_ratio(*shapes[name], ratio) for name in others}
        for unit in units:
            kept = int((1.0 - ratio) * unit.size) // grid[unit.name] * grid[unit.name]
            sizes[unit.name] = max(kept, grid[unit.name]) if kept < unit.size else None
    else:
        gains = {name: tails[name][:-1] - tails[name][1:] for name in others}
        for unit in units:
            on_grid = best[unit.name][:: grid[unit.name]]  # sizes 0, m, 2m, ... ≤ n
            gains[unit.name] = on_grid[:-1] - on_grid[1:]
        entry_shapes = {name: shapes[name] for name in others} | {unit.name: (unit.hidden, unit.size) for unit in units}
        prices = {unit.name: (grid[unit.name] * unit.step, unit.step * unit.size) for unit in units}
        sizes = greedy_ranks(gains, entry_shapes, budget_for_ratio(shapes, ratio), allow_dense=allow_dense, prices=prices)
        for unit in units:
            if sizes[unit.name] is not None:
                sizes[unit.name] *= grid[unit.name]

    ranks = {name: sizes[name] for name in others if sizes[name] is not None}
    described, described_attention, described_query_key, replaced, predicted = {}, {}, {}, {}, 0.0
    for name in others:
        if sizes[name] is not None and name in tails:
            predicted += tails[name][sizes[name]].item()
    for unit in units:
        kept = sizes[unit.name]
        if kept is None:
            continue
        own, other = errors[unit.name][kept].item(), factored[unit.name].errors[kept].item() if config.fallback else None
        falls_back = other is not None and other < own
        if falls_back:
            split = factored[unit.name].ranks(kept)
            log.info("modegpt: %s keeps its %d %s and is factored with %s at ranks %s (predicted error %.3g < %.3g shrunk to %d)",
                     unit.name, unit.size, unit.noun, config.factored,
                     "/".join(map(str, split.values())), other, own, kept)  # fmt: skip
            ranks.update(split)
        else:
            ranks.update({name: 2 * kept if isinstance(unit, QueryKeyUnit) else kept for name in unit.members})
            replaced.update(unit.member_parameters(kept))
        predicted += other if falls_back else own
        entry = {
            "members": list(unit.members),
            "structure": config.factored if falls_back else "modegpt",
            "predicted_error": own,
            "factored_predicted_error": other,
        }
        if isinstance(unit, QueryKeyUnit):
            described_query_key[unit.module] = {**entry, "pairs": kept, "head_dim": 2 * kept, "of": unit.head_dim, "heads": unit.heads, "kv_heads": unit.kv_heads}
        elif isinstance(unit, AttentionUnit):
            described_attention[unit.name] = {**entry, "head_dim": kept, "of": unit.head_dim, "heads": unit.heads, "kv_heads": unit.kv_heads}
        else:
            described[unit.name] = {**entry, "neurons": kept, "of": unit.neurons}
            if not falls_back and unit.name in orders:
                described[unit.name]["order"] = orders[unit.name].tolist()
    for unit in dominated:
        ranks_of = [ranks.get(name) for name in unit.members]
        described_query_key[unit.module] = {"members": list(unit.members), "structure": config.factored if any(ranks_of) else "dense",
                                            "predicted_error": None, "factored_predicted_error": None, "pairs": None, "head_dim": None,
                                            "of": unit.head_dim, "heads": unit.heads, "kv_heads": unit.kv_heads, "dominated": True}  # fmt: skip
    details = {PLAN_KEY: {"units": described, "attention": described_attention, "query_key": described_query_key}}
    plan = Plan(ratio=ratio, strategy=strategy, shapes=shapes, ranks=ranks, details=details)
    plan.details["planned_parameters"] = planned_total(plan, replaced)
    plan.predicted_error = predicted if (gradients or strategy == "global") else None
    return plan


def _shrink_unit(
    model: nn.Module, unit: MlpUnit, kept_neurons: int, stats: dict[str, LayerStatistics], config: ModegptConfig, order: torch.Tensor | None = None
) -> tuple[dict[str, dict], torch.Tensor]:
    """Replace the unit's three layers by their ``kept_neurons``-neuron dense forms; returns their
    module entries and the kept neurons' indices (in the order the new layers hold them). ``order``:
    the plan's neuron order (default :func:`neuron_order`)."""
    layers = {name: model.get_submodule(name) for name in unit.members}
    weights = {name: linear_weight(layer).detach() for name, layer in layers.items()}
    biases = {name: linear_bias(layer) for name, layer in layers.items()}
    device = weights[unit.down].device
    order = (neuron_order(model, unit, stats, config) if order is None else order).to(device)
    kept = order[:kept_neurons].sort().values  # the kept neurons in their original order
    down = nystrom_refit(weights[unit.down], stats[unit.down].xtx.to(device), kept, config.damp, name=unit.down)
    new = {
        unit.gate: (weights[unit.gate][kept], None if biases[unit.gate] is None else biases[unit.gate][kept]),
        unit.up: (weights[unit.up][kept], None if biases[unit.up] is None else biases[unit.up][kept]),
        unit.down: (down, biases[unit.down]),
    }
    entries = {}
    for name, (weight, bias) in new.items():
        original = weights[name]
        layer = ResizedLinear.from_factors(weight, bias, dtype=original.dtype, device=original.device)
        set_submodule(model, name, layer)
        entries[name] = {
            "structure": type(layer).__name__,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": bias is not None,
            **layer.spec(),
        }
    return entries, kept


@torch.no_grad()
def compress_modegpt_(
    model: nn.Module,
    plan,
    stats: dict[str, LayerStatistics],
    config: ModegptConfig | None = None,
    progress: bool = True,
    sequential: Sequence[dict[str, torch.Tensor]] | None = None,
    anchor: float | None = None,
):
    """Apply a ``modegpt`` plan to ``model`` in place: shrink its gated MLPs, factor the rest.

    Units the plan shrinks become three :class:`~lowrank.nn.ResizedLinear` layers (gate/up rows and
    down columns of the kept neurons, down refit in closed form), attention units (``attention="value"``)
    a :class:`~lowrank.nn.head_resized_linear.HeadPaddedLinear` v_proj and a
    :class:`~lowrank.nn.head_resized_linear.HeadSlicedLinear` o_proj, query/key units
    (``attention="query_key"``) two :class:`~lowrank.nn.head_resized_linear.HeadScatteredLinear`; units it falls back on and all
    other planned layers are factored by ``config.factored`` through :func:`lowrank.compress_`'s
    per-layer path.

    Args:
        model: the dense model (modified in place).
        plan: from :func:`lowrank.allocate` with ``method="modegpt"`` (:func:`modegpt_plan`).
        stats: the calibration statistics the plan was made from.
        config: the method's options; default: its defaults (use the ones the plan was made with).
        progress: show progress bars.
        sequential: calibration batches: compress block by block with the cross-layer correction
            (every kept part refit to the dense model's outputs from the compressed model's inputs;
            :mod:`lowrank.methods.modegpt_correction`); ``None``: every unit from ``stats`` alone.
        anchor: with ``sequential``, α in [0, 1] of the anchored objective
            (1 − α)‖WX − W′X̃‖² + α‖(W − W′)X‖²; ``None`` is 0, the unanchored refit.

    Returns:
        A :class:`~lowrank.CompressionReport` (method ``modegpt``) with exact parameter and bit
        counts, for :func:`lowrank.save`; with ``sequential``, ``refit_errors`` per refit layer.

    Raises:
        LowrankError: if the model is already compressed or the plan was not made for modegpt.

    Example:
        >>> report = compress_modegpt_(model, lowrank.allocate(model, 0.2, method="modegpt", stats=stats), stats)  # doctest: +SKIP
    """
    config = config if config is not None else ModegptConfig()
    _check_config(config)
    check_dense(model)
    described = plan.details.get(PLAN_KEY, {}).get("units") if isinstance(plan.details, dict) else None
    if described is None:
        raise LowrankError("this plan was not made for modegpt; make it with lowrank.allocate(model, ratio, method='modegpt', stats=stats)")
    described_attention = plan.details[PLAN_KEY].get("attention", {})
    described_query_key = plan.details[PLAN_KEY].get("query_key", {})
    every = [*described.values(), *described_attention.values(), *described_query_key.values()]
    check_layers(model, [name for entry in every for name in entry["members"]], stats)
    before = counts_before(model, plan)
    shrunk = {name: entry for name, entry in described.items() if entry["structure"] == "modegpt"}
    shrunk_attention = {name: entry for name, entry in described_attention.items() if entry["structure"] == "modegpt"}
    shrunk_query_key = {name: entry for name, entry in described_query_key.items() if entry["structure"] == "modegpt"}
    shrunk_members = {member for entry in [*shrunk.values(), *shrunk_attention.values(), *shrunk_query_key.values()] for member in entry["members"]}
    # The units are found before factor_the_rest replaces the layers around them (find_* reads dense shapes).
    units = {unit.name: unit for unit in find_mlp_units(model, list(shrunk_members))}
    heads = {unit.name: unit for unit in find_attention_units(model, list(shrunk_members))}
    query_keys = {unit.module: unit for unit in find_query_key_units(model, list(shrunk_members))}
    missing = next((name for name in shrunk_attention if name not in heads), None) or next((name for name in shrunk_query_key if name not in query_keys), None)
    if missing is not None:
        raise LowrankError(f"the plan shrinks the heads of {missing}, which is not an attention block of this model; plan again on this model")
    if anchor is not None and not (sequential is not None and 0.0 <= anchor <= 1.0):
        raise LowrankError(f"the cross-layer anchor takes a value in [0, 1] and needs sequential calibration batches, got {anchor}")
    refit_errors = {}
    if sequential is not None:
        from .modegpt_correction import compress_modegpt_sequentially_

        factored, modules, refit_errors = compress_modegpt_sequentially_(
            model, plan, stats, config, sequential, anchor or 0.0,
            mlps={name: (units[name], entry["neurons"]) for name, entry in shrunk.items()},
            orders={name: _planned_order(entry, units[name]) for name, entry in shrunk.items()},
            values={name: (heads[name], entry["head_dim"]) for name, entry in shrunk_attention.items()},
            query_keys={name: (query_keys[name], entry["pairs"]) for name, entry in shrunk_query_key.items()},
            progress=progress,
        )  # fmt: skip
    else:
        method, factored_config = factored_method(config)
        factored, modules = factor_the_rest(model, plan, shrunk_members, method, stats, factored_config, progress)
        for unit_name, entry in tqdm(shrunk.items(), desc="compress (modegpt)", disable=not progress, unit="mlp"):
            modules.update(_shrink_unit(model, units[unit_name], entry["neurons"], stats, config, _planned_order(entry, units[unit_name]))[0])
        for unit_name, entry in tqdm(shrunk_attention.items(), desc="compress (modegpt, value heads)", disable=not progress, unit="attention"):
            modules.update(shrink_value_output(model, heads[unit_name], entry["head_dim"], stats, config.fisher_damp, config.value_metric))
        for unit_name, entry in tqdm(shrunk_query_key.items(), desc="compress (modegpt, query/key heads)", disable=not progress, unit="attention"):
            modules.update(shrink_query_key(model, query_keys[unit_name], entry["pairs"], stats, config.fisher_damp))

    report = module_report("modegpt", config, plan, modules, model, before)
    report.refit_errors = refit_errors
    log.info(
        "modegpt: %d MLPs, %d value/output and %d query/key pairs shrunk, %d layers factored with %s: targeted parameters %d → %d (%.1f %% removed)",
        len(shrunk), len(shrunk_attention), len(shrunk_query_key), len(factored), config.factored, before["targeted_before"], report.parameters["targeted_after"],
        100 * (1 - report.parameters["targeted_after"] / before["targeted_before"]),
    )  # fmt: skip
    return report


def save_transformers(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Save a ``modegpt`` model whose gated MLPs all keep the same k neurons, with nothing else
    compressed, as a plain transformers directory (``config.intermediate_size = k``) that
    ``AutoModelForCausalLM.from_pretrained`` loads without lowrank or remote code.

    Args:
        model: compressed by :func:`compress_modegpt_` (left unchanged; a copy is saved).
        out_dir: target directory (written atomically).
        tokenizer: saved beside the model when given.
        overwrite: replace an existing ``out_dir``.

    Raises:
        LowrankError: if another layer is compressed, the MLPs keep different sizes, or the config
            has no ``intermediate_size``.

    Example:
        >>> plan = lowrank.allocate(model, 0.2, method="modegpt", stats=stats, include=[r"\\.mlp\\."])  # doctest: +SKIP
        >>> compress_modegpt_(model, plan, stats, ModegptConfig(fallback=False))  # doctest: +SKIP
        >>> save_transformers(model, "out/modegpt-20-plain", tokenizer)  # doctest: +SKIP
    """
    from ..io.paths import atomic_directory

    replaced = {name: module for name, module in model.named_modules() if isinstance(module, ReplacementLinear)}
    other = next((name for name, module in replaced.items() if not isinstance(module, ResizedLinear)), None)
    if other is not None:
        raise LowrankError(f"layer {other} is a {type(replaced[other]).__name__}, which plain transformers cannot hold; save with lowrank.save")
    gates = [f"{prefix}.gate_proj" if prefix else "gate_proj" for prefix, module in model.named_modules()
             if all(child in dict(module.named_children()) for child in GATED_MLP)]  # fmt: skip
    sizes = {linear_shape(model.get_submodule(gate))[0] if not isinstance(model.get_submodule(gate), ResizedLinear)
             else model.get_submodule(gate).out_features for gate in gates}  # fmt: skip
    if len(sizes) != 1:
        raise LowrankError(
            f"the MLPs keep different sizes {sorted(sizes)}; plain transformers needs one: compress with --allocate uniform and fallback=false"
        )
    if not hasattr(model.config, "intermediate_size"):
        raise LowrankError(f"{type(model.config).__name__} has no intermediate_size to set; save with lowrank.save")
    plain = copy.deepcopy(model)
    for name, module in replaced.items():
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype
        )
        linear.load_state_dict(module.state_dict())
        set_submodule(plain, name, linear)
    plain.config.intermediate_size = sizes.pop()
    with atomic_directory(out_dir, overwrite) as temporary:
        plain.save_pretrained(temporary, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return Path(out_dir)


def _per_layer(weight, statistics, rank, config, name=""):
    raise LowrankError(
        f"modegpt shrinks whole MLPs, not single layers ({name or 'a layer'}): plan with lowrank.allocate(..., method='modegpt') "
        "and compress with lowrank.methods.modegpt.compress_modegpt_"
    )


register_method(
    ModuleMethod(
        name="modegpt",
        config_class=ModegptConfig,
        factorize=_per_layer,
        build=build_lowrank,
        needs_statistics=True,
        nested=False,
        description="MoDeGPT types I (+ III with attention=value, II with query_key, both with all): gated MLPs keep k neurons, heads k dims; rest whitened (needs --calib)",
        plan=modegpt_plan,
        compress=compress_modegpt_,
        corrects=True,
        output_gram=gram_layers,
    )
)

__all__ = ["FactoredForm", "MlpUnit", "ModegptConfig", "compress_modegpt_", "find_mlp_units", "gram_layers", "modegpt_plan", "save_transformers", "unit_errors"]
