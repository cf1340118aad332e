"""``lowrank compress``: calibrate → allocate → factorize → save, in one command."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from .common import Overwrite, TrustRemoteCode, format_table
from .main import app

log = logging.getLogger("lowrank")


@app.command()
def compress(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json + weights).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the compressed model.", show_default=False)],
    method: Annotated[
        str | None,
        typer.Option(
            help="Factorization method, e.g. svd (data-free), whiten or fisher-whiten (need --calib); see `lowrank methods`. "
            "Default: modegpt (factored=fisher-whiten, attention=value, value_metric=o_proj) for causal LMs with gated MLPs in memory, calibrated on at least 64 × 256 tokens; "
            "fisher-whiten for other causal LMs, --blockwise and --elastic runs; whiten for encoders and --blockwise --propagate compressed.",
            show_default=False,
        ),
    ] = None,
    ratio: Annotated[float, typer.Option(help="Fraction of the targeted layers' weight parameters to remove, in [0, 1).")] = 0.3,
    calib: Annotated[Path | None, typer.Option(help="UTF-8 text file to calibrate on (required by data-aware methods).")] = None,
    num_samples: Annotated[
        int | None, typer.Option(help="Calibration windows (--calib-unit window; default 128) or lines (--calib-unit line; default 1024).", show_default=False)
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the calibration window sampling.")] = 0,
    calib_format: Annotated[
        str,
        typer.Option(
            help="plain: calibrate on the text as it is; chat: on the same text rendered as user/assistant turns with the tokenizer's chat template (instruction models)."
        ),
    ] = "plain",
    calib_unit: Annotated[
        str | None,
        typer.Option(
            help="window: random --seq-len windows of the token stream; line: padded batches of --num-samples non-empty lines (padding masked out). Default: line for encoders, window for causal LMs.",
            show_default=False,
        ),
    ] = None,
    allocate: Annotated[
        str | None,
        typer.Option(
            "--allocate",
            help="Rank allocation: uniform, energy, welore (data-free), global (least predicted loss; adds a backward pass to calibration) or sensitivity (least measured loss; forward passes per layer, needs --calib). "
            "Default: global for causal LMs with --calib, uniform otherwise.",
            show_default=False,
        ),
    ] = None,
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
            help="Compress block by block, refitting every layer in closed form to the dense layer's output from the compressed inputs (needs --calib; modegpt refits what its units keep)."
        ),
    ] = False,
    anchor: Annotated[
        float | None,
        typer.Option(
            help="With --sequential: the cross-layer correction. Refit stage by stage (q/k/v, o, gate/up, down) to (1 − α)‖WX − W′X̃‖² + α‖(W − W′)X‖², keeping the one-shot fit where that is better on the calibration text (0.5 measured best; see README)."
        ),
    ] = None,
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
            help="Read, calibrate, compress and write one block at a time from the safetensors shards, for models larger than memory (--allocate uniform or global). "
            "Under `torchrun --nproc-per-node N` the N processes share the work and write the same bytes."
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
    heal_steps: Annotated[
        int,
        typer.Option(
            help="Then heal the output for N steps (`lowrank heal` with its defaults: the input model as teacher, --calib as text); 0: no healing."
        ),
    ] = 0,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Compress a model to a target size and save it (loads with `lowrank.load`)."""
    from lowrank.errors import LowrankError
    from lowrank.job import CompressJob

    if heal_steps < 0 or (heal_steps and (calib is None or blockwise)):
        raise LowrankError("--heal-steps needs a count ≥ 0, --calib (the healing text) and no --blockwise (healing holds the whole model in memory)")

    job = CompressJob(
        model_dir=model_dir, out=out, method=method, ratio=ratio, calib=calib, num_samples=num_samples, seq_len=seq_len,
        batch_size=batch_size, seed=seed, calib_format=calib_format, calib_unit=calib_unit, allocate=allocate, include=include, exclude=exclude, elastic=elastic, sequential=sequential, anchor=anchor,
        options=list(option or []), device=device, dtype=dtype, blockwise=blockwise, propagate=propagate, resume=resume,
        overwrite=overwrite, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    report = job.run()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary (from process 0)
        _print_summary(report, out)
    if heal_steps:
        from .heal import heal_in_place

        heal_in_place(out, model_dir, calib, heal_steps, device=device, trust_remote_code=trust_remote_code)


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

    import lowrank

    rows = []
    for name in lowrank.method_names():
        spec = lowrank.get_method(name)
        options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(spec.config_class) if f.name != "version")
        rows.append([name, spec.description, options or "-"])
    print(format_table(["method", "what it does", "options (--option KEY=VALUE)"], rows))
