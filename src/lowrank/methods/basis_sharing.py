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
- every other targeted layer, and a last group of a single block, is factored by ``whiten``.

Sizes: ``--allocate uniform`` only: each group gets the largest shared rank whose storage (basis once,
coefficients per block) stays within (1 − ratio) of the group's dense size, so the targeted
parameters shrink by ``ratio`` as with the per-layer methods. Not (yet) priced by the ``global``
allocator.

Never worse than ``whiten`` on the calibration objective: for each group the plan compares its
error with the sum of its layers' whitened-SVD errors at the per-layer ranks of the same ratio, and
a group that would lose is factored by ``whiten`` instead (logged; ``fallback=false`` turns this off).

The per-layer interface cannot share a basis across layers: plan with :func:`lowrank.allocate`
(``method="basis-sharing"``) and compress with :func:`lowrank.compress_` (which runs
:func:`compress_basis_sharing_`), or ``lowrank compress --method basis-sharing --allocate uniform``.

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
from ..linalg.basis_sharing import SharedBasisFactors, group_rank, shared_basis
from ..nn import find_blocks, find_targets, linear_bias, linear_shape, linear_weight, set_submodule
from ..nn.shared_basis_linear import SharedBasisLayerFactors, SharedBasisLinear
from .module_method import ModuleMethod, check_dense, check_layers, counts_before, factor_the_rest, module_report, planned_total
from .registry import register_method
from .svd import build_lowrank
from .whiten import WhitenConfig

log = logging.getLogger(__name__)

PLAN_KEY = "basis_sharing"  # Plan.details[PLAN_KEY]["groups"]: what compress_basis_sharing_ does with each group
SHARED = "basis-sharing"


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
        factored: the method for every layer that shares no basis (``whiten``).
        fallback: factor a group with ``whiten`` where that predicts less calibration error.
    """

    version: int = 1
    group: int = 2
    share: str = "q_proj,k_proj,v_proj,gate_proj,up_proj"
    share_outputs: str = ""
    damp: float = 0.0
    factored: str = "whiten"
    fallback: bool = True


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
    if config.factored != "whiten":
        raise LowrankError(f"basis-sharing factors the layers it does not share with whiten, got factored={config.factored!r}")


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


def group_factors(model: nn.Module, group: SharedGroup, stats: dict[str, LayerStatistics], rank: int, damp: float) -> SharedBasisFactors:
    """The group's shared basis and coefficients at ``rank`` from its layers' weights and calibration statistics."""
    weights = [linear_weight(model.get_submodule(name)).detach() for name in group.members]
    covariances = [stats[name].xtx.to(weights[0].device) for name in group.members]
    whitenings = [stats[name].whitening(damp, torch.float64, name=name) for name in group.members]
    return shared_basis(group.side, weights, covariances, rank, damp=damp, whitenings=whitenings)


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
        strategy: ``"uniform"`` (the only one so far).
        include / exclude: layer selection, as :func:`lowrank.find_targets`.
        allow_dense: unused (uniform sizes every layer).
        config: the method's options; also taken as ``strategy_config``, as :func:`lowrank.allocate` passes them.

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
    if strategy != "uniform":
        raise LowrankError(f"basis-sharing sizes its groups with --allocate uniform only (not {strategy!r}); pass --allocate uniform")
    names = find_targets(model, include=include, exclude=exclude)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    missing = next((name for name in names if name not in stats), None)
    if missing is not None:
        raise LowrankError(f"no calibration statistics for layer {missing}; calibrate with the same --include/--exclude")
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
    plan = Plan(ratio=ratio, strategy=strategy, shapes=shapes, ranks=ranks, details={PLAN_KEY: {"groups": described}})
    # A shared group's basis and coefficients, counted once, on its first member.
    replaced = {
        name: entry["shared_parameters"] if index == 0 else 0
        for entry in described.values()
        if entry["structure"] == SHARED
        for index, name in enumerate(entry["members"])
    }
    plan.details["planned_parameters"] = planned_total(plan, replaced)
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
    factored, modules = factor_the_rest(model, plan, shared_members, config.factored, stats, WhitenConfig(damp=config.damp), progress)
    for group_name, entry in tqdm(shared.items(), desc="compress (basis-sharing)", disable=not progress, unit="group"):
        members = entry["members"]
        group = SharedGroup(group_name, members, entry["side"], linear_shape(model.get_submodule(members[0])))
        factors = group_factors(model, group, stats, entry["rank"], config.damp)
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
        len(shared), len(factored), config.factored, before["targeted_before"], report.parameters["targeted_after"],
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
        description="Basis Sharing: q/k/v/gate/up of neighbouring blocks share one whitened basis, per-layer coefficients; others whitened (needs --calib, --allocate uniform)",
        plan=basis_sharing_plan,
        compress=compress_basis_sharing_,
    )
)

__all__ = ["BasisSharingConfig", "SharedGroup", "basis_sharing_plan", "compress_basis_sharing_", "find_groups", "group_factors", "whitened_error"]
