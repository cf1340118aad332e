"""Measured loss sensitivity: how much the loss actually rises when one matrix is truncated.

The ``global`` strategy puts each matrix's whitened error curve in loss units with a second-order
model (½ × mean output Fisher). This module measures the scale instead, as the activation-aware
papers do: for every targeted matrix and a few candidate ranks, replace only that matrix by its
whitened truncation, run a few calibration batches forward and record the mean token loss increase
over the dense model. One scalar per matrix,

    s = argmin_s Σ_k (Δloss_k − s·e_k)² = Σ_k Δloss_k·e_k / Σ_k e_k²,

with e_k the per-token whitened error Σ_{i>r_k} σ_i²(W·C^{½}) / tokens at candidate rank r_k, turns
the whole spectrum into a loss curve s·σ_i²/tokens that the knapsack of
:func:`lowrank.allocation.knapsack.greedy_ranks` allocates at full rank resolution.

Cost: one whitened SVD per matrix, and (number of matrices × candidate ranks + 1) × batches
forward passes of the whole model, under ``torch.no_grad()``. With the defaults (4 candidates, 8
batches of 8 × 256 tokens, i.e. the default calibration set) that is 32 forward passes per matrix:
11 minutes for the 42 matrices of the 7 M-parameter reference model (one thread, busy 2-core CPU). The
measurements do not depend on the budget, so pass ``SensitivityConfig(sensitivities=...)`` from an
earlier plan to reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import LayerStatistics, collect_statistics
from ..errors import LowrankError
from ..linalg import rank_for_ratio
from ..nn import linear_weight


@dataclass
class SensitivityConfig:
    """How the ``sensitivity`` strategy measures.

    Attributes:
        ratios: per-matrix compression ratios whose ranks are measured (each one costs a forward
            pass of every batch per matrix).
        num_batches: calibration batches run per measurement (the first ones given). Fewer are
            cheaper but noisy: on the reference model, slopes fitted on 2 batches of 8 × 256
            tokens made plans that lost to ``uniform`` at ratio 0.6 on held-out text, while 8
            batches matched ``global``.
        relative_floor: fitted sensitivities are clamped to at least this fraction of the median
            positive one. On a few thousand tokens the measured increases scatter by a few 1e-4
            nats (mild truncations often *lower* the loss on the batches), so a slope near or below
            zero means "too small to measure", not "free": clamped, such a matrix is still cut
            before the others but is not sent to rank 1, far below any rank that was measured.
        sensitivities: ``{name: s}`` already measured on the same model and data (e.g. from
            ``plan.details["sensitivity"]`` of an earlier plan); those matrices are not measured again.

    Example:
        >>> SensitivityConfig(ratios=(0.5,), num_batches=1).num_batches
        1
    """

    ratios: Sequence[float] = (0.2, 0.4, 0.6, 0.8)
    num_batches: int = 8
    relative_floor: float = 0.1
    sensitivities: dict[str, float] | None = None


@dataclass
class Sensitivity:
    """What was measured for one matrix: candidate ranks, predicted errors e_k, loss increases."""

    ranks: list[int]
    whitened_errors: list[float]
    loss_increases: list[float]
    sensitivity: float

    def to_dict(self) -> dict:
        return {
            "sensitivity": self.sensitivity,
            "points": [[r, e, d] for r, e, d in zip(self.ranks, self.whitened_errors, self.loss_increases, strict=True)],
        }


def fit_sensitivity(whitened_errors: Sequence[float], loss_increases: Sequence[float]) -> float:
    """Least-squares slope through the origin of loss increase against whitened error (may be ≤ 0).

    Example:
        >>> fit_sensitivity([1.0, 2.0], [0.5, 1.0])
        0.5
    """
    errors, increases = torch.tensor(whitened_errors, dtype=torch.float64), torch.tensor(loss_increases, dtype=torch.float64)
    denominator = (errors * errors).sum().item()
    return (errors * increases).sum().item() / denominator if denominator > 0 else 0.0


def mean_token_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean of the model's next-token loss over ``batches`` (no gradients)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            output = model(**batch)
            if getattr(output, "loss", None) is None:
                raise LowrankError("sensitivity allocation needs batches with labels; build them with lowrank.calibration.calibration_batches")
            # HF losses are means over the predicted (shifted, non-ignored) tokens of the batch.
            predicted = int((batch["labels"][:, 1:] != -100).sum().item())
            total += output.loss.double().item() * predicted
            tokens += predicted
    return total / max(tokens, 1)


def _candidate_ranks(shape: tuple[int, int], ratios: Sequence[float]) -> list[int]:
    ranks = {rank_for_ratio(*shape, ratio) for ratio in ratios}
    return sorted((rank for rank in ranks if rank is not None), reverse=True)


def measure_sensitivity(
    model: nn.Module, name: str, stats: LayerStatistics, batches: Sequence[dict[str, torch.Tensor]], dense_loss: float, ratios: Sequence[float]
) -> tuple[Sensitivity, torch.Tensor]:
    """Truncate matrix ``name`` to each candidate rank in turn, measure the loss, put the weight back.

    Returns:
        The measurements, and the per-token whitened spectrum σ_i²(W·C^{½}) / tokens (float64).
    """
    module = model.get_submodule(name)
    weight = linear_weight(module)  # a view: writing to it writes the parameter (transposed for Conv1D)
    white = stats.whitening()
    u, singular, vh = torch.linalg.svd(weight.detach().double() @ white.root.to(weight.device), full_matrices=False)
    energy = singular.pow(2) / max(stats.num_tokens, 1)
    tail = energy.flip(0).cumsum(0).flip(0)
    ranks = _candidate_ranks(tuple(weight.shape), ratios)
    errors, increases = [], []
    saved = module.weight.detach().clone()
    try:
        for rank in ranks:
            truncated = (u[:, :rank] * singular[:rank]) @ vh[:rank] @ white.inverse_root.to(weight.device)
            with torch.no_grad():
                weight.copy_(truncated.to(weight.dtype))
            errors.append(tail[rank].item() if rank < len(tail) else 0.0)
            increases.append(mean_token_loss(model, batches) - dense_loss)
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)
    return Sensitivity(ranks, errors, increases, fit_sensitivity(errors, increases)), energy.cpu()


def sensitivity_curves(
    model: nn.Module,
    shapes: dict[str, tuple[int, int]],
    stats: dict[str, LayerStatistics] | None,
    batches: Sequence[dict[str, torch.Tensor]] | None,
    config: SensitivityConfig | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Per matrix, the measured-sensitivity loss curve s·σ_i²(W·C^{½})/tokens, and what was measured.

    Args:
        model: the dense model; every weight is restored bit for bit afterwards, even on error.
        shapes: (out, in) of the targeted matrices.
        stats: calibration statistics (input covariances); when ``None`` they are collected from
            ``batches``.
        batches: calibration batches with ``input_ids`` and ``labels``
            (:func:`lowrank.calibration.calibration_batches`); the first ``config.num_batches`` are run.
        config: candidate ratios, batches and floor; default :class:`SensitivityConfig`.

    Returns:
        ``({name: gains}, details)`` with ``gains[i]`` the predicted per-token loss saved by keeping
        direction i, and ``details`` holding the dense loss, and per matrix s and the measured points
        ``[rank, whitened error, loss increase]``.
    """
    config = config or SensitivityConfig()
    known = dict(config.sensitivities or {})
    to_measure = [name for name in shapes if name not in known]
    if to_measure and not batches:
        raise LowrankError(
            "allocation strategy 'sensitivity' measures the loss on calibration batches; "
            "pass allocate(..., batches=calibration_batches(tokenizer, text)) (CLI: --calib FILE)"
        )
    if config.num_batches < 1 or not config.ratios or not all(0.0 < ratio < 1.0 for ratio in config.ratios):
        raise LowrankError(
            f"SensitivityConfig needs num_batches ≥ 1 and candidate ratios in (0, 1), got {config.num_batches} and {tuple(config.ratios)}"
        )
    used = list(batches or [])[: config.num_batches]
    if stats is None:
        stats = collect_statistics(model, used, list(shapes), progress=False)
    missing = [name for name in shapes if name not in stats]
    if missing:
        raise LowrankError(f"no calibration statistics for {missing[0]}; calibrate with the same include/exclude as allocate")

    was_training = model.training
    model.eval()
    measured: dict[str, Sensitivity] = {}
    energies: dict[str, torch.Tensor] = {}
    details: dict = {"ratios": list(config.ratios), "num_batches": len(used)}
    try:
        if to_measure:
            details["dense_loss"] = dense_loss = mean_token_loss(model, used)
        for name in shapes:
            if name in known:
                weight = linear_weight(model.get_submodule(name)).detach()
                white = stats[name].whitening()
                energies[name] = torch.linalg.svdvals(weight.double() @ white.root.to(weight.device)).pow(2).cpu() / max(stats[name].num_tokens, 1)
            else:
                measured[name], energies[name] = measure_sensitivity(model, name, stats[name], used, dense_loss, config.ratios)
    finally:
        model.train(was_training)

    fitted = {**known, **{name: item.sensitivity for name, item in measured.items()}}
    positive = [value for value in fitted.values() if value > 0]
    floor = config.relative_floor * (float(torch.tensor(positive).median()) if positive else 1.0)
    scale = {name: max(value, floor) for name, value in fitted.items()}
    details["floor"] = floor
    details["matrices"] = {
        name: {**(measured[name].to_dict() if name in measured else {"points": []}), "sensitivity": fitted[name], "scale": scale[name]}
        for name in shapes
    }
    curves = {name: scale[name] * energies[name] for name in shapes}
    return curves, details


def measured_sensitivities(details: dict) -> dict[str, float]:
    """``{name: s}`` from a sensitivity plan's ``details["sensitivity"]``, to reuse in :class:`SensitivityConfig`."""
    return {name: item["sensitivity"] for name, item in details["matrices"].items()}
