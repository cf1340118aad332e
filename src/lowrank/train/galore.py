"""GradientProjectionAdamW: AdamW whose moments live in a low-rank subspace of each gradient (GaLore).

For a weight matrix with gradient ``G`` (out × in), every ``update_proj_gap`` steps a basis ``P``
of ``rank`` orthonormal vectors is chosen for ``G`` (see :mod:`lowrank.train.projection`); each
step AdamW runs on the projected gradient ``G·P`` (out × rank) and its update is mapped back by
``Pᵀ`` and multiplied by ``scale``. The two Adam moments then cost ``2·out·rank`` numbers instead
of ``2·out·in``; the basis costs ``in·rank`` more (SVD) or ``rank`` column indices (DCT).

Parameters in a group whose ``rank`` is ``None``, or that are not matrices, get plain AdamW. A
matrix whose smaller side is at most ``rank`` is updated in full, without a basis (a full-rank
subspace would only rotate the moments), still multiplied by ``scale``: with ``scale = 1`` that is
exactly AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .projection import PROJECTION_TYPES, dct_matrix, project, project_back, projection_side, randomized_svd_basis, select_dct_columns, svd_basis

RESIDUAL_UPDATES = ("none", "sign")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # Under FSDP a gradient is a sharded DTensor: gather it, so the projection sees the whole
    # (already reduced) gradient rather than this process's rows.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like_parameter(update: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    # The inverse of `_full`: keep this process's shard of a full-size update (a local slice, no
    # communication, because every process computed the same full update).
    if not hasattr(parameter, "device_mesh"):
        return update
    from torch.distributed.tensor import DTensor, Replicate

    mesh = parameter.device_mesh
    replicated = DTensor.from_local(update, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, parameter.placements)


class GradientProjectionAdamW(torch.optim.Optimizer):
    """AdamW inside a low-rank gradient subspace (the GaLore optimizer), with an SVD-free DCT variant.

    Per parameter group options (besides AdamW's ``lr``, ``betas``, ``eps``, ``weight_decay``):

    - ``rank``: subspace dimension; ``None`` means plain AdamW for the group.
    - ``update_proj_gap``: steps between basis refreshes.
    - ``scale``: multiplies the projected update (GaLore's α; 1 with full rank gives AdamW).
    - ``proj_type``: ``"svd"`` (top singular vectors of the gradient), ``"randomized_svd"``, or
      ``"dct"`` (the ``rank`` columns of a fixed orthogonal DCT matrix best aligned with the
      gradient; only their indices are stored).
    - ``residual``: ``"none"`` (GaLore: the part of the gradient outside the subspace is dropped)
      or ``"sign"`` (FRUGAL-style: that residual gets a state-free signSGD step of size
      ``lr·scale``, so no direction is ever frozen, at no memory cost).
    - ``seed``: seeds the randomized SVD sketches (one stream per parameter and refresh step).

    The state of each parameter is tensors only (``step``, ``exp_avg``, ``exp_avg_sq``, and
    ``basis`` or ``columns``), so ``torch.load(..., weights_only=True)`` reads a saved
    ``state_dict()`` and a resumed run continues bit-identically. Under DDP the optimizer sees the
    all-reduced gradients; under FSDP (``fully_shard``) each projected gradient is gathered first,
    and the subspace state is kept whole on every process.

    Example:
        >>> model = nn.Linear(64, 64)
        >>> optimizer = GradientProjectionAdamW(
        ...     [{"params": [model.weight], "rank": 8}, {"params": [model.bias]}], lr=1e-3, proj_type="dct")
        >>> model(torch.randn(4, 64)).sum().backward()
        >>> optimizer.step()
        >>> optimizer.state[model.weight]["exp_avg"].shape
        torch.Size([64, 8])
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "svd",
        residual: str = "none",
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type, residual=residual, seed=seed,
        )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["proj_type"] not in PROJECTION_TYPES:
                raise ValueError(f"proj_type must be one of {PROJECTION_TYPES}, got {group['proj_type']!r}")
            if group["residual"] not in RESIDUAL_UPDATES:
                raise ValueError(f"residual must be one of {RESIDUAL_UPDATES}, got {group['residual']!r}")
            if group["rank"] is not None and group["rank"] < 1:
                raise ValueError(f"rank must be a positive integer or None, got {group['rank']}")
            if group["update_proj_gap"] < 1:
                raise ValueError(f"update_proj_gap must be ≥ 1, got {group['update_proj_gap']}")
        self._dct_cache: dict[tuple, torch.Tensor] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a saved state; DCT column indices, cast to the parameter dtype by torch, become integers again."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "columns" in state:
                state["columns"] = state["columns"].long()

    def _dct(self, size: int, dtype: torch.dtype, device) -> torch.Tensor:
        # Deterministic and rebuilt on demand, hence never part of the state dict.
        key = (size, dtype, str(device))
        if key not in self._dct_cache:
            self._dct_cache[key] = dct_matrix(size, dtype=dtype, device=device)
        return self._dct_cache[key]

    @staticmethod
    def is_projected(group: dict, parameter: torch.Tensor) -> bool:
        """Whether ``parameter`` is optimized in a subspace with a basis (a matrix whose smaller side exceeds ``rank``)."""
        return group["rank"] is not None and parameter.ndim == 2 and min(parameter.shape) > group["rank"]

    def _refresh_basis(self, state: dict, group: dict, grad: torch.Tensor, side: str, parameter_index: int, step: int) -> None:
        rank, kind = group["rank"], group["proj_type"]
        if kind == "svd":
            state["basis"] = svd_basis(grad, rank, side)
        elif kind == "randomized_svd":
            generator = torch.Generator().manual_seed(group["seed"] * 1_000_003 + parameter_index * 10_007 + step)
            state["basis"] = randomized_svd_basis(grad, rank, side, generator)
        else:
            dimension = grad.shape[1] if side == "right" else grad.shape[0]
            dct = self._dct(dimension, torch.promote_types(grad.dtype, torch.float32), grad.device)
            state["columns"] = select_dct_columns(grad, dct, rank, side)

    def _basis(self, state: dict, group: dict, grad: torch.Tensor, side: str) -> torch.Tensor:
        if "columns" in state:
            dimension = grad.shape[1] if side == "right" else grad.shape[0]
            basis = self._dct(dimension, torch.promote_types(grad.dtype, torch.float32), grad.device)[:, state["columns"]]
        else:
            basis = state["basis"]
        return basis.to(grad.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; ``closure`` re-evaluates the model and returns the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        parameter_index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                parameter_index += 1
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                step = int(state["step"])
                projected = self.is_projected(group, parameter)
                if projected:
                    grad = _full(parameter.grad)
                    side = projection_side(grad.shape)
                    if step % group["update_proj_gap"] == 0:
                        self._refresh_basis(state, group, grad, side, parameter_index, step)
                    basis = self._basis(state, group, grad, side)
                    moment_input = project(grad, basis, side)
                else:
                    grad = moment_input = parameter.grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(moment_input)
                    state["exp_avg_sq"] = torch.zeros_like(moment_input)
                state["step"] += 1
                step += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(moment_input, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(moment_input, moment_input, value=1 - beta2)
                # The same operations, in the same order, as torch.optim.AdamW (so full rank matches it).
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = math.sqrt(1 - beta2**step)
                denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                parameter.mul_(1 - group["lr"] * group["weight_decay"])
                if not projected:
                    scale = group["scale"] if group["rank"] is not None and parameter.ndim == 2 else 1.0
                    parameter.addcdiv_(exp_avg, denominator, value=-group["lr"] * scale / bias_correction1)
                    continue
                update = project_back(exp_avg / denominator, basis, side) * (group["scale"] / bias_correction1)
                if group["residual"] == "sign":
                    update += (grad - project_back(moment_input, basis, side)).sign() * group["scale"]
                parameter.add_(_like_parameter(update, parameter), alpha=-group["lr"])
        return loss


def projected_parameter_groups(model: nn.Module, rank: int, **options) -> list[dict]:
    """Parameter groups for :class:`GradientProjectionAdamW`: every matrix projected, the rest plain AdamW.

    Matrices include the embedding (often the largest one, so projecting it matters most for
    memory); a matrix whose smaller side is at most ``rank`` has nothing to gain and joins the plain
    AdamW group (so ``scale`` does not slow it down).

    Args:
        model: the model to train.
        rank: subspace dimension for the matrices.
        **options: more per-group options for the projected group (``update_proj_gap``, ``scale``,
            ``proj_type``, ``residual``, ...).

    Example:
        >>> groups = projected_parameter_groups(nn.Linear(8, 8), rank=2, proj_type="dct")
        >>> [len(group["params"]) for group in groups], groups[0]["rank"]
        ([1, 1], 2)
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    matrices = [parameter for parameter in parameters if parameter.ndim == 2 and min(parameter.shape) > rank]
    others = [parameter for parameter in parameters if not (parameter.ndim == 2 and min(parameter.shape) > rank)]
    groups = [{"params": matrices, "rank": rank, **options}]
    if others:
        groups.append({"params": others, "rank": None})
    return groups
