"""Compression quality on the reference model: every method × ratio, one run, one table.

Run: ``python benchmarks/quality.py`` (about 15 minutes on 2 cores). Writes
``benchmarks/results/quality.md`` with perplexity on ``pycode-eval.txt`` (held out), compression
time (calibration included), peak extra memory, generation speed, and how often the whitened
factors still beat plain SVD in layer output error on held-out text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, FIXTURE, PeakMemory, machine_line, require_shared, write_markdown  # noqa: E402

import lowrank  # noqa: E402
from lowrank.allocation import strategy_needs_gradients  # noqa: E402
from lowrank.calibration import calibration_batches  # noqa: E402
from lowrank.configs import parse_overrides  # noqa: E402
from lowrank.linalg import output_error  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402

REFERENCE = {  # the SVD-LLM authors' own code on this fixture, 64 windows × 256 tokens (issue 3)
    ("whiten", 0.2): 13.21, ("whiten", 0.3): 13.39, ("whiten", 0.4): 13.75, ("whiten", 0.6): 16.22,
    ("svd", 0.2): 13.43, ("svd", 0.4): 14.28, ("svd", 0.6): 18.33,
}  # fmt: skip


def held_out_wins(dense, plan, eval_stats, calib_stats) -> tuple[int, int]:
    """Layers where whiten's output error on held-out inputs is ≤ plain SVD's, and the layer count."""
    whiten, svd = lowrank.get_method("whiten"), lowrank.get_method("svd")
    wins = 0
    for name, rank in plan.items():
        weight = dense.get_submodule(name).weight.detach()
        white = whiten.factorize(weight, calib_stats[name], rank, whiten.config_class()).dense()
        plain = svd.factorize(weight, None, rank, svd.config_class()).dense()
        wins += output_error(weight, white, eval_stats[name].xtx) <= output_error(weight, plain, eval_stats[name].xtx)
    return wins, len(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default="svd:uniform,whiten:uniform,whiten:global,fisher-whiten:global",
        help="comma-separated METHOD:ALLOCATION[:sequential][:KEY=VALUE...] (method options)",
    )
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows only")
    parser.add_argument("--docs-windows", type=int, default=200, help="windows of pydocs-eval.txt (a second held-out domain)")
    parser.add_argument("--output", default="quality")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    tokenizer = load_tokenizer(FIXTURE)
    calib_text, eval_text, docs_text = CALIB.read_text(), EVAL.read_text(), DOCS.read_text()

    def measure(model) -> tuple[float, float]:
        code = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
        docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False)
        return code, docs

    dense = load_pretrained(FIXTURE)
    dense_code, dense_docs = measure(dense)
    dense_speed = lowrank.generation_speed(dense, tokenizer)
    calibration = dict(num_samples=args.num_samples, seq_len=args.seq_len, progress=False)
    # Held-out statistics (same sampling, evaluation text) to check whether the calibration optimum generalizes.
    eval_stats = lowrank.calibrate(dense, tokenizer, eval_text, **calibration)
    timings, statistics = {}, {}
    for gradients in (False, True):
        start = time.perf_counter()
        statistics[gradients] = lowrank.calibrate(load_pretrained(FIXTURE), tokenizer, calib_text, gradients=gradients, **calibration)
        timings[gradients] = time.perf_counter() - start
    batches = calibration_batches(tokenizer, calib_text, args.num_samples, args.seq_len)

    header = ["method + allocation", "ratio", "removed", "pycode ppl", "reference", "pydocs ppl", "compress s", "peak MB", "speed vs dense", "held-out wins"]
    windows = f"first {args.max_windows} windows" if args.max_windows else "all 693 non-overlapping 256-token windows"
    preamble = [
        "# Compression quality on pycode-llama",
        "",
        f"Command: `python benchmarks/quality.py --configs {args.configs} --ratios {args.ratios}`. Machine: {machine_line()}.",
        f"Dense perplexity: **{dense_code:.2f}** on `pycode-eval.txt` ({windows}), **{dense_docs:.2f}** on the first"
        f" {args.docs_windows} windows of `pydocs-eval.txt`; dense generation {dense_speed:.0f} tokens/s (batch 1, greedy, 64 tokens).",
        f"Calibration: {args.num_samples} windows × {args.seq_len} tokens from `pycode-calib.txt`, seed 0"
        f" ({timings[False]:.1f} s; {timings[True]:.1f} s with gradients).",
        "",
        "- *removed*: fraction of the targeted (block linear) weights' storage removed, counted from the stored tensors"
        " (values, indices, scales; bits for quantized layers).",
        "- *pycode ppl*: held-out Python files; *pydocs ppl*: English documentation, a domain nothing was tuned on.",
        "- *reference*: the SVD-LLM authors' code on this fixture (issue 3), uniform allocation, whole file (shown only for whole-file runs).",
        "- *compress s*: calibration + allocation + factorization wall time (model load and save excluded); *peak MB*: extra resident memory.",
        "- *speed vs dense*: generation tokens/s relative to the dense model, measured in the same run.",
        "- *held-out wins* (uniform whiten): layers whose whitened factors have an output error on held-out text (`pycode-eval.txt`"
        " statistics) no larger than plain SVD's at the same rank.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    rows = []
    for ratio in ratios:
        for method, strategy, *extra in configs:
            flags = [item for item in extra if "=" not in item]
            options = [item for item in extra if "=" in item]
            model = load_pretrained(FIXTURE)
            spec = lowrank.get_method(method)
            gradients = spec.needs_gradients or strategy_needs_gradients(strategy)
            # Methods that only optionally use statistics (lowrank-sparse, dictionary, ...) get them too.
            stats = statistics[gradients] if (spec.needs_statistics or gradients or method != "svd") else None
            with PeakMemory() as memory:
                start = time.perf_counter()
                plan = lowrank.allocate(model, ratio, method=method, stats=stats, strategy=strategy)
                report = lowrank.compress_(
                    model,
                    plan,
                    method=method,
                    stats=stats,
                    config=parse_overrides(spec.config_class, options),
                    sequential=batches if ("sequential" in flags or spec.sequential) else None,
                    progress=False,
                )
                seconds = time.perf_counter() - start + (timings[gradients] if stats is not None else 0.0)
            code, docs = measure(model)
            speed = lowrank.generation_speed(model, tokenizer)
            wins = held_out_wins(dense, plan, eval_stats, statistics[False]) if method == "whiten" and strategy == "uniform" else None
            counts = report.parameters
            name = f"{method} + {strategy}" + (" + sequential" if flags else "") + "".join(f" ({option})" for option in options)
            rows.append(
                [
                    name,
                    f"{ratio:.1f}",
                    f"{1 - counts['targeted_bits_after'] / counts['targeted_bits_before']:.3f}",
                    f"{code:.2f}",
                    f"{REFERENCE[(method, ratio)]:.2f}" if (method, ratio) in REFERENCE and strategy == "uniform" and not extra and args.max_windows is None else "—",
                    f"{docs:.2f}",
                    f"{seconds:.1f}",
                    f"{memory.peak_mb:.0f}",
                    f"{speed / dense_speed:.2f}",
                    f"{wins[0]}/{wins[1]}" if wins else "—",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
            # Written after every row, so a long run leaves its finished rows behind.
            write_markdown(args.output, "\n".join(preamble + ["| " + " | ".join(row) + " |" for row in rows]) + "\n", echo=False)



if __name__ == "__main__":
    main()
