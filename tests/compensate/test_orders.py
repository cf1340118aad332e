"""``lowrank compensate``'s orders (plain EoRA, ``--lowrank-first``, ``--iterations``), which share their steps with
``lowrank-quant``'s orders (:mod:`lowrank.compensate.orders`), against the chains written out here by hand: the
whitened rank-r optimum from an eigendecomposition, every pair visited, the least calibration output error kept."""

from __future__ import annotations

import pytest
import torch

from lowrank.calibration import InputStatistics, LayerStatistics
from lowrank.compensate import CompensateConfig, factorize
from lowrank.linalg.quantize import quantize_groups
from lowrank.linalg.whiten import output_error

OUT, IN, RANK, BITS, GROUP = 16, 48, 3, 3, 16


def best_whitened(matrix: torch.Tensor, xtx: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin over rank-r L of ‖(matrix − L)X‖_F: the SVD of matrix·C^½ truncated, times C^-½ (C^½ from eigh)."""
    values, vectors = torch.linalg.eigh(xtx)
    root = (vectors * values.sqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(matrix @ root, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(root)


def reference(weight: torch.Tensor, xtx: torch.Tensor, iterations: int, lowrank_first: bool) -> torch.Tensor:
    """B + L of the pair with the least output error among the chains each option adds, the first on a tie."""

    def quantize(matrix: torch.Tensor) -> torch.Tensor:  # round-to-nearest (checked by hand in tests/methods/test_lowrank_quant_orders.py)
        return quantize_groups(matrix, BITS, GROUP).dequantize(torch.float64)

    starts = [quantize(weight)]  # plain EoRA: the base of W itself
    if lowrank_first:
        starts.append(quantize(weight - best_whitened(weight, xtx, RANK)))  # SVDQuant: the base of what the rank-r fit of W leaves
    pairs = []
    for base in starts:
        low = best_whitened(weight - base, xtx, RANK)
        pairs.append(base + low)
        for _ in range(iterations):
            base = quantize(weight - low)
            low = best_whitened(weight - base, xtx, RANK)
            pairs.append(base + low)
    return min(pairs, key=lambda pair: output_error(weight, pair, xtx))


@pytest.mark.parametrize("iterations, lowrank_first", [(0, False), (2, False), (0, True), (2, True)])
def test_each_option_keeps_the_best_pair_of_its_chains(iterations, lowrank_first):
    generator = torch.Generator().manual_seed(3)
    # A rank-2 part 10× the rest stretches every quantization group: the low-rank-first start matters here.
    weight = 10 * torch.randn(OUT, 2, generator=generator, dtype=torch.float64) @ torch.randn(2, IN, generator=generator, dtype=torch.float64) / 7
    weight = weight + torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
    x = torch.randn(300, IN, generator=generator, dtype=torch.float64) * torch.logspace(-1, 1, IN, dtype=torch.float64)
    stats = LayerStatistics(InputStatistics(xtx=x.T @ x, abs_sum=x.abs().sum(dim=0), num_tokens=x.shape[0]))
    config = CompensateConfig(base=f"rtn:{BITS}", group_size=GROUP, iterations=iterations, lowrank_first=lowrank_first)
    factors = factorize(weight, stats, RANK, config)
    expected = reference(weight, stats.xtx, iterations, lowrank_first)
    torch.testing.assert_close(factors.dense(), expected, atol=1e-9, rtol=1e-9)
    if lowrank_first:  # and the low-rank-first chain is the one that wins on this weight
        assert output_error(weight, expected, stats.xtx) < output_error(weight, reference(weight, stats.xtx, iterations, False), stats.xtx)
