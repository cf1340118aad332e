"""Cross-layer correction: one-shot against sequential refitting, on held-out text.

Run: ``python benchmarks/cross_layer.py`` (the reference model; about 45 minutes on 2 busy cores).
Writes ``benchmarks/results/cross-layer.md``:

1. *Why the old ``--sequential`` lost held-out perplexity* (``whiten``, uniform ranks, ``--diagnose-ratio``):
   the refit as it was (every layer of a block refit from statistics collected before any of the
   block's layers were compressed, so o_proj / down_proj were fit to inputs they never see), with
   the anchor alone, with staging alone, and with both; each with the calibration objective
   ‖WX − W′X̃‖² and the same objective on held-out text (64 windows of ``pycode-eval.txt``), both
   summed over layers and relative to the one-shot fit.
2. *The grid*: for ``whiten`` + uniform and ``fisher-whiten`` + ``global`` at each ratio, the one-shot
   fit (no correction) against the staged, anchored sequential refit (the correction), perplexity
   on all of ``pycode-eval.txt`` and on 200 windows of ``pydocs-eval.txt``; the headline row
   (``--headline``) with every seed of ``--seeds``.
3. *More anchors* (``--sweep-anchors``) for the staged refit at ``--diagnose-ratio``, run last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.calibration import calibration_batches  # noqa: E402
from lowrank.calibration.paired import collect_paired_statistics  # noqa: E402
from lowrank.compress import compress_layers_  # noqa: E402
from lowrank.linalg.refit import shifted_output_error  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama) or smollm2")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--recipes", default="whiten:uniform,fisher-whiten:global")
    parser.add_argument("--anchor", type=float, default=0.5, help="the anchor α of the corrected rows")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds of the headline row (other rows: the first)")
    parser.add_argument("--headline", default="fisher-whiten:global:0.4", help="METHOD:ALLOCATION:RATIO repeated over --seeds")
    parser.add_argument("--diagnose-ratio", type=float, default=0.4, help="ratio of the diagnosis table; negative: skip it")
    parser.add_argument("--sweep-anchors", default="0.25,0.75", help="more anchors for the staged refit at --diagnose-ratio, run last; empty: none")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows of pycode-eval only")
    parser.add_argument("--docs-windows", type=int, default=200)
    parser.add_argument("--output", default=None, help="results file name (default: cross-layer, or cross-layer-<model>)")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("cross-layer" if args.model == "reference" else f"cross-layer-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    calib_text, eval_text, docs_text = CALIB.read_text(), EVAL.read_text(), DOCS.read_text()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    headline = args.headline.split(":")

    def measure(model) -> tuple[float, float]:
        code = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
        docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False)
        return code, docs

    dense = load_pretrained(model_dir)
    dense_code, dense_docs = measure(dense)
    statistics, batches = {}, {}

    def calibration(seed: int):
        if seed not in statistics:  # with gradients: fisher-whiten and global need them, whiten reads the same XᵀX
            statistics[seed] = lowrank.calibrate(load_pretrained(model_dir), tokenizer, calib_text, gradients=True, seed=seed, num_samples=args.num_samples, progress=False)
            batches[seed] = calibration_batches(tokenizer, calib_text, args.num_samples, 256, seed)
        return statistics[seed], batches[seed]

    measured: dict[tuple, tuple] = {}  # (method, strategy, ratio, seed, sequential, anchor, staged) → (plan, report, ppl)

    def compressed_and_measured(method, strategy, ratio, seed, sequential, anchor=None, staged=None):
        """(model, plan, report, (pycode, pydocs)); a run the diagnosis already made comes back with model None."""
        key = (method, strategy, ratio, seed, sequential, anchor, staged)
        if key in measured:
            return (None, *measured[key])
        model, plan, report = compress(*key)
        measured[key] = (plan, report, measure(model))
        return (model, *measured[key])

    def compress(method, strategy, ratio, seed, sequential: bool, anchor: float | None = None, staged: bool | None = None):
        stats, calib_batches = calibration(seed)
        model = load_pretrained(model_dir)
        plan = lowrank.allocate(model, ratio, method=method, stats=stats, strategy=strategy)
        report = compress_layers_(
            model, plan, method=method, stats=stats, config=None, sequential=calib_batches if sequential else None, progress=False, anchor=anchor, staged=staged
        )
        return model, plan, report

    windows = f"first {args.max_windows} windows" if args.max_windows else "all non-overlapping 256-token windows"
    preamble = [
        f"# Cross-layer correction on {model_name}",
        "",
        f"Command: `{' '.join(['python benchmarks/cross_layer.py', *sys.argv[1:]])}`. Machine: {machine_line()}.",
        f"Calibration: {args.num_samples} windows × 256 tokens of `pycode-calib.txt` (seed 0 unless stated). Dense perplexity"
        f" **{dense_code:.2f}** on `pycode-eval.txt` ({windows}), **{dense_docs:.2f}** on the first {args.docs_windows} windows of `pydocs-eval.txt` (both held out).",
        "",
        "- *one-shot*: every layer factored from the dense model's statistics (no correction; `compress_` without `sequential`).",
        "- *refit, unstaged*: the sequential refit before this change: each block's statistics collected once, before any of its"
        " layers were compressed, so o_proj and down_proj were refit to inputs without their own block's compression.",
        "- *staged*: a block's layers refit in the order they read their inputs (q/k/v, then o, then gate/up, then down), each"
        " on the inputs the compressed layers before it produce (whenever `anchor` is set).",
        "- *anchor α*: the refit minimizes (1 − α)‖WX − W′X̃‖² + α‖(W − W′)X‖² (`compress_(..., sequential=batches, anchor=α)`, which also"
        " stages the refit and keeps the one-shot fit where the corrected one is worse on the calibration objective); α = 0 is the plain refit.",
        "",
    ]
    sections: list[str] = []

    def write() -> None:
        write_markdown(output, "\n".join(preamble + sections) + "\n", echo=False)

    if args.diagnose_ratio >= 0:
        ratio = args.diagnose_ratio
        held = calibration_batches(tokenizer, eval_text, 64, 256, 1)  # held-out paired statistics (64 windows of pycode-eval)
        one_shot, plan, _, one_shot_ppl = compressed_and_measured("whiten", "uniform", ratio, seeds[0], False)
        one_shot_weights = {name: one_shot.get_submodule(name).to_dense().detach() for name in plan.ranks}
        sections += [
            f"## Why the old refit lost held-out perplexity (`whiten`, uniform ranks, ratio {ratio})",
            "",
            "*calibration objective* and *held-out objective*: ‖WX − W′X̃‖² summed over the 42 layers, on the calibration"
            " tokens (from the refit's own bookkeeping) and on 64 windows of `pycode-eval.txt` (inputs X̃ of the finished model),"
            " relative to the one-shot factors on the same inputs; *layers better held out*: layers whose held-out objective is"
            " below the one-shot factors'.",
            "",
            "| variant | pycode ppl | pydocs ppl | calibration objective | held-out objective | layers better held out |",
            "|---|---|---|---|---|---|",
            "| one-shot | {:.2f} | {:.2f} | 1.000 | 1.000 | — |".format(*one_shot_ppl),
        ]
        write()
        variants = [("refit, unstaged (the old `--sequential`)", False, None), (f"refit, unstaged, anchor {args.anchor}", False, args.anchor),
                    ("refit, staged, anchor 0", True, 0.0), (f"refit, staged, anchor {args.anchor}", True, args.anchor)]  # fmt: skip
        for label, staged, anchor in variants:
            model, _, report, (code, docs) = compressed_and_measured("whiten", "uniform", ratio, seeds[0], True, anchor, None if staged == (anchor is not None) else staged)
            paired = collect_paired_statistics(dense, model, list(plan.ranks), held)
            ours, theirs = {}, {}
            for name in plan.ranks:
                weight, pair = dense.get_submodule(name).weight.detach(), paired[name]
                ours[name] = shifted_output_error(weight, model.get_submodule(name).to_dense().detach(), pair.dense_xtx, pair.cross, pair.shifted_xtx)
                theirs[name] = shifted_output_error(weight, one_shot_weights[name], pair.dense_xtx, pair.cross, pair.shifted_xtx)
            calibration_ratio = sum(e["refit"] for e in report.refit_errors.values()) / sum(e["without_refit"] for e in report.refit_errors.values())
            held_ratio = sum(ours.values()) / sum(theirs.values())
            better = sum(ours[name] < theirs[name] for name in plan.ranks)
            sections.append(f"| {label} | {code:.2f} | {docs:.2f} | {calibration_ratio:.3f} | {held_ratio:.3f} | {better}/{len(plan.ranks)} |")
            print(sections[-1], flush=True)
            write()
        sections.append("")
        del one_shot

    sections += [
        f"## One-shot against the correction (staged, anchor {args.anchor})",
        "",
        f"Headline row (`{args.headline}`): mean ± half the range over calibration seeds {args.seeds}; other rows seed {seeds[0]}."
        " *fell back*: layers where the corrected fit had a larger calibration objective than the one-shot fit and was replaced by it.",
        "",
        "| recipe | ratio | seeds | one-shot pycode | corrected pycode | one-shot pydocs | corrected pydocs | fell back |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method, strategy in (recipe.split(":") for recipe in args.recipes.split(",")):
            row_seeds = seeds if [method, strategy, str(ratio)] == headline else seeds[:1]
            plain, corrected, fell_back = [], [], 0
            for seed in row_seeds:
                plain.append(compressed_and_measured(method, strategy, ratio, seed, False)[3])
                _, _, report, ppl = compressed_and_measured(method, strategy, ratio, seed, True, args.anchor)
                corrected.append(ppl)
                fell_back += sum("fell_back" in errors for errors in report.refit_errors.values())
            cells = [spread([run[column] for run in runs]) for column in (0, 1) for runs in (plain, corrected)]  # pycode, then pydocs
            sections.append(f"| {method} + {strategy} | {ratio:.1f} | {','.join(map(str, row_seeds))} | " + " | ".join(cells) + f" | {fell_back} |")
            print(sections[-1], flush=True)
            write()
    sections.append("")
    write()

    sweep = [float(a) for a in args.sweep_anchors.split(",") if a]
    if sweep and args.diagnose_ratio >= 0:
        sections += [
            f"## More anchors (`whiten`, uniform ranks, ratio {args.diagnose_ratio}, staged, seed {seeds[0]})",
            "",
            "| anchor | pycode ppl | pydocs ppl | fell back |",
            "|---|---|---|---|",
        ]
        for anchor in sweep:
            model, _, report = compress("whiten", "uniform", args.diagnose_ratio, seeds[0], sequential=True, anchor=anchor)
            code, docs = measure(model)
            sections.append(f"| {anchor} | {code:.2f} | {docs:.2f} | {sum('fell_back' in e for e in report.refit_errors.values())} |")
            print(sections[-1], flush=True)
            write()
            del model
        sections.append("")
        write()


def spread(values: list[float]) -> str:
    """The mean, and ± half the range when there are several values."""
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


if __name__ == "__main__":
    main()
