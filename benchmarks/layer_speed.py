"""Per-layer speed of the structured layers' forward paths: the previous path against today's, interleaved.

Run: ``python benchmarks/layer_speed.py`` (about 15 minutes on 2 busy cores; ``--layout-only --out
layer-speed-layout`` for the factor-layout table alone; ``--quick`` for a
1-minute check). Writes ``benchmarks/results/layer-speed.md``.

Layers: one per projection shape of the generated Llama of ``benchmarks/speed.py`` (hidden 2048,
MLP 5632, 4 key/value heads of 64: q/o 2048 → 2048, k/v 2048 → 256, gate/up 2048 → 5632, down
5632 → 2048), with the random factors ``speed.py`` gives each structure at the ratio (same
builders). For every layer, token count and dtype, each round times, in a shuffled order:

* *dense*: ``F.linear`` with a dense weight of the layer's shape;
* *old*: the forward pass as it was before the per-layer speed work (re-implemented here, on
  its own copies of the layer, so that nothing of the new path, such as the re-laid-out ``up``
  factor, leaks into it; called through a module like the new one): low-rank + quantized ``up(down(x)) + Q·x`` with Q·x through the
  autograd Function; dictionary and low-rank + sparse with one ``embedding_bag`` over all tokens;
* *new*: the layer's forward pass as committed;
* for the dictionary, also both of its many-token paths forced (*dense codes*: the codes
  scattered into a dense matrix for the call and one GEMM; *sparse*: the token-sliced sparse
  product), which is what its path threshold is chosen from.

One token (decode) runs each path over enough copies of the layer that their dense weights
exceed 96 MB (the L3 cache is 32 MB), so weights come from memory as in a whole-model decode step;
many tokens (prefill) run one copy. Each sample is timed with the thread's CPU time
(``time.thread_time``; with one torch thread all the work runs on the calling thread): the machine's
2 cores are shared with other jobs, and CPU time leaves out the time this process waits for a
core, which wall-clock time does not (memory-bandwidth contention remains in both). Wall-clock
ratios are reported beside it. Ratios are per-round, median [min–max].
"""

from __future__ import annotations

import os

# Before torch starts (as in speed.py): spin-waiting OpenMP threads distort timings on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import gc
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown
from speed import build_dictionary, build_quant, build_sparse

from lowrank.nn.dictionary_linear import DictionaryLinear
from lowrank.nn.layout import ONEDNN_PACKING
from lowrank.nn.prepared import PreparedCache
from lowrank.nn.lowrank_quant_linear import _Int4ResidualProduct

SHAPES = {"q/o 2048→2048": (2048, 2048), "k/v 2048→256": (256, 2048), "gate/up 2048→5632": (5632, 2048), "down 5632→2048": (2048, 5632)}
DECODE_BYTES = 96 * 2**20


def old_sparse_matmul(rows, x, values):
    """The sparse product before: ``mv`` for one token, one ``embedding_bag`` over all tokens otherwise."""
    if x.shape[0] == 1:
        return torch.mv(rows.csr, x[0].to(rows.csr.dtype)).to(x.dtype)[None]
    return F.embedding_bag(rows.col_indices, x.T.contiguous(), rows.offsets, mode="sum", per_sample_weights=values.to(x.dtype)).T


def old_quant(layer, x):
    """LowRankQuantLinear.forward before: two ``nn.Linear`` calls (``up`` row-major), Q·x through the autograd Function, one add."""
    flat = x.reshape(-1, layer.in_features)
    residual = _Int4ResidualProduct.apply(flat, layer, layer.prepared_residual()).view(*x.shape[:-1], layer.out_features)
    return layer.up(layer.down(x)) + residual


def old_sparse(layer, x):
    """LowRankPlusSparseLinear.forward before."""
    flat = x.reshape(-1, layer.in_features)
    return layer.up(layer.down(x)) + old_sparse_matmul(layer.prepared_sparse(), flat, layer.sparse_values)


def old_dictionary(layer, x):
    """DictionaryLinear.forward before: the codes' sparse product for every token count."""
    mixed = layer.atoms(x).reshape(-1, layer.num_atoms)
    y = old_sparse_matmul(layer.prepared_codes(), mixed, layer.code_values.reshape(-1))
    return y + layer.bias if layer.bias is not None else y


def dictionary_forced(layer: DictionaryLinear, x, dense: bool):
    """The dictionary's many-token product with its path forced (the ``bias``-free layers of this benchmark)."""
    mixed = layer.atoms(x).reshape(-1, layer.num_atoms)
    if dense:
        return F.linear(mixed, layer.dense_codes())
    return layer.prepared_codes().matmul(mixed, layer.code_values.reshape(-1), layer.out_features)


class Forward(torch.nn.Module):
    """Calls ``function(layer, x)`` through ``nn.Module.__call__``, so that the old path pays the same call overhead as the new."""

    def __init__(self, function, layer):
        super().__init__()
        self.function, self.layer = function, layer

    def forward(self, x):
        return self.function(self.layer, x)


STRUCTURES = {
    "low-rank + quantized (4-bit)": (build_quant, old_quant),
    "dictionary": (build_dictionary, old_dictionary),
    "low-rank + sparse": (build_sparse, old_sparse),
}


def time_paths(paths: dict, rounds: int) -> dict:
    """Per-path lists of (thread CPU seconds, wall seconds), every round running every path once in a shuffled order."""
    samples = {name: [] for name in paths}
    order = list(paths)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            cpu, wall = time.thread_time(), time.perf_counter()
            paths[name]()
            samples[name].append((time.thread_time() - cpu, time.perf_counter() - wall))
    return samples


def ratio(samples: dict, numerator: str, denominator: str, clock: int) -> str:
    """Median [min–max] of per-round time ratios ``numerator`` / ``denominator`` (a speed-up of ``denominator``)."""
    values = sorted(a[clock] / b[clock] for a, b in zip(samples[numerator], samples[denominator]))
    return f"{statistics.median(values):.2f} [{values[0]:.2f}–{values[-1]:.2f}]"


def median_ms(samples: list, copies: int) -> float:
    return statistics.median(s[0] for s in samples) / copies * 1e3


@torch.no_grad()
def measure(structure: str, shape_name: str, dtype: torch.dtype, tokens: int, args) -> list[str]:
    build, old = STRUCTURES[structure]
    out_features, in_features = SHAPES[shape_name]
    dense_bytes = out_features * in_features * torch.finfo(dtype).bits // 8
    copies = min(48, math.ceil(DECODE_BYTES / dense_bytes)) if tokens == 1 else 1
    generator = torch.Generator().manual_seed(0)
    new_layers = [build(out_features, in_features, args.ratio, dtype, generator) for _ in range(copies)]
    old_layers = [build(out_features, in_features, args.ratio, dtype, generator) for _ in range(copies)]
    dense = [torch.randn(out_features, in_features, generator=generator).to(dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(1, tokens, in_features, generator=generator).to(dtype)
    for layer in new_layers + old_layers:
        layer.eval()
    # The same outputs (float tolerance) from both paths, and run-time forms built before timing.
    reference = F.linear(x.double(), new_layers[0].to_dense().double())
    scale = reference.abs().max().item()
    for name, y in (("old", old(new_layers[0], x)), ("new", new_layers[0](x))):
        error = (y.double() - reference).abs().max().item() / scale
        assert error < (2e-2 if dtype == torch.bfloat16 else 5e-3), f"{structure} {shape_name} {name}: relative error {error}"
    old_layers = [Forward(old, layer) for layer in old_layers]
    for layer in old_layers:
        layer(x)
    paths = {
        "dense": lambda: [F.linear(x, weight) for weight in dense],
        "old": lambda: [layer(x) for layer in old_layers],
        "new": lambda: [layer(x) for layer in new_layers],
    }
    chosen = ""
    if structure == "dictionary" and tokens > 1:
        paths["dense codes"] = lambda: [dictionary_forced(layer, x, True) for layer in new_layers]
        paths["sparse"] = lambda: [dictionary_forced(layer, x, False) for layer in new_layers]
        layer = new_layers[0]
        chosen = f" ({'dense codes' if layer.uses_dense_codes(tokens, dtype) else 'sparse'}, codes {layer.nonzeros / layer.num_atoms:.0%} dense)"
    for run in paths.values():  # warm-up
        run()
    samples = time_paths(paths, args.decode_rounds if tokens == 1 else args.prefill_rounds)
    ceiling = dense_bytes * 8 / new_layers[0].runtime_bits()
    row = [
        structure,
        shape_name,
        str(dtype).removeprefix("torch."),
        str(tokens),
        f"{median_ms(samples['dense'], copies):.3g}",
        ratio(samples, "dense", "old", 0),
        ratio(samples, "dense", "new", 0),
        ratio(samples, "old", "new", 0) + chosen,
        ratio(samples, "old", "new", 1),
        f"{ceiling:.2f}×" if tokens == 1 else "",
    ]
    if structure == "dictionary" and tokens > 1:
        row[7] += f"; forced: dense codes {ratio(samples, 'old', 'dense codes', 0)}, sparse {ratio(samples, 'old', 'sparse', 0)}"
    line = "| " + " | ".join(row) + " |"
    print(line, flush=True)
    return [line]


@torch.no_grad()
def measure_layout(shape: tuple[int, int], dtype: torch.dtype, rounds: int) -> str:
    """One token through a (out, in) weight stored row-major, column-major (same values) and in oneDNN's packed layout
    (``lowrank.nn.layout.prepared_linear``, what bfloat16 factors run from), over copies past the cache."""
    out_features, in_features = shape
    copies = min(48, math.ceil(DECODE_BYTES / (out_features * in_features * torch.finfo(dtype).bits // 8)))
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(out_features, in_features, generator=generator).to(dtype) for _ in range(copies)]
    columns = [w.t().contiguous().t() for w in rows]
    x = torch.randn(1, in_features, generator=generator).to(dtype)
    paths = {"row-major": lambda: [F.linear(x, w) for w in rows], "column-major": lambda: [F.linear(x, w) for w in columns]}
    if ONEDNN_PACKING:
        caches = [PreparedCache() for _ in rows]
        # Called directly (not through ``packs``): float32 is measured too, to show why it is not packed.
        packed = [cache.get((), lambda w=w: torch.ops.mkldnn._reorder_linear_weight(w, 1)) for cache, w in zip(caches, rows)]
        paths["packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
    with torch.no_grad():
        for run in paths.values():
            run()
        samples = time_paths(paths, rounds)
    has_packed = "packed" in samples
    line = (
        f"| {out_features} × {in_features} | {str(dtype).removeprefix('torch.')} | {median_ms(samples['row-major'], copies):.3g} "
        f"| {median_ms(samples['column-major'], copies):.3g} | {ratio(samples, 'row-major', 'column-major', 0)} "
        f"| {median_ms(samples['packed'], copies) if has_packed else float('nan'):.3g} "
        f"| {ratio(samples, 'row-major', 'packed', 0) if has_packed else '—'} |"
    )
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", default="1,128,256,512", help="comma-separated token counts (1 = decode)")
    parser.add_argument("--structures", default=",".join(STRUCTURES), help="comma-separated, from: " + ", ".join(STRUCTURES))
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--decode-rounds", type=int, default=30)
    parser.add_argument("--prefill-rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="float32, gate/up and down, 1 and 512 tokens, fewer rounds")
    parser.add_argument("--no-layout", dest="layout", action="store_false", help="skip the factor-layout table")
    parser.add_argument("--layout-only", action="store_true", help="only the factor-layout table (about a minute)")
    parser.add_argument("--out", default="layer-speed")
    args = parser.parse_args()
    if args.quick:
        args.dtypes, args.tokens, args.decode_rounds, args.prefill_rounds = "float32", "1,512", 10, 3
        args.shapes = "gate/up 2048→5632,down 5632→2048"
    torch.set_num_threads(args.threads)
    header = [
        "# Layer speed: the structured layers' previous forward path against today's, interleaved",
        "",
        f"`python benchmarks/layer_speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {machine_line()}; `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`. The 2 cores are shared with other "
        "engineers' jobs (run at lower priority, `nice`), so absolute times vary; ratios come from interleaved rounds.",
        f"Layers of the generated Llama of `speed.md` at ratio {args.ratio}, random factors of each method's shapes (`speed.py`'s builders), "
        f"no bias. One token: each path over copies of the layer whose dense weights exceed {DECODE_BYTES >> 20} MB (weights from memory), "
        f"{args.decode_rounds} rounds; many tokens: one copy, {args.prefill_rounds} rounds; every round runs every path once in a shuffled order.",
        "Columns: *dense ms*: median thread CPU time of `F.linear` with a dense weight, per layer; *old*, *new* vs dense: speed-ups "
        "(dense time / path time) by thread CPU time; *new vs old*: old time / new time (> 1: the new path is faster), by thread CPU "
        "time and by wall-clock time; *bytes ceiling*: dense bytes / bytes the new path reads for one token (`runtime_bits`). "
        "Median [min–max] of per-round ratios. Both paths' outputs are checked against the dense product of the stored parts first.",
        "Dictionary rows also time both many-token paths forced (against old); the path the layer chose is named.",
        "",
        "| structure | layer | dtype | tokens | dense ms | old vs dense | new vs dense | new vs old (CPU time) | new vs old (wall) | bytes ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines: list[str] = []
    if args.layout_only:
        header, args.structures = header[:5], ""
    for structure in [name for name in args.structures.split(",") if name]:
        for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
            for shape in args.shapes.split(","):
                for tokens in [int(t) for t in args.tokens.split(",")]:
                    lines += measure(structure, shape, dtype, tokens, args)
                    gc.collect()
                    write_markdown(args.out, "\n".join(header + lines) + "\n", echo=False)
    if args.layout:
        # The factor shapes of the quantized layers at ratio 0.4 (rank 698): tall ``up`` factors and wide ``down`` factors.
        lines += [
            "",
            "## Factor layout at one token",
            "",
            "`F.linear` of one token with a weight stored row-major (as `nn.Linear` keeps it) and column-major (the same values, "
            "`w.t().contiguous().t()`, as `tall_column_major_` lays out tall `up` factors) and in oneDNN's packed layout "
            "(`torch.ops.mkldnn._reorder_linear_weight`, run by `_linear_pointwise`, as `lowrank.nn.layout` runs bfloat16 factors), "
            "over copies past the cache; thread CPU time per matrix, median of the rounds; *… vs row-major*: row-major time / that "
            "layout's time per round.",
            "",
            "| weight (out × in) | dtype | row-major ms | column-major ms | column-major vs row-major | oneDNN packed ms | packed vs row-major |",
            "|---|---|---|---|---|---|---|",
        ]
        for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
            for shape in [(5632, 698), (2048, 698), (698, 2048), (698, 5632)]:
                lines.append(measure_layout(shape, dtype, args.decode_rounds))
                write_markdown(args.out, "\n".join(header + lines) + "\n", echo=False)
    print(f"wrote benchmarks/results/{args.out}.md")


if __name__ == "__main__":
    main()
