"""Benchmark of `lowrank.analysis.analyze` on the reference model, side by side with weightwatcher.

Run: python benchmarks/analysis.py   (needs `pip install weightwatcher==0.7.7`, the `bench` extra;
``--model smollm2`` for SmolLM2-135M, writing analysis-smollm2.md). Writes benchmarks/results/analysis.md: time to analyze the fixture (with and without the HTML
report), the time ratio to weightwatcher on the same matrices in the same run, and the per-layer
agreement of alpha, stable_rank and log_spectral_norm.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lowrank.analysis import analyze, write_report
from lowrank.models import load_pretrained

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "analysis.md"
REPEATS = 3
COMPARED = ["alpha", "stable_rank", "log_spectral_norm", "alpha_weighted"]


def median_time(function, repeats: int = REPEATS) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def weightwatcher_details(model):
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.WARNING)
    return weightwatcher.WeightWatcher(model=model).analyze()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    args = parser.parse_args()
    try:
        import weightwatcher
    except ImportError:
        sys.exit("weightwatcher is not installed: pip install weightwatcher==0.7.7 (the `bench` extra)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import resolve_model

    model_dir, model_name = resolve_model(args.model)
    result = RESULT if args.model == "reference" else RESULT.with_name(f"analysis-{model_name}.md")
    model = load_pretrained(model_dir)
    timings = []
    seconds, table = median_time(lambda: analyze(model, progress=False))
    timings.append([f"lowrank analyze ({len(table)} block linears, 1 torch thread)", len(table), f"{seconds:.2f}"])
    seconds_default, _ = median_time(lambda: analyze(model, progress=False, num_threads=None))
    timings.append([f"lowrank analyze ({len(table)} block linears, {torch.get_num_threads()} torch threads)", len(table), f"{seconds_default:.2f}"])
    with tempfile.TemporaryDirectory() as directory:
        seconds_report, _ = median_time(lambda: write_report(analyze(model, progress=False), directory))
    timings.append(["lowrank analyze + HTML report with 4 PNG figures", len(table), f"{seconds_report:.2f}"])
    seconds_all, ours = median_time(lambda: analyze(model, embeddings=True, progress=False))
    timings.append(["lowrank analyze --embeddings (adds the input embedding)", len(ours), f"{seconds_all:.2f}"])
    seconds_ww, theirs = median_time(lambda: weightwatcher_details(model))
    timings.append(["weightwatcher 0.7.7 `analyze()` (defaults; tied head counted twice)", len(theirs), f"{seconds_ww:.2f}"])

    merged = ours.merge(theirs, left_on="name", right_on="longname", suffixes=("", "_ww"))
    agreement_rows = []
    for _, row in merged.iterrows():
        agreement_rows.append(
            [row["name"], f"{row['out_features']}×{row['in_features']}"]
            + [f"{row[metric]:.4f} / {row[metric + '_ww']:.4f}" for metric in COMPARED]
        )
    differences = {metric: (merged[metric] - merged[metric + "_ww"]).abs() for metric in COMPARED}
    summary_rows = [[metric, len(merged), f"{differences[metric].max():.2e}", int((differences[metric] < 1e-6).sum())] for metric in COMPARED]

    load = os.getloadavg()[0]
    text = f"""# analysis benchmark

`{" ".join(["python benchmarks/analysis.py", *sys.argv[1:]])}` on `{model_name}` ({len(table)} block linear layers), CPU, torch {torch.__version__}, weightwatcher
{weightwatcher.__version__}, {os.cpu_count()} cores shared with other jobs (1-minute load average at the
end: {load:.1f}). Median of {REPEATS} runs each, all in one process; absolute times are noisy on this
machine, the ratios are measured in the same run.

## Time

{markdown(["what", "matrices", "seconds"], timings)}

Time ratio weightwatcher / lowrank on the same matrices (all linears + embedding): **{seconds_ww / seconds_all:.1f}×**
({len(theirs)} weightwatcher rows against {len(ours)}: with tied weights it decomposes the LM head a second time).
Target for `lowrank analyze` without `--calib`: under 10 s — measured {seconds:.2f} s
({seconds_report:.2f} s with the report).

## Agreement with weightwatcher, per layer

Same convention (eigenvalues σ² of WᵀW unnormalized, continuous power-law MLE with x_min chosen by
KS distance), so the values should agree to round-off:

{markdown(["metric", "layers compared", "max abs difference", "layers equal to 1e-6"], summary_rows)}

{markdown(["layer", "shape", *[f"{metric} (lowrank / ww)" for metric in COMPARED]], agreement_rows)}
"""
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
