"""MoDeGPT types I and III (``modegpt``: gated MLPs shrunk by Nyström neuron selection; with
``attention=value`` also each attention's value heads by a whitened SVD) against whitened SVD.

Run: ``python benchmarks/modegpt.py`` (the reference model) or ``python benchmarks/modegpt.py --model
smollm2 --ratios 0.2 --max-windows 24 --docs-windows 24`` (writes ``modegpt-smollm2.md``).
``--attention v_proj,o_proj`` adds, after every ``modegpt`` row, the same row with ``attention=value``
(type III) in each of those value metrics, and names the results file ``modegpt-attention[-<model>].md``;
its items ``query_key`` (type II: each attention's q/k heads keep k rotary pairs by MoDeGPT's CR score) and
``all:v_proj`` / ``all:o_proj`` (types II and III) add those rows too, with two more columns (e.g.
``--attention o_proj,query_key,all:o_proj --output modegpt-query-key``). One
calibration (64 windows × 256 tokens of ``pycode-calib.txt``, seed 0, with gradients) serves every
row; perplexity on the held-out ``pycode-eval.txt`` and ``pydocs-eval.txt``. Decode speed is not
timed here (the machine is shared). Writes ``benchmarks/results/modegpt.md``, rewritten after every row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.configs import parse_overrides  # noqa: E402
from lowrank.methods.modegpt import PLAN_KEY  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402


def compress(model, method: str, strategy: str, options: list[str], ratio: float, stats):
    """(report, plan) of one row: a module method (modegpt) through its own verb, the others through compress_."""
    spec = lowrank.get_method(method)
    config = parse_overrides(spec.config_class, options)
    plan = lowrank.allocate(model, ratio, method=method, stats=stats, strategy=strategy, method_config=config)
    if getattr(spec, "compress", None) is not None:
        return spec.compress(model, plan, stats, config, progress=False), plan
    return lowrank.compress_(model, plan, method=method, stats=stats, config=config, progress=False), plan


QUERY_KEY_NOTES = [
    "- *attention=query_key* (MoDeGPT type II): every attention's q_proj/k_proj pair is a unit too: each key/value head and its",
    "  query heads keep k of head_dim/2 rotary pairs (i, i + head_dim/2), the highest by MoDeGPT's CR score √(C_q,ii·C_k,ii) summed",
    "  over the pair and the query heads (rotation ignored), the other rows zero; its curve is the dropped dimensions' ½·Fisher-weighted",
    "  output error (mean of the q and k sides); *query/key units* counts shrunk / fallen back to factored q_proj, k_proj.",
    "  *attention=all*: types II and III together.",
]


def attention_options(item: str) -> tuple[str, ...]:
    """The modegpt options of one ``--attention`` item."""
    if item == "query_key":
        return ("attention=query_key",)
    if item.startswith("all:"):
        return ("attention=all", f"value_metric={item[4:]}")
    return ("attention=value", f"value_metric={item}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="whiten:uniform,fisher-whiten:global,modegpt:uniform,modegpt:global",
                        help="comma-separated METHOD:ALLOCATION[:KEY=VALUE...] (method options)")  # fmt: skip
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--max-windows", type=int, default=None, help="windows of pycode-eval.txt (default: all)")
    parser.add_argument("--docs-windows", type=int, default=200, help="windows of pydocs-eval.txt")
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--attention", default=None,
                        help="comma-separated value metrics (v_proj, o_proj): also run every modegpt row with attention=value in each; "
                             "query_key: with attention=query_key (type II); all:v_proj, all:o_proj: with attention=all (II and III)")  # fmt: skip
    parser.add_argument("--output", default=None, help="results file name (default: modegpt[-attention], or with -<model>)")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    if args.attention:
        variants = [attention_options(item) for item in args.attention.split(",")]
        configs = [
            variant
            for config in configs
            for variant in ([config, *((*config, *options) for options in variants)] if config[0] == "modegpt" else [config])
        ]
    query_key = any(option in ("attention=query_key", "attention=all") for config in configs for option in config[2:])
    ratios = [float(r) for r in args.ratios.split(",")]
    model_dir, model_name = resolve_model(args.model)
    stem = "modegpt-attention" if args.attention else "modegpt"
    output = args.output or (stem if args.model == "reference" else f"{stem}-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    calib_text, eval_text, docs_text = CALIB.read_text(), EVAL.read_text(), DOCS.read_text()

    def measure(model) -> tuple[float, float]:
        code = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
        docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False)
        return code, docs

    dense = load_pretrained(model_dir)
    dense_code, dense_docs = measure(dense)
    dense_parameters = lowrank.count_parameters(dense)
    start = time.perf_counter()
    stats = lowrank.calibrate(
        dense, tokenizer, calib_text, num_samples=64, seq_len=256, seed=0, gradients=True, weight_gradients=False, progress=False
    )
    calibration_seconds = time.perf_counter() - start
    del dense

    command = "python benchmarks/modegpt.py" + "".join(
        f" --{key.replace('_', '-')} {value}"
        for key, value in vars(args).items()
        if value is not None and value != parser.get_default(key)
    )
    windows = "all windows" if args.max_windows is None else f"first {args.max_windows} windows"
    rows = []

    def write() -> None:
        text = "\n".join(
            [
                f"# MoDeGPT {'types I, II and III' if query_key else 'types I and III' if args.attention else 'type I'} (`modegpt`) against whitened SVD on {model_name}",
                "",
                f"Command: `{command}`. Machine: {machine_line()}.",
                f"Calibration: 64 windows × 256 tokens of `pycode-calib.txt`, seed 0, with gradients ({calibration_seconds:.0f} s), the same statistics for every row.",
                f"Dense: {dense_parameters:,} parameters; perplexity **{dense_code:.2f}** on `pycode-eval.txt` ({windows}), "
                f"**{dense_docs:.2f}** on the first {args.docs_windows} windows of `pydocs-eval.txt` (both held out).",
                "",
                "- *removed*: fraction of the targeted (block linear) weight parameters removed, counted from the modules built;",
                "  *model parameters*: the whole compressed model's.",
                "- *modegpt*: every gated MLP keeps k of its n neurons (ridge-leverage Nyström selection on down_proj's input correlation,",
                "  down_proj refit in closed form), attention factored with `whiten` at the plan's ranks; *MLPs shrunk* counts the units",
                "  shrunk / units that fell back to their factored form because it predicted less error.",
                "- *attention=value* (MoDeGPT type III): every attention's value/output pair is a unit too: each key/value head keeps",
                "  k of its head_dim value dimensions (whitened SVD of its stacked o_proj·v_proj map on v_proj's inputs), sized by the same",
                "  knapsack; *value units* counts shrunk / fallen back to factored v_proj, o_proj"
                + (" (q_proj, k_proj factored unless attention=query_key or all)." if query_key else " (q_proj, k_proj are always factored)."),
                "  *value_metric=v_proj*: MoDeGPT's objective, whitened by v_proj's inputs (before the attention mix), per head;",
                "  *value_metric=o_proj*: kept subspaces from o_proj's input correlation (after the mix), o_proj refit jointly in closed form.",
                *(QUERY_KEY_NOTES if query_key else []),
                "- *predicted loss*: the plan's predicted per-token loss increase (½·Σ Fisher·output error), where the plan has one.",
                "- Decode speed is not timed (shared machine).",
                "",
                "| method + allocation | ratio | removed | model parameters | MLPs shrunk | mean kept neurons | value units | mean kept value dims "
                + ("| query/key units | mean kept q/k dims " if query_key else "")
                + "| predicted loss | pycode ppl | × dense | pydocs ppl | × dense | allocate + compress s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if query_key else ""),
                *rows,
                "",
            ]
        )
        write_markdown(output, text, echo=False)

    for ratio in ratios:
        for method, strategy, *options in configs:
            model = load_pretrained(model_dir)
            start = time.perf_counter()
            report, plan = compress(model, method, strategy, list(options), ratio, stats)
            seconds = time.perf_counter() - start
            code, docs = measure(model)
            counts = report.parameters
            units = plan.details.get(PLAN_KEY, {}).get("units", {})
            shrunk = [entry for entry in units.values() if entry["structure"] == "modegpt"]
            shrunk_text = f"{len(shrunk)} / {len(units) - len(shrunk)}" if units else "—"
            kept = f"{sum(e['neurons'] for e in shrunk) / len(shrunk):.0f} of {shrunk[0]['of']}" if shrunk else "—"
            heads = plan.details.get(PLAN_KEY, {}).get("attention", {})
            shrunk_heads = [entry for entry in heads.values() if entry["structure"] == "modegpt"]
            heads_text = f"{len(shrunk_heads)} / {len(heads) - len(shrunk_heads)}" if heads else "—"
            kept_dims = f"{sum(e['head_dim'] for e in shrunk_heads) / len(shrunk_heads):.1f} of {shrunk_heads[0]['of']}" if shrunk_heads else "—"
            pairs = plan.details.get(PLAN_KEY, {}).get("query_key", {})
            shrunk_pairs = [entry for entry in pairs.values() if entry["structure"] == "modegpt"]
            pairs_text = f"{len(shrunk_pairs)} / {len(pairs) - len(shrunk_pairs)}" if pairs else "—"
            kept_pairs = f"{sum(e['head_dim'] for e in shrunk_pairs) / len(shrunk_pairs):.1f} of {shrunk_pairs[0]['of']}" if shrunk_pairs else "—"
            query_key_cells = f"| {pairs_text} | {kept_pairs} " if query_key else ""
            predicted = f"{plan.predicted_error:.4f}" if plan.predicted_error is not None else "—"
            label = f"{method} + {strategy}" + "".join(f" ({option})" for option in options)
            rows.append(
                f"| {label} | {ratio} | {1 - counts['targeted_after'] / counts['targeted_before']:.3f} | {counts['model_after']:,} | {shrunk_text} | {kept} | {heads_text} | {kept_dims} "
                f"{query_key_cells}| {predicted} | {code:.2f} | {code / dense_code:.3f} | {docs:.2f} | {docs / dense_docs:.3f} | {seconds:.1f} |"
            )
            print(rows[-1], flush=True)
            write()
            del model


if __name__ == "__main__":
    main()
