"""Can the ``up`` factors of sibling low-rank layers (gate/up, q/k/v) run batched at decode?

Run: ``python benchmarks/fused_up.py`` (about a minute). Writes ``benchmarks/results/fused-up.md``.

Fused groups (:mod:`lowrank.nn.fused`) already run the siblings' ``down`` factors as one matmul
(one pass over the shared input). Their ``up`` factors read different inputs (each sibling's slice
of the stacked ``down`` output) and write different outputs, so one call can only batch them:
``torch.bmm`` over the siblings, ranks zero-padded to the largest (outputs must be equal, as for
gate/up, or padded too). This times, at batch 1 (one decode token), the siblings' ``up`` products
run one ``F.linear`` each against one ``bmm``, interleaved in one process (median of per-round
ratios over rounds, range), at the ranks of ratio 0.4, for the generated Llama shapes of
``benchmarks/speed.py`` (hidden 2048, MLP 5632, 32/4 heads) and SmolLM2-135M's (hidden 576, MLP
1536, 9/3 heads).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402

from lowrank.linalg.rank import rank_for_ratio  # noqa: E402

# (model, group, hidden, [out features of each sibling])
GROUPS = [
    ("Generated Llama", "gate/up", 2048, [5632, 5632]),
    ("Generated Llama", "q/k/v", 2048, [2048, 256, 256]),
    ("SmolLM2-135M", "gate/up", 576, [1536, 1536]),
    ("SmolLM2-135M", "q/k/v", 576, [576, 192, 192]),
]


def time_calls(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def measure(hidden: int, outs: list[int], ratio: float, dtype: torch.dtype, rounds: int, calls: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ranks = [rank_for_ratio(out, hidden, ratio) for out in outs]
    ups = [torch.randn(out, rank, generator=generator).to(dtype) for out, rank in zip(outs, ranks)]
    hidden_states = torch.randn(1, 1, sum(ranks), generator=generator).to(dtype)  # the stacked down output
    bounds = torch.tensor([0] + ranks).cumsum(0).tolist()
    pieces = [hidden_states[..., start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    width, height = max(ranks), max(outs)
    padded = torch.zeros(len(ups), height, width, dtype=dtype)
    for index, up in enumerate(ups):
        padded[index, : up.shape[0], : up.shape[1]] = up
    stacked_inputs = torch.zeros(len(ups), width, 1, dtype=dtype)
    for index, piece in enumerate(pieces):
        stacked_inputs[index, : piece.shape[-1], 0] = piece.reshape(-1)

    def separate():
        return [F.linear(piece, up) for piece, up in zip(pieces, ups)]

    def batched():
        return torch.bmm(padded, stacked_inputs)

    for index, output in enumerate(batched()):  # the same numbers, before timing them
        torch.testing.assert_close(output[: outs[index], 0], separate()[index].reshape(-1), rtol=1e-2, atol=1e-2)
    for function in (separate, batched):
        time_calls(function, calls // 4)  # warm-up
    times = {"separate": [], "batched": []}
    for round_ in range(rounds):
        order = [("separate", separate), ("batched", batched)][:: 1 if round_ % 2 == 0 else -1]
        for name, function in order:
            times[name].append(time_calls(function, calls))
    ratios = [s / b for s, b in zip(times["separate"], times["batched"])]
    return {
        "ranks": ranks,
        "separate_us": statistics.median(times["separate"]) * 1e6,
        "batched_us": statistics.median(times["batched"]) * 1e6,
        "ratio": statistics.median(ratios),
        "low": min(ratios),
        "high": max(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default="fused-up")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    lines = [
        "# Batched `up` factors of fused groups at decode (batch 1)",
        "",
        f"`python benchmarks/fused_up.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {machine_line()}; `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`; load average at the start "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the cores were shared with other jobs).",
        f"Ratio {args.ratio}; {args.rounds} interleaved rounds of {args.calls} calls each; *separate / batched* is the median "
        "of per-round time ratios [min–max]: above 1, `bmm` would be faster.",
        "",
        "| model | group | dtype | ranks | separate F.linear (µs) | one bmm (µs) | separate / batched |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, group, hidden, outs in GROUPS:
        for dtype in (torch.float32, torch.bfloat16):
            row = measure(hidden, outs, args.ratio, dtype, args.rounds, args.calls)
            lines.append(
                f"| {model} | {group} | {str(dtype).removeprefix('torch.')} | {'/'.join(map(str, row['ranks']))} | {row['separate_us']:.0f} "
                f"| {row['batched_us']:.0f} | {row['ratio']:.2f}× [{row['low']:.2f}–{row['high']:.2f}] |"
            )
            print(lines[-1], flush=True)
    write_markdown(args.out, "\n".join(lines) + "\n", echo=False)
    print(f"wrote benchmarks/results/{args.out}.md")


if __name__ == "__main__":
    main()
