"""``lowrank plan``: show the rank allocation for a budget without compressing anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import format_table
from .main import app


@app.command()
def plan(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory.", show_default=False)],
    ratio: Annotated[float, typer.Option(help="Fraction of the targeted layers' weight parameters to remove, in [0, 1).")] = 0.3,
    allocate: Annotated[str, typer.Option("--allocate", help="Strategy: uniform, energy, welore or global.")] = "uniform",
    method: Annotated[str, typer.Option(help="Method the plan is for (global predicts its errors).")] = "whiten",
    calib: Annotated[Path | None, typer.Option(help="Calibration text (needed by global; energy whitens with it; gives predicted errors).")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the calibration window sampling.")] = 0,
    include: Annotated[list[str] | None, typer.Option(help="Regex of layer names to compress (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names to keep dense (repeatable).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON.")] = None,
) -> None:
    """Print the rank of every targeted layer under a global budget, and the predicted error."""
    import lowrank
    from lowrank.allocation import strategy_needs_gradients
    from lowrank.calibration import read_text
    from lowrank.models import load_pretrained, load_tokenizer

    if not 0.0 <= ratio < 1.0:
        raise LowrankError(f"--ratio must be in [0, 1), got {ratio}")
    if strategy_needs_gradients(allocate) and calib is None:
        raise LowrankError(f"--allocate {allocate} needs calibration data; pass --calib FILE")
    model = load_pretrained(model_dir)
    stats = None
    if calib is not None:
        targets = lowrank.find_targets(model, include=include, exclude=exclude)
        stats = lowrank.calibrate(
            model, load_tokenizer(model_dir), read_text(calib), num_samples=num_samples, seq_len=seq_len, seed=seed, targets=targets, gradients=True
        )
    result = lowrank.allocate(model, ratio, method=method, stats=stats, strategy=allocate, include=include, exclude=exclude)
    rows = []
    for name, (out, inp) in result.shapes.items():
        rank = result.ranks.get(name)
        rows.append([name, f"{out}×{inp}", rank if rank is not None else "dense", f"{(rank * (out + inp) if rank else out * inp):,}"])
    print(format_table(["layer", "shape", "rank", "parameters"], rows))
    error = f"; predicted loss increase {result.predicted_error:.4f} nats/token" if result.predicted_error is not None else ""
    print(f"{allocate}: {result.planned_parameters:,} of {result.dense_parameters:,} parameters kept ({result.achieved_ratio:.1%} removed){error}")
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
