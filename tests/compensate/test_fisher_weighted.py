"""The Fisher-weighted correction (``fisher_weighted``) against a brute-force search and the closed form by hand,
its guarantee on every output's plain error, and the option end to end (budget, save → load, PEFT export)."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from tiny_models import tiny_model

import lowrank
from lowrank.calibration import InputStatistics, LayerStatistics
from lowrank.compensate import CompensateConfig, base_of, compensate_, factorize
from lowrank.compensate.eora import correction, output_weights
from lowrank.compensate.export import export_peft_compensation
from lowrank.errors import LowrankError
from lowrank.linalg.whiten import output_error
from lowrank.nn import linear_weight


def statistics_with_fisher(x: torch.Tensor, fisher: torch.Tensor) -> LayerStatistics:
    """Exactly XᵀX, and an output Fisher ``fisher`` (one gradient token whose squares are it)."""
    stats = LayerStatistics(InputStatistics(xtx=x.T @ x, abs_sum=x.abs().sum(dim=0), num_tokens=x.shape[0]))
    stats.output_grad_sq, stats.num_grad_tokens = fisher.double(), 1
    return stats


def row_errors(error: torch.Tensor, low: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    delta = error - low
    return torch.einsum("oi,ij,oj->o", delta, xtx, delta)


def weighted_search(error: torch.Tensor, xtx: torch.Tensor, weights: torch.Tensor, rank: int, seed: int, steps: int = 400) -> float:
    """Local search for min over rank-r L = A·B of Σ_o w_o² ‖(ΔW − L)_o X‖², by alternating exact least squares.

    For fixed B each row of A solves its own problem, A = ΔW C Bᵀ (B C Bᵀ)⁻¹ (the weights cancel row by row);
    for fixed A, B = (Aᵀ W² A)⁻¹ Aᵀ W² ΔW. No whitening, no SVD."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, error.shape[1], generator=generator, dtype=torch.float64)
    w2 = torch.diag(weights.square())
    for _ in range(steps):
        up = torch.linalg.solve(down @ xtx @ down.T, (error @ xtx @ down.T).T).T
        down = torch.linalg.solve(up.T @ w2 @ up, up.T @ w2 @ error)
    return (weights.square() * row_errors(error, up @ down, xtx)).sum().item()


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_the_weighted_correction_is_the_weighted_optimum(rank):
    generator = torch.Generator().manual_seed(rank)
    error = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    x = torch.randn(80, 5, dtype=torch.float64, generator=generator) @ (
        torch.randn(5, 5, dtype=torch.float64, generator=generator) + 2 * torch.eye(5)
    )
    fisher = torch.rand(6, dtype=torch.float64, generator=generator) * torch.tensor([100.0, 1, 1, 10, 1, 0.1], dtype=torch.float64)
    stats = statistics_with_fisher(x, fisher)
    weights = output_weights(stats)
    ours = (weights.square() * row_errors(error, correction(error, stats, rank, weights=weights).dense(), x.T @ x)).sum().item()
    # By hand: the discarded squared singular values of diag(w)·ΔW·C^{1/2}, C^{1/2} from eigh.
    values, vectors = torch.linalg.eigh(x.T @ x)
    closed_form = torch.linalg.svdvals(weights[:, None] * error @ (vectors * values.sqrt()) @ vectors.T)[rank:].square().sum().item()
    assert ours == pytest.approx(closed_form, rel=1e-9, abs=1e-9)
    searched = [weighted_search(error, x.T @ x, weights, rank, seed) for seed in range(10)]
    assert min(searched) >= ours * (1 - 1e-9)
    assert min(searched) == pytest.approx(ours, rel=1e-5)
    # It differs from the plain correction, which is worse on the weighted error (the weights matter here).
    plain = (weights.square() * row_errors(error, correction(error, stats, rank).dense(), x.T @ x)).sum().item()
    assert plain > ours * (1 + 1e-3)


def test_no_outputs_plain_error_grows_whatever_the_weights():
    generator = torch.Generator().manual_seed(0)
    error = torch.randn(12, 8, dtype=torch.float64, generator=generator)
    x = torch.randn(100, 8, dtype=torch.float64, generator=generator) * torch.logspace(-1, 1, 8, dtype=torch.float64)
    for trial in range(5):
        fisher = torch.rand(12, dtype=torch.float64, generator=generator) ** 8  # weights over many orders of magnitude
        stats = statistics_with_fisher(x, fisher)
        for rank in (1, 3, 6):
            low = correction(error, stats, rank, weights=output_weights(stats)).dense()
            assert torch.all(row_errors(error, low, x.T @ x) <= row_errors(error, torch.zeros_like(error), x.T @ x) * (1 + 1e-12)), (trial, rank)


CASES = [
    (base, options)
    for base in ("rtn:3", "gptq:3", "wanda:0.5")
    for options in ({}, {"factor_bits": 4}, {"iterations": 2}, {"factor_bits": 2, "lowrank_first": True})
    if not ("factor_bits" in options and base.startswith("wanda"))  # quantized factors need a quantized base
]


@pytest.mark.parametrize(("base", "options"), CASES)
def test_fisher_weighted_compensation_never_raises_the_plain_error_and_lowers_the_weighted_one(base, options, tiny_stats):
    model = tiny_model("llama")
    plain, weighted = (
        CompensateConfig(base=base, group_size=16, **options),
        CompensateConfig(base=base, group_size=16, fisher_weighted=True, **options),
    )
    plain_total = weighted_total = 0.0
    for name, statistics in tiny_stats.items():
        weight = linear_weight(model.get_submodule(name)).detach().double()
        squares = statistics.output_fisher.double()
        base_error = output_error(weight, base_of(weight, statistics, weighted).approximation, statistics.xtx)
        for rank in (4,):
            ours = factorize(weight, statistics, rank, weighted).dense()
            assert output_error(weight, ours, statistics.xtx) <= base_error, (name, rank)
            plain_total += (squares * row_errors(weight, factorize(weight, statistics, rank, plain).dense(), statistics.xtx.double())).sum().item()
            weighted_total += (squares * row_errors(weight, ours, statistics.xtx.double())).sum().item()
    assert weighted_total < plain_total


def test_fisher_weighting_without_gradients_fails_in_one_line():
    stats = LayerStatistics(InputStatistics(xtx=torch.eye(8, dtype=torch.float64), abs_sum=torch.ones(8), num_tokens=8))
    with pytest.raises(LowrankError, match="calibrate with gradients=True"):
        factorize(torch.randn(4, 8), stats, 2, CompensateConfig(base="rtn:3", group_size=8, fisher_weighted=True))


def test_a_fisher_weighted_budget_saves_loads_and_exports(tiny_stats, sample_ids, tmp_path):
    model = tiny_model("llama")
    config = CompensateConfig(base="rtn:3", group_size=16, factor_bits=4, fisher_weighted=True, iterations=1)
    report = compensate_(model, tiny_stats, config, budget=0.1, progress=False)
    assert report.parameters["correction_bits"] <= 0.1 * report.parameters["base_bits"]
    assert report.plan.details["compensation"]["extra_storage"] > 0.05  # the weighted curves spend it
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(sample_ids).logits, loaded(sample_ids).logits)
    export_peft_compensation(loaded, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base"), str(tmp_path / "peft" / "adapter")
    )
    with torch.no_grad():
        expected, got = loaded(sample_ids).logits, served(sample_ids).logits
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


@pytest.mark.parametrize("factor_bits", [None, 4])
def test_weighted_alternation_never_ends_above_its_one_shot_start(factor_bits, tiny_stats):
    """The alternation keeps the best pair on the weighted objective, the first being one-shot weighted EoRA: never worse per layer."""
    model = tiny_model("llama")
    once = CompensateConfig(base="rtn:3", group_size=16, fisher_weighted=True, factor_bits=factor_bits)
    alternated = CompensateConfig(base="rtn:3", group_size=16, fisher_weighted=True, factor_bits=factor_bits, iterations=2)
    improved = 0
    for name, statistics in tiny_stats.items():
        weight = linear_weight(model.get_submodule(name)).detach().double()
        squares, xtx = statistics.output_fisher.double(), statistics.xtx.double()
        first = (squares * row_errors(weight, factorize(weight, statistics, 4, once).dense(), xtx)).sum().item()
        best = (squares * row_errors(weight, factorize(weight, statistics, 4, alternated).dense(), xtx)).sum().item()
        assert best <= first * (1 + 1e-12), name
        improved += best < 0.999 * first
    assert improved > 0  # and the alternation does find better pairs
