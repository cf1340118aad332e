"""Why uniform whitened SVD fails on a real model and loss-aware allocation does not: where the loss goes.

Run: ``python benchmarks/why_allocation.py`` (SmolLM2-135M, about 5 minutes on 2 cores; ``--model
reference`` for the 7 M reference model). Writes ``benchmarks/results/why_allocation-<model>.md``.

One calibration with gradients (64 × 256 tokens of ``pycode-calib.txt``) gives every matrix its
predicted loss curve (``fisher-whiten``: ½ Σ_{i>r} σ_i² of diag(√f)·W·C^{½} per token, the same
curve the ``global`` allocator minimizes). For the uniform plan (every matrix loses the same share)
and the ``global`` plan at the same budget the tables give, per layer kind and per third of the
depth, the share of the targeted parameters kept and the predicted loss increase, and the matrices
that carry most of the uniform plan's predicted loss. A last table compares, per kind, the energy the
uniform plan removes from W with the quantization noise already in the weights: SmolLM2 is read from
a Q4_1 GGUF, so each block of 32 weights sits on a 16-level grid whose rounding noise
((max − min)/15)²/12 per weight is estimated from the dequantized weights themselves.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.allocation.curves import loss_curves  # noqa: E402
from lowrank.allocation.knapsack import predicted_error, stored_parameters  # noqa: E402
from lowrank.linalg import whitening  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402
from lowrank.nn import linear_weight  # noqa: E402


def kind_and_depth(name: str, layers: int) -> tuple[str, str]:
    index = int(re.search(r"\.(\d+)\.", name).group(1))
    third = ("first", "middle", "last")[min(2, 3 * index // layers)]
    return name.rsplit(".", 1)[-1].replace("_proj", ""), f"{third} third"


def q4_noise_energy(weight: torch.Tensor, block: int = 32) -> float:
    """Σ over weights of the Q4_1 rounding-noise variance ((max − min)/15)²/12 of each block of 32 along the rows."""
    rows = weight.detach().double().reshape(-1, block)
    step = (rows.max(dim=1).values - rows.min(dim=1).values) / 15
    return float((step.square() / 12).sum().item() * block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, reference, or a model directory / .gguf")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="matrices listed by predicted loss under uniform ranks")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    model_dir, model_name = resolve_model(args.model)
    model, tokenizer = load_pretrained(model_dir), load_tokenizer(model_dir)
    stats = lowrank.calibrate(model, tokenizer, CALIB.read_text(), num_samples=args.num_samples, gradients=True, weight_gradients=False, progress=False)
    uniform = lowrank.allocate(model, args.ratio, method="fisher-whiten", stats=stats, strategy="uniform")
    best = lowrank.allocate(model, args.ratio, method="fisher-whiten", stats=stats, strategy="global")
    curves = loss_curves(model, uniform.shapes, stats, "fisher-whiten")
    layers = model.config.num_hidden_layers

    def loss_of(plan, name) -> float:
        return predicted_error({name: curves[name]}, {name: plan.ranks.get(name)})

    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, shape in uniform.shapes.items():
        for group in kind_and_depth(name, layers):
            g = groups[group]
            g["dense"] += shape[0] * shape[1]
            g["matrices"] += 1
            for label, plan in (("uniform", uniform), ("global", best)):
                g[f"{label} kept"] += stored_parameters(shape, plan.ranks.get(name))
                g[f"{label} loss"] += loss_of(plan, name)
                g[f"{label} dense"] += plan.ranks.get(name) is None
    total = {label: sum(loss_of(plan, n) for n in uniform.shapes) for label, plan in (("uniform", uniform), ("global", best))}

    def group_rows(keys) -> list[str]:
        rows = []
        for key in keys:
            g = groups[key]
            rows.append(
                f"| {key} | {int(g['matrices'])} | {g['uniform kept'] / g['dense']:.2f} | {g['uniform loss']:.4f} ({g['uniform loss'] / total['uniform']:.0%}) "
                f"| {g['global kept'] / g['dense']:.2f} | {int(g['global dense'])} | {g['global loss']:.4f} ({g['global loss'] / total['global']:.0%}) |"
            )
        return rows

    kinds = [k for k in ("q", "k", "v", "o", "gate", "up", "down") if k in groups] or sorted(k for k in groups if "third" not in k)
    depths = [f"{t} third" for t in ("first", "middle", "last")]
    worst = sorted(uniform.shapes, key=lambda n: loss_of(uniform, n), reverse=True)[: args.top]
    worst_rows = [
        f"| `{n}` | {uniform.shapes[n][0]}×{uniform.shapes[n][1]} | {uniform.ranks.get(n)} | {loss_of(uniform, n):.4f} ({loss_of(uniform, n) / total['uniform']:.0%}) "
        f"| {best.ranks.get(n) or 'dense'} | {loss_of(best, n):.4f} |"
        for n in worst
    ]
    # Inputs whose covariance needed damping (λ_min ≤ 1e-10·λ_max): whitening adds δ·I to them.
    inputs = {id(stats[name].inputs): stats[name] for name in uniform.shapes}
    damped = sum(whitening(layer.xtx, symmetric=False).damping > 0 for layer in inputs.values())
    noise_rows = []
    for kind in kinds:
        removed = noise = energy = 0.0
        for name in uniform.shapes:
            if kind_and_depth(name, layers)[0] != kind:
                continue
            weight = linear_weight(model.get_submodule(name)).detach().double()
            singular = torch.linalg.svdvals(weight)
            rank = uniform.ranks.get(name)
            removed += float(singular[rank:].square().sum()) if rank is not None else 0.0
            noise += q4_noise_energy(weight)
            energy += float(singular.square().sum())
        noise_rows.append(f"| {kind} | {removed / energy:.3f} | {noise / energy:.4f} | {removed / noise:.1f} |")

    header = "| {} | matrices | uniform: kept | uniform: predicted Δloss (share) | global: kept | global: dense matrices | global: predicted Δloss (share) |"
    separator = "|---|---|---|---|---|---|---|"
    text = f"""# Where the loss goes: uniform vs `global` ranks on {model_name} at ratio {args.ratio}

`{" ".join(["python benchmarks/why_allocation.py", *sys.argv[1:]])}` — {machine_line()}.
Calibration: {args.num_samples} × 256 tokens of `pycode-calib.txt` with gradients. Predicted Δloss: the
`fisher-whiten` second-order loss increase in nats per token (½ Σ of the dropped σ² of
diag(√f)·W·C^½ per token), summed over matrices as the `global` allocator sums it (it ignores
interactions between layers). *kept*: stored parameters / dense parameters. Both plans store the
same number of parameters.

Total predicted Δloss: uniform **{total['uniform']:.4f}**, global **{total['global']:.4f}** nats/token.
Inputs (shared by q/k/v and by gate/up) whose XᵀX needed damping: {damped} of {len(inputs)}.

## Per layer kind

{header.format("kind")}
{separator}
{chr(10).join(group_rows(kinds))}

## Per depth

{header.format("depth")}
{separator}
{chr(10).join(group_rows(depths))}

## The {args.top} matrices with the largest predicted loss under uniform ranks

| matrix | shape | uniform rank | uniform Δloss (share) | global rank | global Δloss |
|---|---|---|---|---|---|
{chr(10).join(worst_rows)}

## Energy removed from W by uniform ranks vs the Q4_1 rounding noise in the weights

| kind | removed / ‖W‖² | Q4_1 noise / ‖W‖² (estimated) | removed / noise |
|---|---|---|---|
{chr(10).join(noise_rows)}
"""
    write_markdown(f"why_allocation-{model_name}", text)


if __name__ == "__main__":
    main()
