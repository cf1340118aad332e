"""Low-rank + quantized at equal storage: every fitting order, the GPTQ residual and dense-and-sparse outliers.

Run: ``python benchmarks/quant_orders.py`` (the reference model, bfloat16, 3 and 4 bits) or
``python benchmarks/quant_orders.py --model smollm2 --bits 3``. Writes
``benchmarks/results/quant-orders.md`` (``quant-orders-<model>.md``).

Every row of one bit width stores the same bits in every layer: those of a B-bit round-to-nearest
residual plus a rank-``--rank`` low-rank part (the plan rank R whose budget holds exactly that, as
``compensate.py --orders`` does). The rows differ only in how the budget is spent: the order in
which the low-rank part and the residual are fitted (``lowrank-quant``'s ``order``), the residual
quantizer (``quantizer``), and outliers kept sparse in full precision (``outliers``, paid for with
low-rank rank). All fits are whitened (``whiten=true``), so every row minimizes the same calibration
objective; the plain whitened low-rank fit at rank R (``whiten``) and the B-bit base alone (no
low-rank part, fewer bits) are the references.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, EVAL, machine_line, require_shared, write_markdown
from compensate import base_alone
from quality import resolve_model

import lowrank
from lowrank.allocation import Plan
from lowrank.compensate import CompensateConfig
from lowrank.compress import cast_
from lowrank.linalg import output_error
from lowrank.linalg.quantize import quantized_bits
from lowrank.methods.lowrank_quant import LowRankQuantConfig, lowrank_rank
from lowrank.models import DTYPES, load_pretrained, load_tokenizer
from lowrank.nn import linear_shape

# name (for --variants) → (what the row shows, lowrank-quant options beyond bits, group size and whiten=true)
VARIANTS = {
    "alternate": ("alternate (LoftQ; the default order)", {"order": "alternate"}),
    "lowrank-first": ("lowrank-first (SVDQuant)", {"order": "lowrank-first"}),
    "quantize-first": ("quantize-first (EoRA)", {"order": "quantize-first"}),
    "best": ("best of the three", {"order": "best"}),
    "alternate-gptq": ("alternate, GPTQ residual", {"order": "alternate", "quantizer": "gptq"}),
    "quantize-first-gptq": ("quantize-first, GPTQ (GPTQ + EoRA)", {"order": "quantize-first", "quantizer": "gptq"}),
    "best-gptq": ("best of the three, GPTQ", {"order": "best", "quantizer": "gptq"}),
    "alternate-outliers": ("alternate + 0.5 % outliers", {"order": "alternate", "outliers": 0.005}),
    "quantize-first-outliers": ("quantize-first + 0.5 % outliers", {"order": "quantize-first", "outliers": 0.005}),
    "best-gptq-outliers": ("best, GPTQ + 0.5 % outliers", {"order": "best", "quantizer": "gptq", "outliers": 0.005}),
    "best-gptq-sensitive-outliers": (
        "best, GPTQ + 0.5 % outliers by sensitivity",
        {"order": "best", "quantizer": "gptq", "outliers": 0.005, "outlier_selection": "sensitivity"},
    ),
}


def equal_storage_plan(model, names, bits: int, group_size: int, rank: int) -> Plan:
    """Plan ranks R whose budget R·(out + in) values is exactly a B-bit residual plus a rank-``rank`` low-rank part."""
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    value = torch.finfo(model.get_submodule(names[0]).weight.dtype).bits
    ranks = {}
    for name, (out, inp) in shapes.items():
        inner = min(rank, out, inp)
        ranks[name] = inner + -(-quantized_bits(out, inp, bits, group_size) // ((out + inp) * value))
        assert lowrank_rank(out, inp, ranks[name], bits, group_size, value) == inner
    return Plan(ratio=0.0, strategy="uniform", shapes=shapes, ranks=ranks)


def calibration_error(model, dense, stats, names) -> float:
    """Σ over layers of the calibration output error ‖(W − W′)X‖²_F of the stored model, relative to ‖WX‖²_F summed."""
    total = reference = 0.0
    for name in names:
        weight = dense.get_submodule(name).weight.detach().double()
        layer = model.get_submodule(name)
        approximation = layer.to_dense() if hasattr(layer, "to_dense") else layer.weight
        total += output_error(weight, approximation.detach().double(), stats[name].xtx)
        reference += output_error(weight, torch.zeros_like(weight), stats[name].xtx)
    return total / reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--rank", type=int, default=8, help="the low-rank part's rank that sets every row's storage")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS (default: all)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds; with several, each number is mean ± half the range")
    parser.add_argument("--max-windows", type=int, default=100, help="evaluate on the first N windows of pycode-eval.txt (0: all)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("quant-orders" if args.model == "reference" else f"quant-orders-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    eval_text = EVAL.read_text()
    dense = load_pretrained(model_dir).float()
    names = lowrank.find_targets(dense)
    max_windows = args.max_windows or None
    dtype = DTYPES[args.dtype]
    reference = cast_(copy.deepcopy(dense), dtype)
    weights = sum(reference.get_submodule(name).weight.numel() for name in names)
    labels = [label for label in args.variants.split(",") if label]
    unknown = [label for label in labels if label not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)}")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]

    def perplexity(model) -> float:
        return lowrank.perplexity(model, tokenizer, eval_text, max_windows=max_windows, progress=False)

    def run(compress, stats) -> dict:
        model = copy.deepcopy(reference)
        began = time.perf_counter()
        report = compress(model)
        seconds = time.perf_counter() - began
        ranks = sorted(getattr(model.get_submodule(name), "rank", 0) for name in names)
        return {
            "bits": report.parameters["targeted_bits_after"] / weights,
            "ranks": f"{ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]})",
            "outliers": sum(getattr(model.get_submodule(name), "num_nonzero", 0) for name in names) / weights,
            "structures": ", ".join(sorted({type(model.get_submodule(name)).__name__ for name in names})),
            "error": calibration_error(model, dense, stats, names),
            "ppl": perplexity(model),
            "seconds": seconds,
        }

    def spread(values: list[float], digits: int, percent: bool = False) -> str:
        """One seed: the value; several: mean ± half the range."""
        scale, suffix = (100, "%") if percent else (1, "")
        mean = sum(values) / len(values) * scale
        if len(values) == 1:
            return f"{mean:.{digits}f}{suffix}"
        return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2 * scale:.{digits}f}{suffix}"

    dense_ppl = perplexity(reference)
    print(f"dense {dense_ppl:.2f}", flush=True)
    results: dict[tuple[int, str], list[dict]] = {}
    calibration_seconds = []
    for seed in seeds:
        start = time.perf_counter()
        stats = lowrank.calibrate(dense, tokenizer, CALIB.read_text(), num_samples=args.num_samples, seq_len=args.seq_len, seed=seed, progress=False)
        calibration_seconds.append(time.perf_counter() - start)
        for bits in (int(b) for b in args.bits.split(",")):
            plan = equal_storage_plan(reference, names, bits, args.group_size, args.rank)
            base = CompensateConfig(base=f"rtn:{bits}", group_size=args.group_size)
            # Each lambda binds this seed's statistics and this width's plan as defaults (it runs in this iteration anyway).
            runs = [
                (f"rtn:{bits} alone (no low-rank part, fewer bits)", lambda m, stats=stats, base=base: base_alone(m, stats, base, names)),
                ("plain whitened low-rank at rank R (`whiten`)", lambda m, stats=stats, plan=plan: lowrank.compress_(m, plan, method="whiten", stats=stats, progress=False)),
            ]  # fmt: skip
            for key in labels:
                label, options = VARIANTS[key]
                config = LowRankQuantConfig(bits=bits, group_size=args.group_size, whiten=True, **options)
                compress = lambda m, stats=stats, plan=plan, config=config: lowrank.compress_(
                    m, plan, method="lowrank-quant", stats=stats, config=config, progress=False
                )
                runs.append((f"{label} (`{key}`)", compress))
            base_ppl = None
            for label, compress in runs:
                result = run(compress, stats)
                base_ppl = result["ppl"] if base_ppl is None else base_ppl
                result["gap"] = (base_ppl - result["ppl"]) / (base_ppl - dense_ppl) if base_ppl > dense_ppl else float("nan")
                results.setdefault((bits, label), []).append(result)
                print(f"seed {seed} | {bits} | {label} | {result}", flush=True)

    header = ["bits", "variant", "bits / weight", "low-rank ranks", "outliers", "structures", "calib error", "pycode ppl", "gap closed", "fit s"]
    rows = [["—", "dense", f"{torch.finfo(dtype).bits}", "—", "—", "—", "0", f"{dense_ppl:.2f}", "—", "—"]]
    for (bits, label), runs_of_row in results.items():
        first = runs_of_row[0]
        reference_row = label.startswith("rtn:")
        rows.append([
            str(bits), label, f"{first['bits']:.3f}", first["ranks"], f"{first['outliers']:.2%}", first["structures"],
            spread([r["error"] for r in runs_of_row], 5), spread([r["ppl"] for r in runs_of_row], 2),
            "—" if reference_row else spread([r["gap"] for r in runs_of_row], 0, percent=True),
            f"{sum(r['seconds'] for r in runs_of_row) / len(runs_of_row):.0f}",
        ])  # fmt: skip

    windows = f"first {max_windows} windows of 256 tokens" if max_windows else "all non-overlapping 256-token windows"
    command = " ".join(["python benchmarks/quant_orders.py", *sys.argv[1:]])
    lines = [
        f"# Low-rank + quantized at equal storage on {model_name}: orders, GPTQ residual, outliers",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        (
            f"Model in {args.dtype}. Perplexity on `pycode-eval.txt` ({windows}). Calibration: {args.num_samples} windows × {args.seq_len} tokens of"
            f" `pycode-calib.txt`, seed{'s' if len(seeds) > 1 else ''} {args.seeds} ({'/'.join(f'{t:.0f}' for t in calibration_seconds)} s), shared by every row"
            f"{' of a seed; each number is the mean ± half the range over the seeds' if len(seeds) > 1 else ''}. Group size {args.group_size};"
            f" {len(names)} targeted layers."
        ),
        "",
        (
            f"- Every `lowrank-quant` row of a bit width B stores the same bits in every layer: a B-bit residual plus a rank-{args.rank} low-rank part"
            " (plan rank R per layer); rows with outliers pay for them with low-rank rank. All are whitened (`whiten=true`), 5 alternations."
        ),
        "- *variant*: `lowrank-quant` options (`order`, `quantizer`, `outliers`, `outlier_selection`); the first two rows of each bit width are references.",
        "- *bits / weight*: all stored bits of the targeted layers (codes, zero points, scales, factors, outlier values and indices, row pointers) per weight.",
        "- *low-rank ranks*: the low-rank part's own rank over the layers; *outliers*: sparse entries / weights.",
        "- *structures*: the modules built (a layer whose plain rank-R fit is better gets `LowRankLinear`).",
        "- *calib error*: Σ over layers of ‖(W − W′)X‖²_F / Σ ‖WX‖²_F on the calibration data, the stored (bfloat16-rounded) model.",
        "- *gap closed*: (ppl(rtn:B alone) − ppl) / (ppl(rtn:B alone) − ppl(dense)).",
        "- *fit s*: wall time of the compression (2 shared cores: indicative only).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    write_markdown(output, "\n".join(lines), echo=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
