"""``lowrank compress``: calibrate → allocate → factorize → save, in one command."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import TrustRemoteCode, check_device, check_patterns, check_positive, check_ratio, format_table, input_model
from .main import app

log = logging.getLogger("lowrank")


@app.command()
def compress(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json + weights).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the compressed model.", show_default=False)],
    method: Annotated[str, typer.Option(help="Factorization method: svd (data-free) or whiten (needs --calib); see `lowrank methods`.")] = "whiten",
    ratio: Annotated[float, typer.Option(help="Fraction of the targeted layers' weight parameters to remove, in [0, 1).")] = 0.3,
    calib: Annotated[Path | None, typer.Option(help="UTF-8 text file to calibrate on (required by data-aware methods).")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the calibration window sampling.")] = 0,
    allocate: Annotated[
        str,
        typer.Option(
            "--allocate",
            help="Rank allocation: uniform, energy, welore (data-free), global (least predicted loss; adds a backward pass to calibration) or sensitivity (least measured loss; forward passes per layer, needs --calib).",
        ),
    ] = "uniform",
    include: Annotated[
        list[str] | None, typer.Option(help="Regex of layer names to compress (repeatable); default: all linear layers in the blocks.")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names to keep dense (repeatable).")] = None,
    elastic: Annotated[
        bool,
        typer.Option(
            help="Save every layer at its largest useful rank, ordered so `lowrank resize` / `lowrank.load(dir, ratio=...)` can pick any size later (--ratio is then ignored; --allocate uniform or global)."
        ),
    ] = False,
    sequential: Annotated[
        bool,
        typer.Option(
            help="Compress block by block, refitting every layer in closed form to the dense layer's output from the compressed inputs (needs --calib)."
        ),
    ] = False,
    option: Annotated[list[str] | None, typer.Option("--option", help="Method option KEY=VALUE (repeatable), e.g. --option damp=0.01.")] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Device for calibration and factorization (cpu, cuda; on cuda methods factor in float32 unless --option precision=float64)."
        ),
    ] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="dtype of the saved weights (float32, bfloat16, float16); default: the checkpoint's.")] = None,
    blockwise: Annotated[
        bool,
        typer.Option(
            help="Read, calibrate, compress and write one block at a time from the safetensors shards, for models larger than memory (--allocate uniform)."
        ),
    ] = False,
    propagate: Annotated[
        str,
        typer.Option(
            help="With --blockwise: calibrate each block on the outputs of the 'dense' blocks before it (as all-at-once calibration does), or of the 'compressed' ones."
        ),
    ] = "dense",
    resume: Annotated[
        bool, typer.Option(help="With --blockwise: continue an interrupted run from the block after the last one it finished.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Compress a model to a target size and save it (loads with `lowrank.load`)."""
    import lowrank
    from lowrank.allocation import elastic_plan, strategy_names, strategy_needs_batches, strategy_needs_gradients
    from lowrank.calibration import calibration_batches, read_text
    from lowrank.configs import parse_overrides
    from lowrank.io import check_output
    from lowrank.models import DTYPES, load_pretrained, load_tokenizer

    # Cheap checks first, so a typo fails in a second rather than after calibration.
    check_ratio(ratio)
    check_positive(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
    check_patterns(include=include, exclude=exclude)
    check_device(device)
    if propagate != "dense" and not blockwise:
        raise LowrankError("--propagate chooses what --blockwise calibrates on; add --blockwise or drop --propagate")
    model_dir = input_model(model_dir, trust_remote_code)
    check_output(out, [model_dir] + ([calib] if calib is not None else []), overwrite)
    spec = lowrank.get_method(method)
    options = list(option or [])
    if (
        device.startswith("cuda")
        and "precision" in {f.name for f in dataclasses.fields(spec.config_class)}
        and not any(o.startswith("precision=") for o in options)
    ):
        options.append("precision=float32")  # float64 is slow on GPUs; float32 SVD of a whitened matrix is accurate enough
    config = parse_overrides(spec.config_class, options)
    if dtype is not None and dtype not in DTYPES:
        raise LowrankError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if allocate not in strategy_names():
        raise LowrankError(f"unknown allocation strategy {allocate!r}; choose one of: {', '.join(strategy_names())}")
    gradients = spec.needs_gradients or strategy_needs_gradients(allocate)
    sequential = sequential or spec.sequential
    text = read_text(calib) if calib is not None else None
    if (spec.needs_statistics or gradients or sequential or strategy_needs_batches(allocate)) and text is None:
        raise LowrankError(f"method {method!r} with --allocate {allocate} needs calibration data; pass --calib FILE (a UTF-8 text file)")

    if blockwise:
        _compress_blockwise(model_dir, out, ratio, method, config, text, allocate, elastic, sequential, num_samples, seq_len, seed, batch_size,
                            include, exclude, propagate, device, dtype, resume, overwrite, trust_remote_code)  # fmt: skip
        return
    if resume:
        raise LowrankError("--resume continues a --blockwise run; add --blockwise")

    model = load_pretrained(model_dir, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    targets = lowrank.find_targets(model, include=include, exclude=exclude)
    stats = None
    if text is not None:
        if tokenizer is None:
            raise LowrankError(f"{model_dir} has no tokenizer files; calibration needs the model's tokenizer")
        stats = lowrank.calibrate(
            model, tokenizer, text, num_samples=num_samples, seq_len=seq_len, seed=seed, targets=targets, batch_size=batch_size, gradients=gradients
        )
    if elastic:
        plan = elastic_plan(model, method=method, stats=stats, strategy=allocate, include=include, exclude=exclude)
    else:
        allocation_batches = (
            calibration_batches(tokenizer, text, num_samples, seq_len, seed, batch_size) if strategy_needs_batches(allocate) and text else None
        )
        plan = lowrank.allocate(
            model, ratio, method=method, stats=stats, strategy=allocate, include=include, exclude=exclude, batches=allocation_batches
        )
    batches = calibration_batches(tokenizer, text, num_samples, seq_len, seed, batch_size) if sequential else None
    report = lowrank.compress_(model, plan, method=method, stats=stats, config=config, sequential=batches)
    if dtype is not None:
        model.to(DTYPES[dtype])
    lowrank.save(model, out, tokenizer=tokenizer, overwrite=overwrite)

    _print_summary(report, out)


def _compress_blockwise(model_dir, out, ratio, method, config, text, allocate, elastic, sequential, num_samples, seq_len, seed, batch_size,
                        include, exclude, propagate, device, dtype, resume, overwrite, trust_remote_code) -> None:  # fmt: skip
    from lowrank.blockwise import compress_blockwise
    from lowrank.calibration import calibration_batches
    from lowrank.models import load_tokenizer

    if allocate != "uniform" or elastic or sequential:
        raise LowrankError("--blockwise compresses with --allocate uniform, without --elastic or --sequential; drop those options or --blockwise")
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    batches = None
    if text is not None:
        if tokenizer is None:
            raise LowrankError(f"{model_dir} has no tokenizer files; calibration needs the model's tokenizer")
        batches = calibration_batches(tokenizer, text, num_samples, seq_len, seed, batch_size)
    report = compress_blockwise(
        model_dir, out, ratio, method=method, config=config, batches=batches, include=include, exclude=exclude,
        propagate=propagate, device=device, dtype=dtype, tokenizer=tokenizer, resume=resume, overwrite=overwrite,
    )  # fmt: skip
    _print_summary(report, out)


def _print_summary(report, out) -> None:
    counts = report.parameters
    rows = [
        [
            "targeted layers",
            f"{counts['targeted_before']:,}",
            f"{counts['targeted_after']:,}",
            f"{1 - counts['targeted_after'] / counts['targeted_before']:.1%}",
        ],
        [
            "targeted storage (MB)",
            f"{counts['targeted_bits_before'] / 8 / 2**20:.2f}",
            f"{counts['targeted_bits_after'] / 8 / 2**20:.2f}",
            f"{1 - counts['targeted_bits_after'] / counts['targeted_bits_before']:.1%}",
        ],
        ["whole model", f"{counts['model_before']:,}", f"{counts['model_after']:,}", f"{1 - counts['model_after'] / counts['model_before']:.1%}"],
    ]
    print(format_table(["parameters", "before", "after", "removed"], rows))
    plan = report.plan
    print(f"{len(plan.ranks)} of {len(plan.shapes)} targeted layers factored with {report.method}; saved to {out}")


@app.command()
def methods() -> None:
    """List the factorization methods and their options."""
    import dataclasses

    import lowrank

    rows = []
    for name in lowrank.method_names():
        spec = lowrank.get_method(name)
        options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(spec.config_class) if f.name != "version")
        rows.append([name, spec.description, options or "-"])
    print(format_table(["method", "what it does", "options (--option KEY=VALUE)"], rows))
