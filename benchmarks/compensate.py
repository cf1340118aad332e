"""Error compensation: held-out perplexity of a quantized model alone and with EoRA corrections.

Run: ``python benchmarks/compensate.py`` (the reference model) or ``python benchmarks/compensate.py
--model smollm2``. Writes ``benchmarks/results/compensate.md`` (``compensate-<model>.md``).

For each model dtype (float32, bfloat16), bit width and base quantizer (RTN, GPTQ): the base alone,
the base plus a correction of the same rank in every layer, and the base plus corrections allocated
under an extra-storage budget (a fraction of the base's stored bits; loss-aware, from one calibration
with gradients). Every model runs as ``lowrank.load`` would run it: the codes in torch's int4 CPU
kernel (``LowRankQuantLinear``), the base alone as rank-0 layers of the same structure.

``--factor-bits 16,8,4`` repeats every correction row with the factors in the model dtype (16) and
group-quantized at 8 and 4 bits (``CompensateConfig.factor_bits``, EoRA's quantized correction),
``--both-orders`` with and without the low-rank-first order, ``--iterations 0,3`` / ``--fisher-weighted 0,1`` /
``--bit-choices own,4,2/4`` with each of those options (``CompensateConfig.iterations``, ``fisher_weighted``,
``bit_choices``), and ``--seeds 0,1,2`` with that many
calibrations (the perplexity and gap columns then give the mean ± half the range over seeds).
"""

from __future__ import annotations

import argparse
import copy
import statistics as stat
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, EVAL, machine_line, require_shared, write_markdown
from quality import resolve_model

import lowrank
from lowrank.allocation import Plan
from lowrank.compensate import CompensateConfig, compensate_
from lowrank.compensate.export import base_weight
from lowrank.compensate.pipeline import split_bits
from lowrank.compress import cast_
from lowrank.linalg import output_error
from lowrank.linalg.quantize import quantize_groups, quantized_bits
from lowrank.models import DTYPES, load_pretrained, load_tokenizer
from lowrank.nn import linear_shape


def base_alone(model, stats, config, names):
    """The base compressor alone, as rank-0 compensated layers (the same kernels as the corrected models)."""
    plan = Plan(
        ratio=0.0, strategy="uniform", shapes={name: linear_shape(model.get_submodule(name)) for name in names}, ranks=dict.fromkeys(names, 0)
    )
    return lowrank.compress_(model, plan, method="compensate", stats=stats, config=config, progress=False)


def lowrank_first(model, stats, bits: int, group_size: int, rank: int, names):
    """``lowrank-quant`` (low-rank part first, whitened; residual quantized round-to-nearest; alternated) at
    the storage of a ``bits``-bit base plus a rank-``rank`` correction in every layer: its plan rank R is the
    budget R·(out + in) values whose share left beside the quantized residual is exactly ``rank``."""
    from lowrank.methods.lowrank_quant import LowRankQuantConfig, lowrank_rank

    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    value = torch.finfo(model.get_submodule(names[0]).weight.dtype).bits
    ranks = {}
    for name, (out, inp) in shapes.items():
        inner = min(rank, out, inp)
        ranks[name] = inner + -(-quantized_bits(out, inp, bits, group_size) // ((out + inp) * value))
        assert lowrank_rank(out, inp, ranks[name], bits, group_size, value) == inner
    plan = Plan(ratio=0.0, strategy="uniform", shapes=shapes, ranks=ranks)
    config = LowRankQuantConfig(bits=bits, group_size=group_size, whiten=True)
    return lowrank.compress_(model, plan, method="lowrank-quant", stats=stats, config=config, progress=False)


def layer_check(model, dense, stats, names, rtn=None) -> tuple[int, float]:
    """Layers whose calibration output error with the correction is ≤ the base's alone, and the largest ratio.

    The base is the layer's own (the compensated models), or ``rtn`` = (bits, group size): round-to-nearest
    of the dense weight (for lowrank-quant, whose residual is not a base of its own)."""
    improved, worst = 0, 0.0
    for name in names:
        layer = model.get_submodule(name)
        weight = dense.get_submodule(name).weight.detach().double()
        base_matrix = base_weight(layer) if rtn is None else quantize_groups(weight, *rtn).dequantize()
        base = output_error(weight, base_matrix.double(), stats[name].xtx)
        compensated = output_error(weight, layer.to_dense().detach().double(), stats[name].xtx)
        improved += compensated <= base
        worst = max(worst, compensated / base)
    return improved, worst


def order_name(order: tuple[bool, int, bool, str]) -> str:
    """How a correction row was fitted: (low-rank first too, alternations, Fisher-weighted, base widths a budget may choose)."""
    first, iterations, weighted, choices = order
    return (
        ("best of both" if first else "EoRA")
        + (f" + {iterations} alternations" if iterations else "")
        + (", Fisher-weighted" if weighted else "")
        + (f", base widths {choices.replace('/', ', ')} too" if choices else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--dense-only-dtypes", default="", help="dtypes whose dense perplexity alone is measured (baselines)")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--bases", default="rtn,gptq", help="comma-separated base quantizers")
    parser.add_argument("--ranks", default="8,32,128")
    parser.add_argument("--budgets", default="0.05,0.1,0.25", help="extra storage as a fraction of the base's bits")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "--iterations", default="0", help="comma-separated alternations of base and correction (LQ-LoRA); 0: plain EoRA; 0,3 runs both"
    )
    parser.add_argument("--lowrank-first", action="store_true", help="also try the low-rank-first order (SVDQuant) in every layer, keep the better")
    parser.add_argument(
        "--fisher-weighted",
        default="0",
        help="comma-separated 0/1: corrections fitted to the output-Fisher-weighted error (CompensateConfig.fisher_weighted); 0,1 runs both",
    )
    parser.add_argument(
        "--bit-choices",
        default="own",
        help="comma-separated CompensateConfig.bit_choices to run, widths within one joined by / (e.g. own,4,2/4; own: the base's own width only)",
    )
    parser.add_argument("--both-orders", action="store_true", help="every correction row without and with --lowrank-first")
    parser.add_argument("--factor-bits", default="16", help="comma-separated bits of the correction's factors; 16: the model dtype (no quantization)")
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds; rows give mean ± half the range over them")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows of pycode-eval.txt")
    parser.add_argument(
        "--orders", action="store_true", help="also lowrank-quant (low-rank first, RTN residual) at the storage of every rtn + rank r row"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("compensate" if args.model == "reference" else f"compensate-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    eval_text = EVAL.read_text()
    dense = load_pretrained(model_dir).float()
    names = lowrank.find_targets(dense)
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    calibrations, calibration_seconds = {}, []
    for seed in seeds:
        start = time.perf_counter()
        calibrations[seed] = lowrank.calibrate(
            dense,
            tokenizer,
            CALIB.read_text(),
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            seed=seed,
            gradients=True,
            weight_gradients=False,
            progress=False,
        )
        calibration_seconds.append(time.perf_counter() - start)

    def perplexity(model) -> float:
        return lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)

    def spread(values: list[float], form: str) -> str:
        """One value, or the mean ± half the range over seeds."""
        if len(values) == 1:
            return format(values[0], form)
        return f"{format(stat.mean(values), form)} ± {format((max(values) - min(values)) / 2, form)}"

    ranks_asked = [int(r) for r in args.ranks.split(",") if r]
    budgets_asked = [float(b) for b in args.budgets.split(",") if b]
    factor_bits_asked = [int(b) for b in args.factor_bits.split(",") if b]
    # Every correction row is run for each (low-rank first?, alternations, Fisher-weighted?) asked for.
    orders = [
        (first, iterations, bool(int(weighted)), choices)
        for first in ([False, True] if args.both_orders else [args.lowrank_first])
        for iterations in (int(i) for i in args.iterations.split(",") if i)
        for weighted in args.fisher_weighted.split(",")
        if weighted
        for choices in args.bit_choices.split(",")
        if choices
    ]
    orders = [(first, iterations, weighted, "" if choices == "own" else choices) for first, iterations, weighted, choices in orders]
    header = [
        "dtype",
        "base",
        "correction",
        "factors",
        "order",
        "ranks",
        "bits / weight",
        "extra vs base",
        "extra vs dense",
        "pycode ppl",
        "gap closed",
        "calib error ≤ base",
        "worst ratio",
        "compensate s",
    ]
    rows, targets = [], []
    for dtype_name in [d for d in args.dense_only_dtypes.split(",") if d]:
        ppl = perplexity(cast_(copy.deepcopy(dense), DTYPES[dtype_name]))
        rows.append([dtype_name, "dense", "—", "—", "—", "—", f"{torch.finfo(DTYPES[dtype_name]).bits}", "—", "—", f"{ppl:.2f}"] + ["—"] * 4)
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        reference = cast_(copy.deepcopy(dense), dtype)
        dense_ppl = perplexity(reference)
        weights = sum(reference.get_submodule(name).weight.numel() for name in names)
        dense_bits = weights * torch.finfo(dtype).bits
        rows.append([dtype_name, "dense", "—", "—", "—", "—", f"{torch.finfo(dtype).bits}", "—", "—", f"{dense_ppl:.2f}"] + ["—"] * 4)
        for bits in (int(b) for b in args.bits.split(",")):
            for kind in args.bases.split(","):
                runs = [("none", {}, None, orders[0])]
                for factor_bits in factor_bits_asked:
                    for order in orders:
                        runs += [(f"rank {r}", {"rank": r}, factor_bits, order) for r in ranks_asked]
                if args.orders and kind == "rtn":
                    runs += [(f"lowrank-quant at rank {r}'s bits", {"lowrank_first": r}, None, orders[0]) for r in ranks_asked]
                for factor_bits in factor_bits_asked:
                    for order in orders:
                        runs += [(f"budget {b:g}", {"budget": b}, factor_bits, order) for b in budgets_asked]
                base_ppl = {}
                # The base at its own width in every layer: what "extra" is counted against (bit choices change the bases' bits too).
                uniform_bits = sum(quantized_bits(*linear_shape(dense.get_submodule(name)), bits, args.group_size) for name in names)

                def extra_of(measured_row, uniform_bits=uniform_bits) -> float:
                    return (measured_row[2] + measured_row[3] - uniform_bits) / uniform_bits

                for label, request, factor_bits, order in runs:
                    config = CompensateConfig(
                        base=f"{kind}:{bits}",
                        group_size=args.group_size,
                        iterations=order[1],
                        lowrank_first=order[0],
                        fisher_weighted=order[2],
                        bit_choices=order[3] if "budget" in request else "",
                        factor_bits=None if factor_bits in (None, 16) else factor_bits,
                    )
                    measured = []  # per seed: ppl, gap, base bits, correction bits, ranks, layer check, seconds
                    for seed, stats in calibrations.items():
                        model = copy.deepcopy(reference)
                        start = time.perf_counter()
                        if "lowrank_first" in request:
                            report = lowrank_first(model, stats, bits, args.group_size, request["lowrank_first"], names)
                        elif request:
                            report = compensate_(model, stats, config, progress=False, **request)
                        else:
                            report = base_alone(model, stats, config, names)
                        seconds = time.perf_counter() - start
                        if "lowrank_first" in request:
                            base_bits = sum(quantized_bits(*linear_shape(dense.get_submodule(name)), bits, args.group_size) for name in names)
                            correction_bits = report.parameters["targeted_bits_after"] - base_bits
                        else:
                            parts = [split_bits(model.get_submodule(name)) for name in names]
                            base_bits, correction_bits = sum(p[0] for p in parts), sum(p[1] for p in parts)
                        ppl = perplexity(model)
                        ranks = sorted(report.modules[name]["rank"] for name in names)  # the low-rank part's own rank, for lowrank-quant too
                        if not request:
                            base_ppl[seed] = ppl
                            gap, check = None, None
                        else:
                            gap = (base_ppl[seed] - ppl) / (base_ppl[seed] - dense_ppl) if base_ppl[seed] > dense_ppl else float("nan")
                            check = layer_check(model, dense, stats, names, (bits, args.group_size) if "lowrank_first" in request else None)
                        measured.append((ppl, gap, base_bits, correction_bits, ranks, check, seconds))
                        del model
                    ppls = [m[0] for m in measured]
                    base_bits, correction_bits, ranks = measured[0][2], measured[0][3], measured[0][4]  # seed 0's storage and ranks
                    if not request:
                        closed = improved = worst = "—"
                    else:
                        gaps = [m[1] for m in measured]
                        closed = spread([100 * g for g in gaps], ".0f") + " %"
                        improved = f"{min(m[5][0] for m in measured)}/{len(names)}"
                        worst = f"{max(m[5][1] for m in measured):.3f}"
                        if bits == 3 and "budget" in request and max(extra_of(m) for m in measured) <= 0.05:
                            targets.append((dtype_name, kind, label, factor_bits, order, max(extra_of(m) for m in measured), gaps))
                    rank_text = "0" if ranks[-1] == 0 else f"{ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]})"
                    factors = "—" if not request or "lowrank_first" in request else ("model dtype" if factor_bits == 16 else f"{factor_bits}-bit")
                    order_text = "—" if not request or "lowrank_first" in request else order_name(order)
                    rows.append(
                        [
                            dtype_name, config.base, label, factors, order_text, rank_text, f"{(base_bits + correction_bits) / weights:.3f}",
                            f"{extra_of(measured[0]):.1%}", f"{(base_bits + correction_bits - uniform_bits) / dense_bits:.1%}", spread(ppls, ".2f"), closed,
                            improved, worst,
                            f"{stat.median(m[6] for m in measured):.1f}",
                        ]
                    )  # fmt: skip
                    print(" | ".join(rows[-1]), flush=True)

    windows = f"first {args.max_windows} windows of 256 tokens" if args.max_windows else "all non-overlapping 256-token windows"
    command = " ".join(["python benchmarks/compensate.py", *sys.argv[1:]])
    verdict = []
    for dtype_name, kind, label, factor_bits, order, extra, gaps in targets:
        factors = "factors in the model dtype" if factor_bits == 16 else f"{factor_bits}-bit factors"
        order_text = "" if order == (False, 0, False, "") else f", {order_name(order)}"
        gap = stat.mean(gaps)
        seeds_text = f" (mean of {len(gaps)} seeds, {min(gaps):.0%}–{max(gaps):.0%})" if len(gaps) > 1 else ""
        verdict.append(
            f"- {dtype_name}, {kind}:3 + {label}, {factors}{order_text} ({extra:.1%} extra): closes {gap:.0%} of the gap{seeds_text}"
            f" — target ≥ 50 %: {'met' if gap >= 0.5 else 'not met'}."
        )
    seed_text = (
        f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (one calibration each; every row is run once per seed)"
    )
    lines = [
        f"# Error compensation on {model_name}",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        (
            f"Perplexity on `pycode-eval.txt` ({windows}). Calibration: {args.num_samples} windows × {args.seq_len} tokens of `pycode-calib.txt`,"
            f" {seed_text}, with output gradients ({stat.mean(calibration_seconds):.0f} s each), shared by every row. Group size {args.group_size};"
            f" {len(names)} targeted layers."
        ),
        "",
        "- *base*: rtn:B round-to-nearest, gptq:B GPTQ (`lowrank.linalg.gptq`), B bits per weight, asymmetric, float16 scale and B-bit zero per group.",
        (
            "- *correction*: `rank r` the same EoRA rank in every layer (capped at the layer's smaller side); `budget b` loss-aware ranks whose"
            " factors add at most b × the base's stored bits (some layers may get rank 0)."
        ),
        (
            "- *factors*: the correction's factors stored in the model dtype, or group-quantized at 8 / 4 bits (`--factor-bits`: rows of `down`"
            f" and of `up`ᵀ in groups of {args.group_size}, float16 scale and B-bit zero per group; the budget prices a rank step at that cost)."
        ),
        (
            "- *order*: EoRA (base first, then the correction), or the better per layer of EoRA and the low-rank-first order (`--lowrank-first`);"
            " *+ N alternations*: N rounds of re-quantizing W − L and refitting L after the first, the best pair kept (`--iterations`);"
            " *Fisher-weighted*: corrections fitted to, chosen and allocated by the output-Fisher-weighted error (`--fisher-weighted`);"
            " *base widths … too* (budget rows): the allocator may also give a layer's base these widths, paying the extra base bits from the"
            " same budget (`--bit-choices`; the *ranks* column is the correction's)."
        ),
        "- *bits / weight*: all stored bits of the targeted layers (codes, zero points, scales, factors) per weight.",
        (
            "- *extra vs base / vs dense*: all stored bits beyond the base at its own width in every layer (the corrections', plus a wider base's"
            " where `--bit-choices` chose one), over that base's bits, and over the dense layers' in the same dtype."
        ),
        "- *gap closed*: (ppl(base) − ppl) / (ppl(base) − ppl(dense)), same dtype, base of the same calibration seed.",
        (
            "- *calib error ≤ base*: layers whose calibration output error ‖(W − W′)X‖² with the correction is no larger than the base's alone"
            " (the stored model, so bfloat16 rounding of the factors included; the fewest over seeds; with bit choices, the base the layer"
            " got); *worst ratio*: the largest of"
            " compensated / base over the layers (and seeds)."
        ),
        "- *compensate s*: base quantization + allocation + corrections, wall time (median over seeds).",
        (
            "- with several seeds, *pycode ppl* and *gap closed* are the mean ± half the range over seeds; ranks and bits are seed "
            f"{seeds[0]}'s (the others' differ by the allocation only)."
        ),
        (
            "- *lowrank-quant at rank r's bits* (with `--orders`): the other order, low-rank part first (whitened) and the residual quantized"
            " round-to-nearest, alternated 5 times (`lowrank-quant`, `whiten=true`), at the same stored bits per layer as rtn:B + rank r;"
            " its gap and its calibration check are against rtn:B alone."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Target (issue 15): at 3 bits, ≤ 5 % extra storage closes ≥ 50 % of the base quantizer's perplexity gap to dense.",
        *(verdict or ["- no budget row at 3 bits within 5 % extra storage was run."]),
        "",
    ]
    write_markdown(output, "\n".join(lines), echo=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
