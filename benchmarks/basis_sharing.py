"""Basis Sharing (``basis-sharing``: one whitened basis per projection across neighbouring blocks) against ``whiten``.

Run: ``python benchmarks/basis_sharing.py`` (the reference model; writes
``benchmarks/results/basis-sharing.md``) or ``python benchmarks/basis_sharing.py --model smollm2
--max-windows 24 --docs-windows 24`` (writes ``basis-sharing-smollm2.md``). The ``global``
allocation: ``python benchmarks/basis_sharing.py --configs
whiten:uniform,fisher-whiten:global,basis-sharing:global --seeds 0,1,2 --output
basis-sharing-global``. One calibration per seed (64 windows × 256 tokens of ``pycode-calib.txt``,
with gradients when a row allocates ``global``) serves every row of that seed; every row removes
the same fraction of the targeted weights. Perplexity on the
held-out ``pycode-eval.txt`` and ``pydocs-eval.txt``; *calibration error* is Σ over the targeted
layers of ‖(W − W′)X‖² on the calibration tokens (the objective both methods minimize), counted
from the modules built, and *held-out layer error* the same sum on 64 windows of ``pycode-eval.txt``
(whether the layer-wise gain carries over to unseen text). The table is rewritten after every row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown
from modegpt import compress
from quality import resolve_model

import lowrank
from lowrank.linalg import output_error
from lowrank.methods.basis_sharing import PLAN_KEY
from lowrank.models import load_pretrained, load_tokenizer


def calibration_error(model, dense_weights: dict[str, torch.Tensor], stats) -> float:
    """Σ_layers ‖(W − W′)X‖² of the compressed model's targeted layers (dense layers add 0)."""
    total = 0.0
    for name, weight in dense_weights.items():
        module = model.get_submodule(name)
        if isinstance(module, lowrank.nn.ReplacementLinear):
            total += output_error(weight, module.to_dense().detach(), stats[name].xtx)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default="whiten:uniform,basis-sharing:uniform,basis-sharing:uniform:group=4,basis-sharing:uniform:share_outputs=o_proj,down_proj",
        help="comma-separated METHOD:ALLOCATION[:KEY=VALUE...] (method options; a value may hold commas after the first =)",
    )
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--max-windows", type=int, default=None, help="windows of pycode-eval.txt (default: all)")
    parser.add_argument("--docs-windows", type=int, default=100, help="windows of pydocs-eval.txt")
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--output", default=None, help="results file name (default: basis-sharing, or basis-sharing-<model>)")
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds (several: a mean ± spread table too)")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    configs = _parse_configs(args.configs)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    gradients = any(strategy == "global" for _, strategy, _ in configs)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("basis-sharing" if args.model == "reference" else f"basis-sharing-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    calib_text, eval_text, docs_text = CALIB.read_text(), EVAL.read_text(), DOCS.read_text()

    def measure(model) -> tuple[float, float]:
        code = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
        docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False)
        return code, docs

    dense = load_pretrained(model_dir)
    dense_code, dense_docs = measure(dense)
    dense_parameters = lowrank.count_parameters(dense)
    targets = lowrank.find_targets(dense)
    dense_weights = {name: lowrank.nn.linear_weight(dense.get_submodule(name)).detach().double().clone() for name in targets}
    held_out = lowrank.calibrate(dense, tokenizer, eval_text, num_samples=64, seq_len=256, seed=0, gradients=False, progress=False)
    del dense

    command = "python benchmarks/basis_sharing.py" + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value is not None and value != parser.get_default(key)
    )
    windows = "all windows" if args.max_windows is None else f"first {args.max_windows} windows"
    rows, summary = [], {}
    calibration_seconds = 0.0

    def write() -> None:
        text = "\n".join(
            [
                f"# Basis Sharing (`basis-sharing`) against whitened SVD on {model_name}",
                "",
                f"Command: `{command}`. Machine: {machine_line()}.",
                (
                    f"Calibration: 64 windows × 256 tokens of `pycode-calib.txt`, seed{'s' if len(seeds) > 1 else ''} {args.seeds}, "
                    f"{'with' if gradients else 'no'} gradients ({calibration_seconds:.0f} s), the same statistics for every row of a seed."
                ),
                (
                    f"Dense: {dense_parameters:,} parameters; perplexity **{dense_code:.2f}** on `pycode-eval.txt` ({windows}), "
                    f"**{dense_docs:.2f}** on the first {args.docs_windows} windows of `pydocs-eval.txt` (both held out)."
                ),
                "",
                "- Every row: the same fraction of the targeted (block linear) weights removed (`uniform`: per layer; `global`: in total);",
                "  *removed* is counted from the modules built, a shared basis once.",
                "- *global*: the knapsack of predicted loss increases (½·Σ f·E[Δy²], f the output Fisher); for *basis-sharing* it also",
                "  decides which groups share (a Fisher-weighted shared basis priced against the group's layers factored by `fisher-whiten`)",
                "  and keeps `fisher-whiten` + `global`'s plan when that predicts less loss; *predicted loss*: the plan's prediction (nats/token).",
                "- *basis-sharing*: q/k/v/gate/up of `group` neighbouring blocks share an input-side basis (the paper's choice: SVD of the",
                "  stacked weights whitened by the pooled input covariance, coefficients refit per layer); o/down whitened per layer;",
                "  `share_outputs=o_proj,down_proj` also shares o/down with an output-side basis (the exact joint optimum).",
                "  *groups shared* = groups sharing / groups that did not (factored: they predicted less error; or dense).",
                "- *calibration error*: Σ over the targeted layers of ‖(W − W′)X‖² on the calibration tokens (what both methods minimize);",
                "  *held-out layer error*: the same sum with X from 64 windows × 256 tokens of `pycode-eval.txt` (the dense model's inputs).",
                "- Decode speed not timed (shared machine).",
                "",
                *(_summary_table(summary, dense_code, dense_docs) if len(seeds) > 1 else []),
                "| method | allocate | ratio | seed | removed | model parameters | groups shared | predicted loss | calibration error | held-out layer error | pycode ppl | × dense | pydocs ppl | × dense | allocate + compress s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                *rows,
                "",
            ]
        )
        write_markdown(output, text, echo=False)

    for seed in seeds:
        dense = load_pretrained(model_dir)
        start = time.perf_counter()
        stats = lowrank.calibrate(dense, tokenizer, calib_text, num_samples=64, seq_len=256, seed=seed, gradients=gradients, progress=False)
        calibration_seconds = time.perf_counter() - start
        del dense
        for ratio in ratios:
            for method, strategy, options in configs:
                model = load_pretrained(model_dir)
                start = time.perf_counter()
                report, plan = compress(model, method, strategy, options, ratio, stats)
                seconds = time.perf_counter() - start
                error, unseen = calibration_error(model, dense_weights, stats), calibration_error(model, dense_weights, held_out)
                code, docs = measure(model)
                counts = report.parameters
                groups = plan.details.get(PLAN_KEY, {}).get("groups", {})
                shared = sum(entry["structure"] == "basis-sharing" for entry in groups.values())
                groups_text = f"{shared} / {len(groups) - shared}" if groups else "—"
                predicted = f"{plan.predicted_error:.4f}" if plan.predicted_error is not None else "—"
                label = method + "".join(f" ({option})" for option in options)
                removed = 1 - counts["targeted_after"] / counts["targeted_before"]
                rows.append(
                    f"| {label} | {strategy} | {ratio} | {seed} | {removed:.3f} | {counts['model_after']:,} | {groups_text} | {predicted} "
                    f"| {error:.4g} | {unseen:.4g} | {code:.2f} | {code / dense_code:.3f} | {docs:.2f} | {docs / dense_docs:.3f} | {seconds:.1f} |"
                )
                summary.setdefault((label, strategy, ratio), []).append((removed, shared, code, docs))
                print(rows[-1], flush=True)
                write()
                del model


def _summary_table(summary: dict, dense_code: float, dense_docs: float) -> list[str]:
    """Mean ± half the range over seeds, per (method, allocation, ratio)."""

    def spread(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"

    lines = [
        "Over the seeds (mean ± half the range):",
        "",
        "| method | allocate | ratio | seeds | removed | groups shared (mean) | pycode ppl | × dense | pydocs ppl | × dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, strategy, ratio), runs in sorted(summary.items(), key=lambda item: (item[0][2], item[0][0], item[0][1])):
        removed, shared, code, docs = (list(column) for column in zip(*runs))
        lines.append(
            f"| {label} | {strategy} | {ratio} | {len(runs)} | {sum(removed) / len(runs):.3f} | {sum(shared) / len(runs):.1f} | {spread(code)} "
            f"| {sum(code) / len(code) / dense_code:.3f} | {spread(docs)} | {sum(docs) / len(docs) / dense_docs:.3f} |"
        )
    return lines + [""]


def _parse_configs(text: str) -> list[tuple[str, str, list[str]]]:
    """``METHOD:ALLOCATION[:KEY=VALUE...]`` items separated by commas; a comma inside a value (``share_outputs=o_proj,down_proj``) stays in it."""
    items: list[str] = []
    for piece in text.split(","):
        if items and ":" not in piece and "=" not in piece:
            items[-1] += "," + piece  # the rest of a list-valued option
        else:
            items.append(piece)
    configs = []
    for item in items:
        method, strategy, *options = item.split(":")
        configs.append((method, strategy, options))
    return configs


if __name__ == "__main__":
    main()
