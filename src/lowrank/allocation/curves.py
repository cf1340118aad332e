"""Error curves: what each matrix's error is at every rank, in units comparable across matrices.

For the whitened factorization the output error of rank r is exactly Σ_{i>r} σ_i² of W·C^{1/2}
(C = E[x xᵀ], the per-token covariance). Output errors of different layers are not comparable as
they are — an error in a query projection and one in an MLP down-projection move the loss by very
different amounts — so each curve is put in units of the loss: with f = E[(∂L/∂y)²] the diagonal
empirical Fisher of the layer's outputs, the per-token loss increase is, to second order,
½ Σ_o f_o E[Δy_o²]. For a ``fisher_weighted`` method (``fisher-whiten``) that is the exact curve of its own spectrum; for the
other methods the error is spread over the outputs as the factorization spreads it, so the curve is
the whitened one scaled by the mean Fisher of the layer's outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..calibration.statistics import one_pass
from ..errors import LowrankError
from ..methods import get_method
from ..linalg.weighted import row_weights, weighted_energy
from ..nn import linear_weight


def whitened_energy(weight: torch.Tensor, stats: LayerStatistics) -> torch.Tensor:
    """σ² of W·C^{1/2} with C the per-token covariance, largest first."""
    # XᵀX is a sum; dividing by the token count gives per-token errors.
    return _energy(weight, stats) / max(stats.num_tokens, 1)


def _energy(weight: torch.Tensor, stats: LayerStatistics, output_weights: torch.Tensor | None = None) -> torch.Tensor:
    """σ² of D·W·(XᵀX)^{1/2}: from the output-side Gram where the methods factor there (no root,
    no damping search; :meth:`LayerStatistics.output_side`), else from the shared whitening."""
    if stats.output_side(weight.shape[0]):
        return weighted_energy(weight, output_weights=output_weights, covariance=stats.xtx)
    return weighted_energy(weight, output_weights=output_weights, white=stats.whitening())


def loss_curves(model: nn.Module, names, stats: dict[str, LayerStatistics], method: str) -> dict[str, torch.Tensor]:
    """Per matrix, the predicted per-token loss increase of dropping each singular direction.

    Returns ``{name: gains}`` with ``gains[i]`` the loss saved by keeping direction i (non-increasing),
    so the error at rank r is ``gains[r:].sum()``.
    """
    curves = {}
    with one_pass(stats, names):
        for name in names:
            curves[name] = _loss_curve(model, name, stats.get(name) if stats else None, method)
    return curves


def _loss_curve(model: nn.Module, name: str, layer_stats: LayerStatistics | None, method: str) -> torch.Tensor:
    if layer_stats is None or layer_stats.output_fisher is None:
        raise LowrankError("this allocation strategy needs gradient statistics; calibrate with gradients=True (the CLI does it)")
    weight = linear_weight(model.get_submodule(name)).detach()
    fisher = layer_stats.output_fisher
    if get_method(method).fisher_weighted:
        energy = _energy(weight, layer_stats, row_weights(fisher)) / max(layer_stats.num_tokens, 1)
    else:
        energy = whitened_energy(weight, layer_stats) * fisher.mean().item()
    return 0.5 * energy
