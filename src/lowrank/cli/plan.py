"""``lowrank plan``: show the rank allocation for a budget without compressing anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import TrustRemoteCode, check_patterns, check_positive, check_ratio, format_table, input_model
from .main import app


@app.command()
def plan(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory.", show_default=False)],
    ratio: Annotated[float, typer.Option(help="Fraction of the targeted layers' weight parameters to remove, in [0, 1).")] = 0.3,
    allocate: Annotated[
        str,
        typer.Option(
            "--allocate",
            help="Strategy: uniform, energy, welore, global (predicted loss) or sensitivity (measured loss; forward passes per layer).",
        ),
    ] = "uniform",
    method: Annotated[str, typer.Option(help="Method the plan is for (global predicts its errors).")] = "whiten",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Method option KEY=VALUE (repeatable), for methods that plan with their options, e.g. lowrank-quant's bit_choices=2,3,4 or lowrank-sparse's sparse_choices=0,0.25,0.5."),
    ] = None,
    calib: Annotated[
        Path | None, typer.Option(help="Calibration text (needed by global and sensitivity; energy whitens with it; gives predicted errors).")
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows (as `compress`'s default).")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass (sensitivity runs the first 8 batches).")] = 8,
    sensitivity_ratios: Annotated[
        str, typer.Option(help="With --allocate sensitivity: per-layer ratios whose ranks are measured, comma-separated (one forward pass each).")
    ] = "0.2,0.4,0.6,0.8",
    seed: Annotated[int, typer.Option(help="Seed of the calibration window sampling.")] = 0,
    include: Annotated[list[str] | None, typer.Option(help="Regex of layer names to compress (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names to keep dense (repeatable).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the --json file if it exists.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Print the rank of every targeted layer under a global budget, and the predicted error."""
    import lowrank
    from lowrank.allocation import SensitivityConfig, strategy_names, strategy_needs_batches, strategy_needs_gradients
    from lowrank.calibration import calibration_batches, read_text
    from lowrank.io import check_output
    from lowrank.io.paths import write_text_atomic
    from lowrank.methods.registry import output_gram_layers
    from lowrank.models import load_pretrained, load_tokenizer

    check_ratio(ratio)
    check_positive(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
    check_patterns(include=include, exclude=exclude)
    from lowrank.configs import parse_overrides

    spec = lowrank.get_method(method)
    method_config = parse_overrides(spec.config_class, list(option or []))
    if allocate not in strategy_names():
        raise LowrankError(f"unknown allocation strategy {allocate!r}; choose one of: {', '.join(strategy_names())}")
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    if json_out is not None:
        check_output(json_out, [source, model_dir] + ([calib] if calib is not None else []), overwrite, kind="file", option="--json")
    if (strategy_needs_gradients(allocate) or strategy_needs_batches(allocate)) and calib is None:
        raise LowrankError(f"--allocate {allocate} needs calibration data; pass --calib FILE")
    try:
        candidates = tuple(float(value) for value in sensitivity_ratios.split(","))
    except ValueError:
        raise LowrankError(f"--sensitivity-ratios must be comma-separated numbers in (0, 1), got {sensitivity_ratios!r}") from None
    if not all(0.0 < value < 1.0 for value in candidates):
        raise LowrankError(f"--sensitivity-ratios must be comma-separated numbers in (0, 1), got {sensitivity_ratios!r}")
    text = read_text(calib) if calib is not None else None
    model = load_pretrained(model_dir, trust_remote_code=trust_remote_code)
    stats = batches = None
    if text is not None:
        tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise LowrankError(f"{model_dir} has no tokenizer files; calibration needs the model's tokenizer")
        targets = lowrank.find_targets(model, include=include, exclude=exclude)
        stats = lowrank.calibrate(
            model, tokenizer, text, num_samples=num_samples, seq_len=seq_len, seed=seed, targets=targets, batch_size=batch_size, gradients=True,
            weight_gradients=False,  # allocation reads only output gradients
            output_gram=output_gram_layers(spec, model, targets, method_config),
        )
        if strategy_needs_batches(allocate):
            batches = calibration_batches(tokenizer, text, num_samples, seq_len, seed, batch_size)
    config = SensitivityConfig(ratios=candidates) if allocate == "sensitivity" else None
    result = lowrank.allocate(
        model, ratio, method=method, stats=stats, strategy=allocate, include=include, exclude=exclude, batches=batches, strategy_config=config,
        predict_error=True, method_config=method_config,
    )
    measured = result.details.get("sensitivity", {}).get("matrices", {})
    layer_options = result.details.get("layer_options", {})
    header = ["layer", "shape", "rank", "parameters"] + (["options"] if layer_options else [])
    if measured:
        header += ["sensitivity", "Fisher scale", "measured Δloss at rank"]
    rows = []
    for name, (out, inp) in result.shapes.items():
        rank = result.ranks.get(name)
        row = [name, f"{out}×{inp}", rank if rank is not None else "dense", f"{(rank * (out + inp) if rank else out * inp):,}"]
        if layer_options:
            row.append(", ".join(f"{key}={value}" for key, value in layer_options.get(name, {}).items()) or "-")
        if measured:
            item = measured[name]
            fisher = f"{item['fisher_scale']:.3g}" if "fisher_scale" in item else "-"
            points = ", ".join(f"{point_rank}: {increase:+.4f}" for point_rank, _error, increase in item["points"]) or "-"
            used = f"{item['scale']:.3g}" + (f" (fit {item['sensitivity']:.2g}, clamped)" if item["scale"] != item["sensitivity"] else "")
            row += [used, fisher, points]
        rows.append(row)
    print(format_table(header, rows))
    if measured:
        details = result.details["sensitivity"]
        print(
            f"sensitivity: nats/token per unit of per-token whitened error, least squares over the measured points "
            f"(dense loss {details['dense_loss']:.4f} on {details['num_batches']} batches; clamped to ≥ {details['floor']:.3g}); "
            "Fisher scale: what global uses (½ mean output Fisher)"
        )
    error = f"; predicted loss increase {result.predicted_error:.4f} nats/token" if result.predicted_error is not None else ""
    print(f"{allocate}: {result.planned_parameters:,} of {result.dense_parameters:,} parameters kept ({result.achieved_ratio:.1%} removed){error}")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result.to_dict(), indent=2) + "\n")
