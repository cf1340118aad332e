"""``lowrank compensate``: quantize or prune a model, then add low-rank corrections of the error (EoRA)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import Overwrite, TrustRemoteCode, check_patterns, check_positive, format_table, input_model
from .main import app

log = logging.getLogger("lowrank")


@app.command()
def compensate(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json + weights).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (loads with `lowrank.load`).", show_default=False)],
    calib: Annotated[Path, typer.Option(help="UTF-8 text file to calibrate on (XᵀX for GPTQ, Wanda and the correction).", show_default=False)],
    base: Annotated[
        str,
        typer.Option(
            help="Base compressor: rtn:BITS or gptq:BITS (group quantization, BITS 2..8), magnitude:S or wanda:S (unstructured pruning of a "
            "fraction S of each row), magnitude:N:M or wanda:N:M (e.g. 2:4)."
        ),
    ] = "gptq:4",
    rank: Annotated[int | None, typer.Option(help="Correction rank of every layer.", show_default=False)] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            help="Extra storage for all corrections as a fraction of the base's stored bits (e.g. 0.05), spread over layers by predicted loss (adds a backward pass to calibration).",
            show_default=False,
        ),
    ] = None,
    group_size: Annotated[int, typer.Option(help="Input columns sharing one quantization scale and zero point.")] = 64,
    iterations: Annotated[
        int,
        typer.Option(help="Alternations after the first correction: re-compress W − L with the base, refit L (LQ-LoRA); the best pair is kept."),
    ] = 0,
    lowrank_first: Annotated[
        bool,
        typer.Option(
            help="Also try the other order (SVDQuant's): fit L to W first, compress only W − L, refit L; the better order per layer is kept (about twice the time)."
        ),
    ] = False,
    factor_bits: Annotated[
        int | None,
        typer.Option(
            help="Store the correction's factors group-quantized at this many bits (2..8; EoRA uses 4) instead of in the model dtype: "
            "a --budget then buys about 3.7x the rank of bfloat16 factors at 4 bits in groups of 64. Quantized bases only. Default: factors in the model dtype.",
            show_default=False,
        ),
    ] = None,
    factor_group_size: Annotated[
        int | None,
        typer.Option(help="Values of one factor row sharing a scale and zero point (with --factor-bits); default: --group-size.", show_default=False),
    ] = None,
    fisher_weighted: Annotated[
        bool,
        typer.Option(
            help="Fit each correction to the layer's loss (output error weighted by the output Fisher of the calibration gradients) "
            "instead of its plain output error; adds a backward pass to calibration. Never keeps a correction that raises the plain output error."
        ),
    ] = False,
    bit_choices: Annotated[
        str,
        typer.Option(
            help="With --budget: base bit widths the allocator may also give a layer (e.g. 4, or 2,4 with --base rtn:3), chosen with the "
            "correction ranks; a wider base's extra bits come out of the same budget. Quantized bases only. Default: the base's width everywhere."
        ),
    ] = "",
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the calibration window sampling.")] = 0,
    include: Annotated[
        list[str] | None, typer.Option(help="Regex of layer names to compress (repeatable); default: all linear layers in the blocks.")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names to keep dense (repeatable).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="dtype of the saved weights and corrections (float32, bfloat16, float16); default: the checkpoint's.")
    ] = None,
    peft_export: Annotated[
        bool,
        typer.Option(
            "--peft",
            help="Also write OUT/peft/base (the base, dequantized, as a plain Hugging Face model) and OUT/peft/adapter (the corrections as a PEFT LoRA adapter).",
        ),
    ] = False,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Quantize (GPTQ / RTN) or prune (magnitude / Wanda) every targeted layer, then add the rank-r correction that minimizes its calibration output error."""
    import lowrank
    from lowrank.calibration import read_text
    from lowrank.compensate import CompensateConfig, compensate_
    from lowrank.compensate.export import export_peft_compensation
    from lowrank.compensate.pipeline import split_bits
    from lowrank.compress import cast_
    from lowrank.io.paths import atomic_directory, check_output
    from lowrank.models import DTYPES, load_pretrained, load_tokenizer

    if (rank is None) == (budget is None):
        raise LowrankError("give either --rank R (the same correction rank everywhere) or --budget B (extra storage, e.g. 0.05), not both")
    check_positive(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, group_size=group_size)
    if iterations < 0:
        raise LowrankError(f"--iterations must be 0 or more, got {iterations}")
    check_patterns(include=include, exclude=exclude)
    if dtype is not None and dtype not in DTYPES:
        raise LowrankError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = CompensateConfig(
        base=base, group_size=group_size, iterations=iterations, lowrank_first=lowrank_first, factor_bits=factor_bits,
        factor_group_size=factor_group_size, fisher_weighted=fisher_weighted, bit_choices=bit_choices,
    )  # fmt: skip
    if rank is not None and rank < 1:
        raise LowrankError(f"--rank must be at least 1, got {rank}")
    if rank is not None and len(config.choices) > 1:
        raise LowrankError("--bit-choices are chosen with an extra-storage --budget; pass --budget instead of --rank, or drop --bit-choices")
    if budget is not None and not budget > 0:
        raise LowrankError(f"--budget must be a positive fraction of the base's storage (e.g. 0.05), got {budget}")
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    check_output(out, [source, model_dir, calib], overwrite)
    text = read_text(calib)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LowrankError(f"{model_dir} has no tokenizer files; calibration needs the model's tokenizer")
    model = load_pretrained(model_dir, trust_remote_code=trust_remote_code)
    targets = lowrank.find_targets(model, include=include, exclude=exclude)
    stats = lowrank.calibrate(
        model, tokenizer, text, num_samples=num_samples, seq_len=seq_len, seed=seed, targets=targets, batch_size=batch_size,
        gradients=budget is not None or fisher_weighted, weight_gradients=False,  # the budget and the weighting read only output gradients
    )  # fmt: skip
    report = compensate_(model, stats, config, rank=rank, budget=budget, include=include, exclude=exclude)
    if dtype is not None:
        cast_(model, DTYPES[dtype], report.parameters, report.plan.shapes)
        parts = [split_bits(model.get_submodule(name)) for name in report.plan.ranks]
        report.parameters.update(base_bits=sum(part[0] for part in parts), correction_bits=sum(part[1] for part in parts))
    with atomic_directory(out, overwrite, inputs=[source, model_dir, calib]) as temporary:
        lowrank.save(model, temporary, report=report, tokenizer=tokenizer, overwrite=True)
        if peft_export:
            export_peft_compensation(model, temporary / "peft", tokenizer=tokenizer)
    _print_summary(report, out, peft_export)


def _print_summary(report, out: Path, peft_export: bool) -> None:
    counts = report.parameters
    dense, base_bits, correction_bits = counts["targeted_bits_before"], counts["base_bits"], counts["correction_bits"]
    megabytes = lambda bits: f"{bits / 8 / 2**20:.2f}"
    rows = [
        ["dense", megabytes(dense), f"{dense / counts['targeted_before']:.2f}", "-"],
        ["base", megabytes(base_bits), f"{base_bits / counts['targeted_before']:.2f}", "-"],
        [
            "base + correction",
            megabytes(base_bits + correction_bits),
            f"{(base_bits + correction_bits) / counts['targeted_before']:.2f}",
            f"{correction_bits / base_bits:.2%}",
        ],
    ]
    print(format_table(["targeted layers", "storage (MB)", "bits per weight", "extra over base"], rows))
    ranks = sorted(report.plan.ranks.values())
    print(
        f"{len(ranks)} layers: {report.method_config['base']} + correction of rank {ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]}); saved to {out}"
        + (f" (PEFT export in {out / 'peft'})" if peft_export else "")
    )
