"""Where float64 matters in whitened factorization: float64, mixed (float64 root, float32 SVD), float32.

Run: ``python benchmarks/precision.py`` (the reference model and SmolLM2, about 15 minutes on 2
cores; ``--models reference`` takes two). Writes ``benchmarks/results/precision.md``.

Per model: one calibration with gradients (64 × 256 windows of ``pycode-calib.txt``, seed 0) and
one ``global`` plan at the ratio (the CLI's default recipe, ``fisher-whiten`` + ``global``); then
the factorization phase (``lowrank.compress_`` of a copy of the dense model with that plan) runs
under each ``precision``, in rotating order for ``--rounds`` rounds in one process, so a busy
machine slows every precision alike. Reported: median seconds and the median per-round ratio to
float64; the calibration output error of every layer relative to float64's (max over layers of
error / float64 error − 1); and held-out perplexity.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.configs import parse_overrides  # noqa: E402
from lowrank.linalg import output_error  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402

PRECISIONS = ("float64", "mixed", "float32")


def run_model(name: str, args) -> list[str]:
    model_dir, model_name = resolve_model(name)
    tokenizer = load_tokenizer(model_dir)
    dense = load_pretrained(model_dir).eval()
    stats = lowrank.calibrate(dense, tokenizer, CALIB.read_text(), num_samples=64, seq_len=256, gradients=True, progress=False)
    plan = lowrank.allocate(dense, args.ratio, method=args.method, stats=stats, strategy="global")
    spec = lowrank.get_method(args.method)
    seconds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    models = {}
    for round_ in range(args.rounds):
        order = PRECISIONS[round_ % 3 :] + PRECISIONS[: round_ % 3]
        for precision in order:
            model = copy.deepcopy(dense)
            config = parse_overrides(spec.config_class, [f"precision={precision}"])
            start = time.perf_counter()
            lowrank.compress_(model, plan, method=args.method, stats=stats, config=config, progress=False)
            seconds[precision].append(time.perf_counter() - start)
            models[precision] = model
    def approximation(model, layer: str) -> torch.Tensor:
        module = model.get_submodule(layer)
        return (module.to_dense() if hasattr(module, "to_dense") else module.weight).detach()

    errors = {}
    for precision, model in models.items():
        errors[precision] = {
            layer: output_error(dense.get_submodule(layer).weight.detach(), approximation(model, layer), stats[layer].xtx) for layer in plan.ranks
        }
    eval_text, docs_text = EVAL.read_text(), DOCS.read_text()
    rows = []
    for precision in PRECISIONS:
        ratios = [a / b for a, b in zip(seconds[precision], seconds["float64"])]
        worst = max(errors[precision][layer] / max(errors["float64"][layer], 1e-30) - 1 for layer in plan.ranks)
        code = lowrank.perplexity(models[precision], tokenizer, eval_text, max_windows=args.eval_windows, progress=False)
        docs = lowrank.perplexity(models[precision], tokenizer, docs_text, max_windows=args.eval_windows, progress=False)
        rows.append(
            f"| {model_name} | {precision} | {statistics.median(seconds[precision]):.1f} | {statistics.median(ratios):.2f}× "
            f"[{min(ratios):.2f}–{max(ratios):.2f}] | {worst:+.1e} | {code:.3f} | {docs:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference,smollm2")
    parser.add_argument("--method", default="fisher-whiten")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows of each evaluation file")
    parser.add_argument("--out", default="precision")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args)
    load = os.getloadavg()
    lines = [
        "# Precision of whitened factorization: float64, mixed, float32",
        "",
        f"`python benchmarks/precision.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {machine_line()}; `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the cores were shared with other jobs).",
        f"Recipe: `{args.method}` + `global` at ratio {args.ratio}, one plan per model (calibration: 64 × 256 windows of "
        "`pycode-calib.txt`, seed 0, with gradients). *mixed*: the covariance's root (Cholesky, or eigh when near-singular) "
        "and the unwhitening product in float64, the SVD of the whitened weight in float32.",
        f"*factorize*: `lowrank.compress_` with the plan, median of {args.rounds} rounds, precisions in rotating order in one "
        "process; *vs float64*: median per-round time ratio [min–max]. *worst layer*: max over layers of its calibration "
        f"output error / float64's − 1. Perplexity: first {args.eval_windows} windows of `pycode-eval.txt` and `pydocs-eval.txt` (held out).",
        "",
        "| model | precision | factorize (s) | vs float64 | worst layer | pycode ppl | pydocs ppl |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_markdown(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
