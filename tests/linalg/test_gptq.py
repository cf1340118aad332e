"""GPTQ against an independent reference: the conditional least-squares optimum, column by column."""

from __future__ import annotations

import pytest
import torch

from lowrank.linalg.gptq import damped_hessian, gptq_quantize
from lowrank.linalg.quantize import quantize_groups
from lowrank.linalg.whiten import output_error


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    return torch.randn(tokens, features, generator=generator, dtype=torch.float64) @ mixing


def reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes chosen column by column, each time re-solving the rest of every row from scratch.

    With the first columns F fixed at their quantized values q_F, the rest R that minimizes
    (w′ − w) H (w′ − w)ᵀ is w′_R = w_R − (q_F − w_F) H_FR H_RR⁻¹: no Cholesky factor, no lazy
    blocks, no running updates, only a linear solve per step.
    """
    out_features, in_features = weight.shape
    levels = 2**bits - 1
    fixed = torch.zeros(out_features, 0, dtype=torch.float64)
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    current = weight.clone()
    for column in range(in_features):
        if column % group_size == 0:
            group = quantize_groups(current[:, column : column + group_size], bits, group_size)
            step, zero = group.scales[:, 0].double(), group.zeros[:, 0].double()
        code = ((current[:, column] / step).round() + zero).clamp(0, levels)
        codes[:, column] = code.to(torch.uint8)
        fixed = torch.cat([fixed, ((code - zero) * step)[:, None]], dim=1)
        f, r = slice(0, column + 1), slice(column + 1, in_features)
        if column + 1 < in_features:
            shift = (fixed - weight[:, f]) @ hessian[f, r]
            current = torch.cat([fixed, weight[:, r] - torch.linalg.solve(hessian[r, r], shift.T).T], dim=1)
    return codes


@pytest.mark.parametrize("bits, group_size, in_features", [(3, 8, 24), (4, 16, 40), (2, 64, 20)])
def test_gptq_matches_the_sequential_least_squares_reference(bits, group_size, in_features):
    torch.manual_seed(0)
    weight = torch.randn(6, in_features, dtype=torch.float64)
    x = correlated_inputs(300, in_features, seed=1)
    xtx = x.T @ x
    # Groups straddle update blocks of 128 columns only if group_size does not divide it; 40 columns
    # with groups of 16 leave a short last group.
    quantized = gptq_quantize(weight, xtx, bits, group_size, damp=0.01)
    hessian, _ = damped_hessian(xtx, 0.01)
    assert torch.equal(quantized.codes, reference_gptq(weight, hessian, bits, group_size))


def test_gptq_spans_several_update_blocks():
    """300 columns in groups of 32: blocks of 128 columns, the lazy update between them checked too."""
    torch.manual_seed(0)
    weight = torch.randn(3, 300, dtype=torch.float64)
    x = correlated_inputs(600, 300, seed=2)
    quantized = gptq_quantize(weight, x.T @ x, 4, 32, damp=0.01)
    hessian, _ = damped_hessian(x.T @ x, 0.01)
    reference = reference_gptq(weight, hessian, 4, 32)
    # Float round-off may flip a code that sits on a rounding boundary; far fewer than 1 in 100.
    assert (quantized.codes != reference).float().mean() < 0.01


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal XᵀX couples no columns: the error feedback is zero and GPTQ must equal RTN exactly."""
    torch.manual_seed(0)
    weight = torch.randn(16, 96)
    xtx = torch.diag(torch.rand(96) + 0.5)
    gptq, rtn = gptq_quantize(weight, xtx, 4, 32), quantize_groups(weight, 4, 32)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_has_a_smaller_calibration_error_than_round_to_nearest(bits):
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    x = correlated_inputs(1000, 128, seed=3)
    xtx = x.T @ x
    gptq = output_error(weight, gptq_quantize(weight, xtx, bits, 64).dequantize(), xtx)
    rtn = output_error(weight, quantize_groups(weight, bits, 64).dequantize(), xtx)
    assert gptq < 0.8 * rtn


def test_gptq_survives_a_singular_covariance_and_unseen_inputs():
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    x = torch.randn(5, 32)  # rank 5 of 32
    x[:, 3] = 0  # an input no token reaches
    quantized = gptq_quantize(weight, x.T @ x, 4, 16, damp=0.0)
    assert torch.isfinite(quantized.dequantize()).all()
    assert (quantized.dequantize()[:, 3] == 0).all()  # an unseen input's weights are free; GPTQ zeroes them
