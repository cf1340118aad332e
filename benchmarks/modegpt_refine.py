"""Two training-free refinements of the ``modegpt`` recipe, measured on held-out text.

Run: ``python benchmarks/modegpt_refine.py`` (the reference model at ratio 0.6, about 15 minutes on 2
cores). Writes ``benchmarks/results/modegpt-refine.md``. Both refinements target the gap the
one-shot plan leaves, and both are measured here rather than built into the library because neither
pays on this model:

- *Re-planned with measured losses.* ``global`` budgets each unit by its predicted loss increase
  (½·Σ f·error, a second-order estimate at the dense point). At ratio 0.6 the measured loss increase
  of swapping one block's compressed attention or MLP into the dense model is 1–4× the prediction,
  and the ratio differs between blocks and parts. Here every block part's curves are rescaled by
  its measured / predicted ratio (through its output Fisher, which the predicted loss is linear in)
  and the knapsack runs again, twice.
- *Mean correction.* The compressed residual writers (``o_proj``, ``down_proj``) get a bias equal to
  the mean of the dense minus the compressed output on calibration windows, fitted block by block
  in model order (each sees the corrections before it), the empirical bias correction of the
  quantization literature.

Every measurement window is calibration text (``pycode-calib.txt``, seeded offsets); perplexity is
on ``pycode-eval.txt`` (whole file) and the first ``--docs-windows`` windows of ``pydocs-eval.txt``.
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
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.allocation.curves import loss_curves  # noqa: E402
from lowrank.methods.modegpt import ModegptConfig  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402
from lowrank.nn.targets import set_submodule  # noqa: E402


def measurement_batch(tokenizer, text: str, windows: int, seq_len: int, seed: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    starts = torch.randint(0, len(ids) - seq_len - 1, (windows,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[start : start + seq_len] for start in starts])


@torch.no_grad()
def mean_loss(model, batch: torch.Tensor, batch_size: int = 8) -> float:
    losses = [model(batch[i : i + batch_size], labels=batch[i : i + batch_size]).loss.item() for i in range(0, len(batch), batch_size)]
    return sum(losses) / len(losses)


def block_parts(names) -> dict[tuple[int, str], list[str]]:
    """{(block, "attention" | "mlp"): its targeted layers}."""
    parts: dict[tuple[int, str], list[str]] = {}
    for name in names:
        block = int(name.split(".layers.")[1].split(".")[0])
        parts.setdefault((block, "attention" if ".self_attn." in name else "mlp"), []).append(name)
    return parts


def predicted_by_part(model, plan, stats) -> dict[tuple[int, str], float]:
    """The plan's predicted loss increase per block part: its units' and its factored layers'."""
    details = plan.details["modegpt"]
    covered = {member for section in ("units", "attention") for entry in details[section].values() for member in entry["members"]}
    loose = [name for name in plan.shapes if name not in covered and plan.ranks.get(name) is not None]
    curves = loss_curves(model, loose, stats, "fisher-whiten") if loose else {}
    predicted: dict[tuple[int, str], float] = {}
    for key, names in block_parts(plan.shapes).items():
        total = 0.0
        for name in names:
            if name in curves:
                gains = curves[name].double()
                total += gains[plan.ranks[name] :].sum().item()
        for section in ("units", "attention"):
            for entry in details[section].values():
                if entry["members"][0] in names:
                    total += entry["predicted_error"] if entry["structure"] == "modegpt" else entry["factored_predicted_error"]
        predicted[key] = total
    return predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--replans", type=int, default=2)
    parser.add_argument("--measure-windows", type=int, default=64, help="calibration windows the refinements measure on")
    parser.add_argument("--docs-windows", type=int, default=50)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    require_shared()
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("modegpt-refine" if args.model == "reference" else f"modegpt-refine-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    eval_text, docs_text, calib_text = EVAL.read_text(), DOCS.read_text(), CALIB.read_text()
    dense = load_pretrained(model_dir)
    stats = lowrank.calibrate(dense, tokenizer, calib_text, gradients=True, seed=args.seed, num_samples=args.num_samples, seq_len=256, progress=False)
    config = ModegptConfig(factored="fisher-whiten", attention="value", value_metric="o_proj")
    batch = measurement_batch(tokenizer, calib_text, args.measure_windows, 256, seed=1000 + args.seed)
    dense_loss = mean_loss(dense, batch)

    def build(statistics):
        plan = lowrank.allocate(dense, args.ratio, method="modegpt", stats=statistics, strategy="global", method_config=config)
        model = load_pretrained(model_dir)
        lowrank.compress_(model, plan, method="modegpt", stats=statistics, config=config, progress=False)
        return plan, model

    def perplexities(model) -> tuple[float, float]:
        return (
            lowrank.perplexity(model, tokenizer, eval_text, progress=False),
            lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False),
        )

    rows = []

    def row(variant: str, model, seconds: float, note: str) -> None:
        code, docs = perplexities(model)
        rows.append([variant, f"{mean_loss(model, batch) - dense_loss:.4f}", f"{code:.2f}", f"{docs:.2f}", f"{seconds:.0f}", note])
        print(" | ".join(rows[-1]), flush=True)

    start = time.perf_counter()
    plan, one_shot = build(stats)
    row("one-shot", one_shot, time.perf_counter() - start, "")

    # Re-planned: each block part's output Fisher scaled by measured / predicted, then the knapsack again.
    scaled = copy.deepcopy(stats)
    current_plan, current = plan, one_shot
    start = time.perf_counter()
    for replan in range(1, args.replans + 1):
        predicted = predicted_by_part(dense, current_plan, scaled)
        scales = []
        for key, names in block_parts(current_plan.shapes).items():
            swapped = copy.deepcopy(dense)
            for name in names:
                set_submodule(swapped, name, copy.deepcopy(current.get_submodule(name)))
            measured = mean_loss(swapped, batch) - dense_loss
            scale = max(measured, 1e-6) / max(predicted[key], 1e-9)
            scales.append(scale)
            for name in names:
                scaled[name].output_grad_sq = scaled[name].output_grad_sq * scale
        current_plan, current = build(scaled)
        mlp = [entry["neurons"] for entry in current_plan.details["modegpt"]["units"].values()]
        row(f"re-planned ×{replan}", current, time.perf_counter() - start,
            f"measured / predicted {min(scales):.2f}–{max(scales):.2f}; MLP neurons {'/'.join(map(str, mlp))}")  # fmt: skip

    # Mean correction of the residual writers, block by block.
    start = time.perf_counter()
    writers = [name for name in plan.shapes if name.endswith(("o_proj", "down_proj"))]
    corrected, biases = copy.deepcopy(one_shot), {}

    @torch.no_grad()
    def output_means(model, names: list[str]) -> dict[str, torch.Tensor]:
        """Each named layer's mean output over the measurement windows, from one pass."""
        totals: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        handles = [
            model.get_submodule(name).register_forward_hook(lambda module, inputs, out, name=name: totals[name].append(out.double().sum(dim=(0, 1))))
            for name in names
        ]
        for i in range(0, len(batch), 8):
            model(batch[i : i + 8])
        for handle in handles:
            handle.remove()
        return {name: torch.stack(total).sum(0) / batch.numel() for name, total in totals.items()}

    for name in writers:
        corrected.get_submodule(name).register_forward_hook(lambda module, inputs, out, name=name: out + biases[name] if name in biases else out)
    dense_means = output_means(dense, writers)  # the dense outputs do not change: one pass; the corrected ones do, one pass per writer
    for name in writers:
        biases[name] = (dense_means[name] - output_means(corrected, [name])[name]).to(next(dense.parameters()).dtype)
    norms = [bias.norm().item() for bias in biases.values()]
    row("mean-corrected", corrected, time.perf_counter() - start, f"bias norms {min(norms):.3f}–{max(norms):.3f} ({len(norms)} writers)")

    dense_code, dense_docs = perplexities(dense)
    header = ["variant", "calibration Δloss", "pycode ppl", "pydocs ppl", "s", "notes"]
    text = "\n".join(
        [
            f"# Training-free refinements of modegpt on {model_name} at ratio {args.ratio:g}",
            "",
            f"Command: `python benchmarks/modegpt_refine.py {' '.join(sys.argv[1:])}`. Machine: {machine_line()}.",
            f"Recipe: modegpt + global (factored=fisher-whiten, attention=value, value_metric=o_proj), {args.num_samples} × 256-token"
            f" calibration windows of `pycode-calib.txt`, seed {args.seed}. Dense: **{dense_code:.2f}** on `pycode-eval.txt` (whole file),"
            f" **{dense_docs:.2f}** on the first {args.docs_windows} windows of `pydocs-eval.txt`.",
            f"*calibration Δloss*: mean token loss minus the dense model's on {args.measure_windows} × 256-token windows of"
            " `pycode-calib.txt` at other seeded offsets (what both refinements measure on); *s*: the refinement's wall time"
            " (the one-shot row: allocation and compression; the re-planned rows: from the first re-plan on).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    )
    write_markdown(output, text + "\n")


if __name__ == "__main__":
    main()
