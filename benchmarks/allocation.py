"""Rank allocation strategies on the reference model: perplexity versus ratio, one run, table + plot.

Run: ``python benchmarks/allocation.py`` (about 10 minutes on 2 cores). Writes
``benchmarks/results/allocation.md`` and ``benchmarks/results/allocation.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, EVAL, FIXTURE, RESULTS, machine_line, require_shared, write_markdown  # noqa: E402

import lowrank  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="uniform,energy,welore,global")
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--max-windows", type=int, default=200, help="windows of pycode-eval.txt to evaluate")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    strategies, ratios = args.strategies.split(","), [float(r) for r in args.ratios.split(",")]
    tokenizer = load_tokenizer(FIXTURE)
    eval_text = EVAL.read_text()
    dense = load_pretrained(FIXTURE)
    dense_ppl = lowrank.perplexity(dense, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
    stats = lowrank.calibrate(dense, tokenizer, CALIB.read_text(), gradients=True, progress=False)

    results: dict[str, list[tuple[float, float, float]]] = {strategy: [] for strategy in strategies}
    for ratio in ratios:
        for strategy in strategies:
            model = load_pretrained(FIXTURE)
            plan = lowrank.allocate(model, ratio, method=args.method, stats=stats, strategy=strategy)
            lowrank.compress_(model, plan, method=args.method, stats=stats, progress=False)
            ppl = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
            results[strategy].append((ratio, ppl, plan.predicted_error))
            print(f"{strategy} {ratio:.1f} {ppl:.3f} {plan.predicted_error:.4f}", flush=True)

    figure, axis = plt.subplots(figsize=(6, 4))
    for strategy, points in results.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=strategy)
    axis.axhline(dense_ppl, color="gray", linestyle="--", label="dense")
    axis.set_xlabel("ratio of targeted weights removed")
    axis.set_ylabel(f"perplexity (pycode-eval, {args.max_windows} windows)")
    axis.set_yscale("log")
    axis.set_title(f"pycode-llama, {args.method}, rank allocation")
    axis.legend()
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / "allocation.png", dpi=120)

    header = ["ratio"] + [f"{s} ppl" for s in strategies] + [f"{s} predicted Δloss" for s in strategies]
    lines = [
        "# Rank allocation on pycode-llama",
        "",
        f"Command: `python benchmarks/allocation.py --method {args.method}`. Machine: {machine_line()}.",
        f"Perplexity on the first {args.max_windows} windows of `pycode-eval.txt` (dense: **{dense_ppl:.2f}**);"
        " calibration 64 × 256 tokens of `pycode-calib.txt` with gradients. *predicted Δloss*: the `global` strategy's"
        " model of the per-token loss increase (whitened error × mean output Fisher, ½ Σ discarded), evaluated at each plan.",
        "",
        "![perplexity versus ratio](allocation.png)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for index, ratio in enumerate(ratios):
        row = [f"{ratio:.1f}"] + [f"{results[s][index][1]:.2f}" for s in strategies] + [f"{results[s][index][2]:.4f}" for s in strategies]
        lines.append("| " + " | ".join(row) + " |")
    write_markdown("allocation", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
