"""``basis-sharing``: one basis for the same projection in neighbouring blocks (Basis Sharing, Wang et al. 2024).

The same projection (``k_proj``, ``gate_proj``, ...) of ``group`` consecutive blocks is stored as one
shared basis and a coefficient matrix per block (:mod:`lowrank.linalg.basis_sharing` derives the
math; :class:`~lowrank.nn.shared_basis_linear.SharedBasisLinear` is the layer):

- ``share`` (default ``q_proj,k_proj,v_proj,gate_proj,up_proj``, the paper's choice: the layers that
  read the block's normalized residual stream) share an *input-side* basis, W_i ≈ C_i·B with
  B (k × in): every layer of the group projects its input onto the same k directions, found, as in
  the authors' code, by the SVD of the stacked weights whitened by the group's pooled input
  covariance; each C_i is then refit in closed form to its own layer's inputs.
- ``share_outputs`` (default none; e.g. ``o_proj,down_proj``, which write into the residual stream)
  share an *output-side* basis, W_i ≈ B·C_i with B (out × k): the SVD of [W_1 R_1, …, W_n R_n],
  R_i each layer's own whitening root, which is the exact joint minimizer of the group's
  calibration error Σ_i ‖(W_i − B C_i) X_i‖² (the paper keeps these layers private).
- every other targeted layer, and a last group of a single block, is factored by ``whiten``
  (``fisher-whiten`` under ``--allocate global``).

Sizes, ``--allocate uniform``: each group gets the largest shared rank whose storage (basis once,
coefficients per block) stays within (1 − ratio) of the group's dense size, so the targeted
parameters shrink by ``ratio`` as with the per-layer methods. Never worse than ``whiten`` on the
calibration objective: for each group the plan compares its error with the sum of its layers'
whitened-SVD errors at the per-layer ranks of the same ratio, and a group that would lose is
factored by ``whiten`` instead (logged; ``fallback=false`` turns this off).

Sizes, ``--allocate global`` (needs gradient statistics; input-side groups only): the allocator
decides which groups share, and at what rank, as ``modegpt`` does for its MLP units. Each group's
basis is the SVD of its stacked weights with every output row weighted by √ of its output Fisher
(:func:`~lowrank.linalg.basis_sharing.shared_input_basis` with ``output_weights``), and its curve is
the predicted loss increase ½·Σ_i Σ_o f_{i,o}·E[Δy_{i,o}²] at every shared rank k, each layer's
coefficients refit (all k from one QR per layer:
:func:`~lowrank.linalg.basis_sharing.shared_input_errors`), priced at k·(in + Σ_i out_i) parameters.
At every k it is compared with the group's layers factored separately by ``fisher-whiten`` with the
same parameters, split among them as well as possible (:class:`SeparateForm`); the group's curve is
the smaller of the two, and the knapsack of ``global`` sizes the groups and every other layer
(``fisher-whiten`` curves) under one budget. A group whose separate form wins at its size is
factored (logged). Finally the whole plan is compared with ``fisher-whiten`` + ``global`` at the
same budget and the one with less predicted loss is kept, so the plan never predicts more loss than
it (it may share nothing). ``details["basis_sharing"]["groups"]`` says which groups share; ``lowrank
plan`` prints it in its options column.

The per-layer interface cannot share a basis across layers: plan with :func:`lowrank.allocate`
(``method="basis-sharing"``) and compress with :func:`lowrank.compress_` (which runs
:func:`compress_basis_sharing_`), or ``lowrank compress --method basis-sharing --allocate uniform``
(or ``global``).

Example:
    >>> plan = lowrank.allocate(model, 0.4, method="basis-sharing", stats=stats)  # doctest: +SKIP
    >>> report = lowrank.compress_(model, plan, method="basis-sharing", stats=stats)  # doctest: +SKIP
    >>> lowrank.save(model, "out/shared-40", report=report)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..linalg import rank_for_ratio
from ..linalg.basis_sharing import SharedBasisFactors, group_rank, shared_basis, shared_input_errors
from ..linalg.rank import max_factored_rank
from ..linalg.weighted import row_weights
from ..nn import find_blocks, find_targets, linear_bias, linear_shape, linear_weight, set_submodule
from ..nn.shared_basis_linear import SharedBasisLayerFactors, SharedBasisLinear
from .fisher_whiten import FisherWhitenConfig
from .module_method import ModuleMethod, check_dense, check_layers, counts_before, factor_the_rest, module_report, planned_total
from .registry import register_method
from .svd import build_lowrank
from .whiten import WhitenConfig

log = logging.getLogger(__name__)

PLAN_KEY = "basis_sharing"  # Plan.details[PLAN_KEY]["groups"]: what compress_basis_sharing_ does with each group
SHARED = "basis-sharing"
FACTORED = ("auto", "whiten", "fisher-whiten")


@dataclass
class BasisSharingConfig:
    """Options of ``basis-sharing``.

    Attributes:
        group: how many neighbouring blocks share one basis (the paper's default, 2).
        share: comma-separated projection names (the last part of a layer's name) sharing an
            input-side basis across blocks; the paper's q/k/v/gate/up by default.
        share_outputs: comma-separated projection names sharing an output-side basis (e.g.
            ``o_proj,down_proj``); none by default, as in the paper.
        damp: damping of the input covariances, relative to their mean eigenvalue (as ``whiten``'s).
        factored: the method for every layer that shares no basis: ``"auto"`` (``whiten`` with
            ``--allocate uniform``, ``fisher-whiten`` with ``global``), ``"whiten"`` or
            (``global`` only) ``"fisher-whiten"``.
        fallback: factor a group separately where that predicts less error (``global``: and keep
            ``fisher-whiten`` + ``global``'s plan when it predicts less loss).
        fisher_damp: ``global``: added to each output's Fisher information, relative to the mean (as ``fisher-whiten``'s).
    """

    version: int = 1
    group: int = 2
    share: str = "q_proj,k_proj,v_proj,gate_proj,up_proj"
    share_outputs: str = ""
    damp: float = 0.0
    factored: str = "auto"
    fallback: bool = True
    fisher_damp: float = 1e-6


def _names(option: str) -> list[str]:
    return [name.strip() for name in option.split(",") if name.strip()]


def _check_config(config: BasisSharingConfig) -> None:
    if not isinstance(config, BasisSharingConfig):
        raise LowrankError(f"basis-sharing takes a BasisSharingConfig, got {type(config).__name__}")
    if config.group < 1:
        raise LowrankError(f"basis-sharing's group is the number of blocks sharing a basis, ≥ 1; got {config.group} (the paper uses 2)")
    both = sorted(set(_names(config.share)) & set(_names(config.share_outputs)))
    if both:
        raise LowrankError(f"projection {both[0]!r} is in both share and share_outputs; a layer shares one side only")
    if config.factored not in FACTORED:
        raise LowrankError(f"basis-sharing's factored must be one of {', '.join(FACTORED)}, got {config.factored!r}")


def _factored_method(config: BasisSharingConfig, strategy: str) -> str:
    if config.factored == "auto":
        return "fisher-whiten" if strategy == "global" else "whiten"
    if config.factored == "fisher-whiten" and strategy != "global":
        raise LowrankError("basis-sharing factors with fisher-whiten under --allocate global only; pass --allocate global or factored=whiten")
    return config.factored


@dataclass
class SharedGroup:
    """The same projection in neighbouring blocks, sharing one basis.

    Attributes:
        name: e.g. ``model.layers.0-1.self_attn.k_proj``.
        members: the layers' full names, in block order (the first owns the basis).
        side: ``"input"`` or ``"output"``.
        shape: (out, in) of every member.
    """

    name: str
    members: list[str]
    side: str
    shape: tuple[int, int]


def find_groups(model: nn.Module, names: Sequence[str], config: BasisSharingConfig) -> list[SharedGroup]:
    """The groups of ``config.group`` consecutive blocks' same projection among ``names`` (groups of one included).

    Example:
        >>> [g.name for g in find_groups(model, lowrank.find_targets(model), BasisSharingConfig())][:2]  # doctest: +SKIP
        ['model.layers.0-1.self_attn.q_proj', 'model.layers.0-1.self_attn.k_proj']
    """
    sides = {name: "input" for name in _names(config.share)} | {name: "output" for name in _names(config.share_outputs)}
    by_projection: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for stack_name, stack in find_blocks(model):
        for name in names:
            if not name.startswith(stack_name + "."):
                continue
            index, _, suffix = name[len(stack_name) + 1 :].partition(".")
            if index.isdigit() and suffix.rpartition(".")[2] in sides:
                by_projection.setdefault((stack_name, suffix), []).append((int(index), name))
    groups = []
    for (stack_name, suffix), layers in by_projection.items():
        layers.sort()
        for start in range(0, len(layers), config.group):
            chunk = layers[start : start + config.group]
            shapes = {linear_shape(model.get_submodule(name)) for _, name in chunk}
            if len(shapes) != 1:  # blocks of different widths cannot share a basis: each layer alone
                chunks = [[layer] for layer in chunk]
            else:
                chunks = [chunk]
            for part in chunks:
                first, last = part[0][0], part[-1][0]
                label = f"{stack_name}.{first}-{last}.{suffix}" if last != first else f"{stack_name}.{first}.{suffix}"
                shape = linear_shape(model.get_submodule(part[0][1]))
                groups.append(SharedGroup(label, [name for _, name in part], sides[suffix.rpartition(".")[2]], shape))
    return groups


def group_factors(
    model: nn.Module, group: SharedGroup, stats: dict[str, LayerStatistics], rank: int, damp: float, fisher_damp: float | None = None
) -> SharedBasisFactors:
    """The group's shared basis and coefficients at ``rank`` from its layers' weights and calibration statistics.

    ``fisher_damp`` set (``global``): an input-side basis weights each output row by √ of its
    output Fisher (:func:`output_weights`)."""
    weights = [linear_weight(model.get_submodule(name)).detach() for name in group.members]
    covariances = [stats[name].xtx.to(weights[0].device) for name in group.members]
    whitenings = [stats[name].whitening(damp, torch.float64, name=name) for name in group.members]
    options = {} if fisher_damp is None else {"output_weights": output_weights(group, stats, fisher_damp)}
    return shared_basis(group.side, weights, covariances, rank, damp=damp, whitenings=whitenings, **options)


def output_weights(group: SharedGroup, stats: dict[str, LayerStatistics], fisher_damp: float) -> list[torch.Tensor]:
    """Per member, √(its output Fisher + damping): the row weights ``fisher-whiten`` uses."""
    if any(stats[name].output_fisher is None for name in group.members):
        raise LowrankError(
            "basis-sharing --allocate global needs gradient statistics; calibrate with gradients=True (the CLI does it) or use --allocate uniform"
        )
    return [row_weights(stats[name].output_fisher, fisher_damp) for name in group.members]


def whitened_error(model: nn.Module, name: str, statistics: LayerStatistics, rank: int, damp: float) -> float:
    """``whiten``'s calibration error ‖(W − W′)X‖² at ``rank``: the discarded squared singular values of W·R."""
    weight = linear_weight(model.get_submodule(name)).detach().double()
    white = statistics.whitening(damp, torch.float64, name=name)
    values = torch.linalg.svdvals(weight @ white.root.to(weight.device))
    return values[rank:].square().sum().item()


def basis_sharing_plan(
    model: nn.Module,
    ratio: float,
    stats: dict[str, LayerStatistics] | None = None,
    strategy: str = "uniform",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_dense: bool = True,
    config: BasisSharingConfig | None = None,
    strategy_config: BasisSharingConfig | None = None,
    **_unused,
):
    """The plan of a ``basis-sharing`` run: a shared rank per group, ranks of the other layers.

    :func:`lowrank.allocate` calls this for ``method="basis-sharing"``. ``plan.ranks`` gives each
    member of a shared group the group's rank k (``planned_parameters`` counts the group's basis once
    and each member's coefficients), each layer factored by ``whiten`` its rank;
    ``details["basis_sharing"]["groups"]`` lists every group with its side, rank, structure and
    both calibration errors.

    Args:
        model: the dense model.
        ratio: fraction of the targeted layers' weight parameters to remove.
        stats: calibration statistics (input covariances).
        strategy: ``"uniform"`` or ``"global"`` (needs gradient statistics; see the module docstring).
        include / exclude: layer selection, as :func:`lowrank.find_targets`.
        allow_dense: whether ``global`` may leave a group or layer dense (uniform sizes every layer).
        config: the method's options, as :func:`lowrank.allocate` passes its ``method_config``; also read from ``strategy_config``.

    Returns:
        A :class:`~lowrank.Plan` for :func:`compress_basis_sharing_`.

    Example:
        >>> plan = basis_sharing_plan(model, 0.4, stats)  # doctest: +SKIP
        >>> plan.details["basis_sharing"]["groups"]["model.layers.0-1.self_attn.k_proj"]["rank"]  # doctest: +SKIP
        51
    """
    from ..allocation.plan import Plan

    config = config or strategy_config or BasisSharingConfig()
    _check_config(config)
    if not 0.0 <= ratio < 1.0:
        raise LowrankError(f"ratio must be in [0, 1), got {ratio}; e.g. 0.3 removes 30 % of the targeted parameters")
    if stats is None:
        raise LowrankError("basis-sharing whitens with calibration statistics; pass --calib FILE (or stats=calibrate(...))")
    if strategy not in ("uniform", "global"):
        raise LowrankError(f"basis-sharing sizes its groups with --allocate uniform or global (not {strategy!r}); pass --allocate uniform")
    factored_method = _factored_method(config, strategy)
    names = find_targets(model, include=include, exclude=exclude)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    missing = next((name for name in names if name not in stats), None)
    if missing is not None:
        raise LowrankError(f"no calibration statistics for layer {missing}; calibrate with the same --include/--exclude")
    if strategy == "global":
        return _global_plan(model, ratio, stats, names, shapes, config, factored_method, allow_dense)
    groups = [group for group in find_groups(model, names, config) if len(group.members) > 1]
    ranks = {name: rank for name in names if (rank := rank_for_ratio(*shapes[name], ratio)) is not None}
    described = {}
    for group in groups:
        out_features, in_features = group.shape
        rank = group_rank(out_features, in_features, len(group.members), ratio, group.side)
        if rank is None:
            continue  # no shared rank saves anything: the members are sized like any other layer
        factors = group_factors(model, group, stats, rank, config.damp)
        alone = {name: ranks[name] for name in group.members if name in ranks}
        factored_error = (
            sum(whitened_error(model, name, stats[name], alone[name], config.damp) for name in alone)
            if len(alone) == len(group.members)
            else float("inf")
        )
        falls_back = config.fallback and factored_error < factors.error
        if falls_back:
            log.info(
                "basis-sharing: %s is factored with whiten (calibration error %.4g < %.4g shared at rank %d)",
                group.name,
                factored_error,
                factors.error,
                rank,
            )
        else:
            ranks.update({name: rank for name in group.members})
        described[group.name] = {
            "members": list(group.members),
            "side": group.side,
            "rank": rank,
            "structure": "whiten" if falls_back else SHARED,
            "error": factors.error,
            "factored_error": factored_error,
            "shared_parameters": factors.parameters(),
        }
    plan = Plan(ratio=ratio, strategy=strategy, shapes=shapes, ranks=ranks, details={PLAN_KEY: {"groups": described, "factored": factored_method}})
    # A shared group's basis and coefficients, counted once, on its first member.
    replaced = {
        name: entry["shared_parameters"] if index == 0 else 0
        for entry in described.values()
        if entry["structure"] == SHARED
        for index, name in enumerate(entry["members"])
    }
    plan.details["planned_parameters"] = planned_total(plan, replaced)
    return plan


@dataclass
class SeparateForm:
    """A group's layers factored separately instead, the parameters of each shared rank split among them as well as possible.

    Every rank-one component of any member costs the same (out + in) parameters and each member's
    gains are non-increasing, so the best R components are the R largest gains of all members,
    with one forced into each (a factored layer has rank ≥ 1).

    Attributes:
        members: the group's layers.
        gains: per member, its non-increasing loss gains of every rank (the error at rank r is the sum from r on).
        component: parameters of one rank-one component of one member (out + in).
        largest: the largest factored rank of a member (its factors still smaller than dense).
    """

    members: list[str]
    gains: list[torch.Tensor]
    component: int
    largest: int

    def _choices(self) -> list[torch.Tensor]:
        return [g[1 : self.largest] for g in self.gains]  # rank 1 is forced, ranks past largest are not on offer

    def errors(self, step: int, largest: int) -> torch.Tensor:
        """(largest + 1,) the summed error at the parameters of shared ranks k = 0 … largest, k·``step``
        (``inf`` where they buy fewer components than members)."""
        total = sum(g.sum() for g in self.gains)
        first = sum(g[0] for g in self.gains)
        rest = torch.cat(self._choices()).sort(descending=True).values
        captured = torch.cat([rest.new_zeros(1), rest.cumsum(0)])
        errors = torch.full((largest + 1,), float("inf"), dtype=torch.float64)
        for k in range(largest + 1):
            components = k * step // self.component - len(self.members)
            if components >= 0:
                errors[k] = (total - first - captured[min(components, len(rest))]).clamp(min=0)
        return errors

    def ranks(self, parameters: int) -> dict[str, int]:
        """{member: rank} of the best split of ``parameters``."""
        components = parameters // self.component - len(self.members)
        values = torch.cat(self._choices())
        owners = torch.cat([torch.full((len(g),), index) for index, g in enumerate(self._choices())])
        chosen = owners[torch.sort(values, descending=True, stable=True).indices[: max(components, 0)]]
        return {name: 1 + int((chosen == index).sum()) for index, name in enumerate(self.members)}


def shared_curve(model: nn.Module, group: SharedGroup, stats: dict[str, LayerStatistics], config: BasisSharingConfig) -> torch.Tensor:
    """(K + 1,) the group's predicted loss increase per token, ½·Σ_i Σ_o f_{i,o}·E[Δy_{i,o}²], at shared
    ranks k = 0 … K (K = min(in, Σ out_i)), its basis Fisher-weighted and each layer's coefficients refit.

    Example:
        >>> shared_curve(model, find_groups(model, names, config)[0], stats, config)[:3]  # doctest: +SKIP
        tensor([0.9210, 0.5102, 0.3311], dtype=torch.float64)
    """
    out_features, in_features = group.shape
    largest = min(in_features, out_features * len(group.members))
    factors = group_factors(model, group, stats, largest, config.damp, config.fisher_damp)
    weights = [linear_weight(model.get_submodule(name)).detach() for name in group.members]
    whitenings = [stats[name].whitening(config.damp, torch.float64, name=name) for name in group.members]
    scales = [0.5 / max(stats[name].num_tokens, 1) for name in group.members]
    return shared_input_errors(weights, whitenings, factors.basis, output_weights(group, stats, config.fisher_damp), scales)


def _global_plan(model, ratio, stats, names, shapes, config: BasisSharingConfig, factored_method: str, allow_dense: bool):
    """``--allocate global``: groups and layers sized by one knapsack (see the module docstring)."""
    from ..allocation.curves import loss_curves
    from ..allocation.knapsack import budget_for_ratio, greedy_ranks, predicted_error
    from ..allocation.plan import Plan

    if any(stats[name].output_fisher is None for name in names):
        raise LowrankError(
            "basis-sharing --allocate global needs gradient statistics; calibrate with gradients=True (the CLI does it) or use --allocate uniform"
        )
    if _names(config.share_outputs):
        raise LowrankError("basis-sharing --allocate global prices input-side groups only; drop share_outputs or use --allocate uniform")
    groups = [group for group in find_groups(model, names, config) if len(group.members) > 1]
    members = {name for group in groups for name in group.members}
    others = [name for name in names if name not in members]
    curves = loss_curves(model, names, stats, factored_method)  # per layer: the loss gain of each rank
    tails = {name: torch.cat([g.double().flip(0).cumsum(0).flip(0), g.new_zeros(1, dtype=torch.float64)]) for name, g in curves.items()}
    budget = budget_for_ratio(shapes, ratio)

    shared, separate, best, steps = {}, {}, {}, {}
    for group in groups:
        out_features, in_features = group.shape
        step, dense = in_features + out_features * len(group.members), out_features * in_features * len(group.members)
        largest = (dense - 1) // step  # the largest shared rank still smaller than the dense layers
        curve = shared_curve(model, group, stats, config)
        if len(curve) < largest + 1:  # past the stacked rank nothing is left to gain
            curve = torch.cat([curve, curve[-1:].expand(largest + 1 - len(curve))])
        shared[group.name], steps[group.name] = curve[: largest + 1], (step, dense)
        gains = [curves[name].double().clamp(min=0) for name in group.members]
        separate[group.name] = SeparateForm(list(group.members), gains, out_features + in_features, max_factored_rank(out_features, in_features))
        errors = separate[group.name].errors(step, largest)
        best[group.name] = torch.minimum(shared[group.name], errors) if config.fallback else shared[group.name]

    if ratio == 0.0:
        sizes: dict[str, int | None] = {name: None for name in [*others, *(group.name for group in groups)]}
    else:
        gains = {name: curves[name] for name in others}
        # The group's error at k is the tail of its gains from k: the last gain is its error at the largest k, so dense is 0.
        gains.update({name: torch.cat([(curve[:-1] - curve[1:]).clamp(min=0), curve[-1:]]) for name, curve in best.items()})
        entry_shapes = {name: shapes[name] for name in others} | {group.name: group.shape for group in groups}
        sizes = greedy_ranks(gains, entry_shapes, budget, allow_dense=allow_dense, prices=steps)

    ranks = {name: sizes[name] for name in others if sizes[name] is not None}
    predicted = sum(tails[name][sizes[name]].item() for name in others if sizes[name] is not None)
    described, replaced, layer_options = {}, {}, {}
    for group in groups:
        kept = sizes[group.name]
        entry = {"members": list(group.members), "side": group.side, "rank": kept, "structure": "dense", "predicted_error": 0.0,
                 "factored_predicted_error": 0.0, "shared_parameters": 0}  # fmt: skip
        if kept is not None:
            step = steps[group.name][0]
            own, other = shared[group.name][kept].item(), separate[group.name].errors(step, kept)[kept].item()
            falls_back = config.fallback and other < own
            entry.update(predicted_error=own, factored_predicted_error=other, shared_parameters=kept * step)
            if falls_back:
                split = separate[group.name].ranks(kept * step)
                log.info("basis-sharing: %s is factored with %s at ranks %s (predicted loss %.3g < %.3g shared at rank %d)",
                         group.name, factored_method, "/".join(map(str, split.values())), other, own, kept)  # fmt: skip
                ranks.update(split)
                entry["structure"] = factored_method
            else:
                ranks.update({name: kept for name in group.members})
                replaced.update({name: kept * step if index == 0 else 0 for index, name in enumerate(group.members)})
                entry["structure"] = SHARED
            predicted += other if falls_back else own
        described[group.name] = entry

    per_layer_ranks = greedy_ranks(curves, shapes, budget, allow_dense=allow_dense) if ratio > 0.0 else {name: None for name in names}
    per_layer = predicted_error(curves, per_layer_ranks)
    if config.fallback and per_layer < predicted:
        log.info("basis-sharing: no group shares: %s + global alone predicts less loss (%.4g < %.4g)", factored_method, per_layer, predicted)
        ranks = {name: rank for name, rank in per_layer_ranks.items() if rank is not None}
        replaced, predicted = {}, per_layer
        for entry in described.values():
            if entry["structure"] == SHARED:
                entry["structure"] = factored_method
    for group_name, entry in described.items():  # what `lowrank plan` prints beside each member
        for name in entry["members"]:
            layer_options[name] = {"group": group_name, "structure": entry["structure"]}
    sharing = sum(entry["structure"] == SHARED for entry in described.values())
    log.info("basis-sharing: %d of %d groups share a basis (global, predicted loss %.4g nats/token; %s + global alone: %.4g)",
             sharing, len(described), predicted, factored_method, per_layer)  # fmt: skip
    details = {PLAN_KEY: {"groups": described, "factored": factored_method, "fisher_weighted_basis": True, "per_layer_predicted_error": per_layer},
               "layer_options": layer_options}  # fmt: skip
    plan = Plan(ratio=ratio, strategy="global", shapes=shapes, ranks=ranks, details=details)
    plan.details["planned_parameters"] = planned_total(plan, replaced)
    plan.predicted_error = predicted
    return plan


@torch.no_grad()
def compress_basis_sharing_(
    model: nn.Module, plan, stats: dict[str, LayerStatistics], config: BasisSharingConfig | None = None, progress: bool = True
):
    """Apply a ``basis-sharing`` plan to ``model`` in place: shared groups, the rest whitened.

    Args:
        model: the dense model (modified in place).
        plan: from :func:`lowrank.allocate` with ``method="basis-sharing"`` (:func:`basis_sharing_plan`).
        stats: the calibration statistics the plan was made from.
        config: the method's options (use the ones the plan was made with); default: its defaults.
        progress: show progress bars.

    Returns:
        A :class:`~lowrank.CompressionReport` (method ``basis-sharing``); its parameter and bit counts
        hold every shared basis once.

    Raises:
        LowrankError: if the model is already compressed or the plan was not made for basis-sharing.

    Example:
        >>> report = compress_basis_sharing_(model, lowrank.allocate(model, 0.4, method="basis-sharing", stats=stats), stats)  # doctest: +SKIP
    """
    config = config if config is not None else BasisSharingConfig()
    _check_config(config)
    check_dense(model)
    described = plan.details.get(PLAN_KEY, {}).get("groups") if isinstance(plan.details, dict) else None
    if described is None:
        raise LowrankError(
            "this plan was not made for basis-sharing; make it with lowrank.allocate(model, ratio, method='basis-sharing', stats=stats)"
        )
    if stats is None:
        raise LowrankError("basis-sharing whitens with calibration statistics; pass --calib FILE (or stats=calibrate(...))")
    check_layers(model, plan.ranks, stats)
    before = counts_before(model, plan)
    shared = {name: entry for name, entry in described.items() if entry["structure"] == SHARED}
    shared_members = {member for entry in shared.values() for member in entry["members"]}
    factored_method = plan.details[PLAN_KEY].get("factored", "whiten")
    fisher_damp = config.fisher_damp if plan.details[PLAN_KEY].get("fisher_weighted_basis") else None  # the basis the plan priced
    factored_config = (
        FisherWhitenConfig(damp=config.damp, fisher_damp=config.fisher_damp) if factored_method == "fisher-whiten" else WhitenConfig(damp=config.damp)
    )
    factored, modules = factor_the_rest(model, plan, shared_members, factored_method, stats, factored_config, progress)
    for group_name, entry in tqdm(shared.items(), desc="compress (basis-sharing)", disable=not progress, unit="group"):
        members = entry["members"]
        group = SharedGroup(group_name, members, entry["side"], linear_shape(model.get_submodule(members[0])))
        factors = group_factors(model, group, stats, entry["rank"], config.damp, fisher_damp)
        owner = None
        for index, name in enumerate(members):
            layer = model.get_submodule(name)
            weight, bias = linear_weight(layer), linear_bias(layer)
            layer_factors = SharedBasisLayerFactors(
                group.side, factors.basis if owner is None else owner.basis, factors.coefficients[index], None if owner is None else members[0]
            )
            replacement = SharedBasisLinear.from_factors(layer_factors, bias, weight.dtype, device=weight.device)
            if owner is None:
                owner = replacement
            set_submodule(model, name, replacement)
            modules[name] = {
                "structure": type(replacement).__name__,
                "in_features": replacement.in_features,
                "out_features": replacement.out_features,
                "bias": bias is not None,
                **replacement.spec(),
            }

    report = module_report(SHARED, config, plan, modules, model, before)
    log.info(
        "basis-sharing: %d groups share a basis, %d layers factored with %s: targeted parameters %d → %d (%.1f %% removed)",
        len(shared), len(factored), factored_method, before["targeted_before"], report.parameters["targeted_after"],
        100 * (1 - report.parameters["targeted_after"] / before["targeted_before"]),
    )  # fmt: skip
    return report


def _per_layer(weight, statistics, rank, config, name=""):
    raise LowrankError(
        f"basis-sharing shares a basis across layers, not within one ({name or 'a layer'}): plan with lowrank.allocate(..., method='basis-sharing') "
        "and compress with lowrank.compress_"
    )


register_method(
    ModuleMethod(
        name=SHARED,
        config_class=BasisSharingConfig,
        factorize=_per_layer,
        build=build_lowrank,
        needs_statistics=True,
        nested=False,
        description="Basis Sharing: q/k/v/gate/up of neighbouring blocks share one whitened basis, per-layer coefficients; others whitened (needs --calib; --allocate uniform, or global: the knapsack decides which groups share)",
        plan=basis_sharing_plan,
        compress=compress_basis_sharing_,
    )
)

__all__ = [
    "BasisSharingConfig",
    "SeparateForm",
    "SharedGroup",
    "basis_sharing_plan",
    "compress_basis_sharing_",
    "find_groups",
    "group_factors",
    "output_weights",
    "shared_curve",
    "whitened_error",
]
