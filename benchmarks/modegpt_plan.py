"""Planning cost of ``modegpt``: type III's error curve over every head dimension from one
factorization against a pseudo-inverse refit per dimension, type I's ridge leverage scores from
a Cholesky factorization against an eigendecomposition, and type I's greedy order from factor columns
against updating the whole residual.

Run: ``python benchmarks/modegpt_plan.py --model smollm2`` (or the reference model by default).
Calibrates (forward only, ``--num-samples`` windows of ``pycode-calib.txt``), then runs the parts in
``--parts`` (default all), each timing two computations interleaved in one process, ``--rounds``
times each, and reporting per-layer median times and the median ratio:

- ``value``: for each of the first ``--layers`` attention units,
  :func:`lowrank.linalg.value_output.nested_output_errors` (what the plan runs) against the per-k
  :func:`lowrank.linalg.value_output.refit_output` loop (what it ran before), with the largest
  difference of the two curves relative to the error at k = 0;
- ``leverage``: the ridge leverage scores of the first ``--layers`` MLPs (down_proj's input
  correlation) by Cholesky against an eigendecomposition, with whether both give the same neuron order;
- ``greedy``: :func:`lowrank.linalg.nystrom.greedy_order` (``selection=greedy`` / ``fisher-greedy``)
  on those MLPs, W = their down_proj weight, against :func:`residual_greedy_order` (what it ran
  before), with whether both give the same order.

Writes ``benchmarks/results/modegpt-plan[-<model>].md`` (or ``--output``).
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.linalg.nystrom import SINGULAR_RIDGE, _mean_diagonal, greedy_order, ridge_leverage_scores  # noqa: E402
from lowrank.linalg.value_output import nested_output_errors, refit_output  # noqa: E402
from lowrank.methods.modegpt_attention import find_attention_units, output_metric_reduction  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402


def per_k_errors(reduction) -> torch.Tensor:
    """The curve as the plan computed it before: one pseudo-inverse refit per head dimension."""
    unit = reduction.unit
    bases = [reduction.bases[j // unit.group] for j in range(unit.heads)]
    return torch.tensor(
        [refit_output(reduction.output, reduction.correlation, [basis[:k] for basis in bases], reduction.weights)[1] for k in range(unit.head_dim + 1)],
        dtype=torch.float64,
    )


def nested_errors(reduction) -> torch.Tensor:
    unit = reduction.unit
    return nested_output_errors(reduction.output, reduction.correlation, [reduction.bases[j // unit.group] for j in range(unit.heads)], reduction.weights)


def residual_greedy_order(weight: torch.Tensor, correlation: torch.Tensor) -> torch.Tensor:
    """The greedy pivoted Cholesky order as computed before: the whole n × n residual R and W·R
    updated by a rank-one term at every step."""
    w, residual = weight.double(), correlation.double().clone()
    n = residual.shape[0]
    weighted = w @ residual
    floor = SINGULAR_RIDGE * _mean_diagonal(residual)
    chosen: list[int] = []
    available = torch.ones(n, dtype=torch.bool)
    for _ in range(n):
        pivots = residual.diagonal()
        gain = weighted.pow(2).sum(dim=0) / pivots.clamp(min=floor)
        gain = torch.where(available & (pivots > floor), gain, torch.full_like(gain, -1.0))
        pivot = int(torch.argmax(gain).item())
        if gain[pivot] < 0:
            break
        column, weighted_column = residual[:, pivot].clone(), weighted[:, pivot].clone()
        residual -= torch.outer(column, column) / column[pivot]
        weighted -= torch.outer(weighted_column, column) / column[pivot]
        available[pivot] = False
        chosen.append(pivot)
    return torch.tensor(chosen + [index for index in range(n) if available[index]], dtype=torch.long)


def spectral_leverage_scores(correlation: torch.Tensor, ridge: float) -> torch.Tensor:
    """τ_i = Σ_j v_ij²·λ_j / (λ_j + λ): the scores from C's eigendecomposition, as computed before."""
    c = correlation.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(c)
    eigenvalues = eigenvalues.clamp(min=0)
    return (eigenvectors.pow(2) * (eigenvalues / (eigenvalues + ridge * _mean_diagonal(c)))).sum(dim=1)


def interleaved(functions: dict, rounds: int) -> tuple[dict[str, float], dict]:
    """Median seconds and the last result of each function, called in turn ``rounds`` times."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    results = {}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            results[name] = function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def part_lines(summary: str, header: list[str], rows: list[list[str]], times: list[tuple[float, float]]) -> list[str]:
    """A part's summary line with the median speed-up over ``times`` ((new s, old s) per row), then its table."""
    ratio = statistics.median(old / new for new, old in times)
    return [f"{summary}: **median speed-up {ratio:.1f}×**.", "", f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in rows)]


def value_output_lines(model, stats, args) -> list[str]:
    """Type III: the nested error curve against a refit per head dimension."""
    rows, times = [], []
    for unit in find_attention_units(model, lowrank.find_targets(model))[: args.layers]:
        reduction = output_metric_reduction(model, unit, stats, fisher_damp=1e-6)
        medians, curves = interleaved({"nested": lambda: nested_errors(reduction), "per-k": lambda: per_k_errors(reduction)}, args.rounds)
        new, old = medians["nested"], medians["per-k"]
        difference = ((curves["nested"] - curves["per-k"]).abs().max() / curves["per-k"][0]).item()
        times.append((new, old))
        rows.append([unit.name, str(unit.heads), str(unit.kv_heads), str(unit.head_dim), f"{new:.3f}", f"{old:.3f}", f"{old / new:.1f}×", f"{difference:.1e}"])
    return part_lines(
        f"Type III's error curve (o_proj's metric with Fisher weights off), nested vs a refit per head dimension, over {len(rows)} units",
        ["unit", "heads", "kv heads", "head dim", "nested s", "per-k refit s", "speed-up", "max |Δ| / E(0)"], rows, times,
    )  # fmt: skip


def mlp_lines(model, stats, args, summary: str, labels: tuple[str, str], functions, checks: dict) -> list[str]:
    """Two computations on each of the first ``--layers`` MLPs (down_proj's weight W and input correlation C):
    ``functions(W, C)`` = {label: callable} for the two ``labels`` (new, old); ``checks`` = {column: f(new result, old result)}."""
    rows, times = [], []
    for name in [name for name in stats if name.endswith("mlp.down_proj")][: args.layers]:
        weight, correlation = model.get_submodule(name).weight.detach(), stats[name].xtx
        medians, results = interleaved(functions(weight, correlation), args.rounds)
        new, old = (medians[label] for label in labels)
        times.append((new, old))
        cells = [check(*(results[label] for label in labels)) for check in checks.values()]
        rows.append([name, str(correlation.shape[0]), str(weight.shape[0]), f"{new:.3f}", f"{old:.3f}", f"{old / new:.1f}×", *cells])
    return part_lines(summary, ["down_proj", "neurons", "outputs", *(f"{label} s" for label in labels), "speed-up", *checks], rows, times)


def leverage_lines(model, stats, args) -> list[str]:
    """Type I's ridge leverage scores: Cholesky against an eigendecomposition."""
    return mlp_lines(
        model, stats, args, "Type I's ridge leverage scores (ridge 1e-2), Cholesky vs eigendecomposition, float64", ("Cholesky", "eigh"),
        lambda weight, correlation: {"Cholesky": lambda: ridge_leverage_scores(correlation, 1e-2), "eigh": lambda: spectral_leverage_scores(correlation, 1e-2)},
        {
            "max |Δτ|": lambda new, old: f"{(new - old).abs().max().item():.1e}",
            "same order": lambda new, old: "yes" if torch.equal(torch.sort(-new, stable=True).indices, torch.sort(-old, stable=True).indices) else "no",
        },
    )  # fmt: skip


def greedy_lines(model, stats, args) -> list[str]:
    """Type I's greedy order: factor columns against the whole residual updated."""
    return mlp_lines(
        model, stats, args, "Type I's greedy order (W = down_proj's weight), factor columns vs the whole residual updated, float64", ("columns", "residual"),
        lambda weight, correlation: {"columns": lambda: greedy_order(weight, correlation), "residual": lambda: residual_greedy_order(weight, correlation)},
        {"same order": lambda new, old: "yes" if torch.equal(new, old) else "no"},
    )  # fmt: skip


PARTS = {"value": value_output_lines, "leverage": leverage_lines, "greedy": greedy_lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default all)")
    parser.add_argument("--layers", type=int, default=4, help="attention units and MLPs timed (the first N)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = next((part for part in parts if part not in PARTS), None)
    if unknown is not None:
        parser.error(f"unknown part {unknown!r}; choose from {', '.join(PARTS)}")
    require_shared()
    torch.set_num_threads(args.threads)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("modegpt-plan" if args.model == "reference" else f"modegpt-plan-{model_name}")
    model = load_pretrained(model_dir)
    stats = lowrank.calibrate(model, load_tokenizer(model_dir), CALIB.read_text(), num_samples=args.num_samples, seq_len=256, seed=0, progress=False)
    lines = [
        f"# modegpt planning cost ({model_name})",
        "",
        f"Command: `python benchmarks/modegpt_plan.py {' '.join(sys.argv[1:])}`. {machine_line()}.",
        f"Statistics: {args.num_samples} × 256-token windows of `pycode-calib.txt` (forward only).",
        f"Both computations of each part interleaved in one process, {args.rounds} rounds per layer; a cell is the median.",
    ]
    for part in parts:
        lines += ["", *PARTS[part](model, stats, args)]
    write_markdown(output, "\n".join(lines))


if __name__ == "__main__":
    main()
