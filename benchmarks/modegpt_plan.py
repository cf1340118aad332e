"""Planning cost of ``modegpt``: type III's error curve over every head dimension from one
factorization against a pseudo-inverse refit per dimension, and type I's ridge leverage scores from
a Cholesky factorization against an eigendecomposition.

Run: ``python benchmarks/modegpt_plan.py --model smollm2`` (or the reference model by default).
Calibrates (forward only, ``--num-samples`` windows of ``pycode-calib.txt``), then for each of the
first ``--layers`` attention units times :func:`lowrank.linalg.value_output.nested_output_errors`
(what the plan runs) and the per-k :func:`lowrank.linalg.value_output.refit_output` loop (what it ran
before), interleaved in one process, ``--rounds`` times each, and reports per-unit median times, the
median ratio and the largest difference of the two curves relative to the error at k = 0; the same
for the ridge leverage scores of the first ``--layers`` MLPs (down_proj's input correlation), with
whether both give the same neuron order. Writes
``benchmarks/results/modegpt-plan[-<model>].md``.
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
from lowrank.linalg.nystrom import _mean_diagonal, ridge_leverage_scores  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--layers", type=int, default=4, help="attention units timed (the first N)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("modegpt-plan" if args.model == "reference" else f"modegpt-plan-{model_name}")
    model = load_pretrained(model_dir)
    stats = lowrank.calibrate(model, load_tokenizer(model_dir), CALIB.read_text(), num_samples=args.num_samples, seq_len=256, seed=0, progress=False)
    units = find_attention_units(model, lowrank.find_targets(model))[: args.layers]
    rows = []
    for unit in units:
        reduction = output_metric_reduction(model, unit, stats, fisher_damp=1e-6)
        times, curves = interleaved({"nested": lambda: nested_errors(reduction), "per-k": lambda: per_k_errors(reduction)}, args.rounds)
        difference = ((curves["nested"] - curves["per-k"]).abs().max() / curves["per-k"][0]).item()
        rows.append((unit.name, unit.heads, unit.kv_heads, unit.head_dim, times["nested"], times["per-k"], difference))
    ratio = statistics.median(per_k / nested for *_, nested, per_k, _ in rows)
    downs = [name for name in stats if name.endswith("mlp.down_proj")][: args.layers]
    leverage_rows = []
    for name in downs:
        correlation = stats[name].xtx
        times, scores = interleaved(
            {"cholesky": lambda: ridge_leverage_scores(correlation, 1e-2), "eigh": lambda: spectral_leverage_scores(correlation, 1e-2)}, args.rounds
        )
        orders = [torch.sort(-scores[key], stable=True).indices for key in ("cholesky", "eigh")]
        difference = (scores["cholesky"] - scores["eigh"]).abs().max().item()
        leverage_rows.append((name, correlation.shape[0], times["cholesky"], times["eigh"], difference, torch.equal(*orders)))
    leverage_ratio = statistics.median(eigh / cholesky for _, _, cholesky, eigh, _, _ in leverage_rows)
    lines = [
        f"# modegpt type III planning: nested error curve vs a refit per head dimension ({model_name})",
        "",
        f"Command: `python benchmarks/modegpt_plan.py {' '.join(sys.argv[1:])}`. {machine_line()}.",
        f"Statistics: {args.num_samples} × 256-token windows of `pycode-calib.txt` (forward only), o_proj's metric with Fisher weights off.",
        f"Both computations interleaved in one process, {args.rounds} rounds per unit; a cell is the median.",
        f"**Median speed-up: {ratio:.1f}×** over {len(rows)} units.",
        "",
        "| unit | heads | kv heads | head dim | nested s | per-k refit s | speed-up | max |Δ| / E(0) |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {name} | {heads} | {kv} | {dim} | {nested:.3f} | {per_k:.3f} | {per_k / nested:.1f}× | {difference:.1e} |" for name, heads, kv, dim, nested, per_k, difference in rows),
        "",
        f"Type I's ridge leverage scores (ridge 1e-2), Cholesky vs eigendecomposition, float64: **median speed-up {leverage_ratio:.1f}×**.",
        "",
        "| down_proj | neurons | Cholesky s | eigh s | speed-up | max |Δτ| | same order |",
        "|---|---|---|---|---|---|---|",
        *(f"| {name} | {n} | {chol:.3f} | {eigh:.3f} | {eigh / chol:.1f}× | {diff:.1e} | {'yes' if same else 'no'} |" for name, n, chol, eigh, diff, same in leverage_rows),
    ]
    write_markdown(output, "\n".join(lines))


if __name__ == "__main__":
    main()
