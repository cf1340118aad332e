"""``lowrank analyze`` (spectral diagnosis of a model) and ``lowrank diff`` (a fine-tuned model against its base)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import Overwrite, TrustRemoteCode, check_device, check_patterns, check_positive, input_model
from .main import app

# Columns printed to the terminal; the files written with --out hold all of them.
ANALYZE_COLUMNS = ["name", "out_features", "in_features", "stable_rank", "effective_rank", "rank_90", "rank_99", "alpha", "alpha_debiased", "welore_rank", "welore_low_rank"]
CALIBRATED_COLUMNS = ["whitened_effective_rank", "relative_output_error_0.2", "relative_output_error_0.4", "relative_output_error_0.6"]
DIFF_COLUMNS = ["name", "relative_delta", "delta_spectral_norm", "delta_stable_rank", "delta_effective_rank", "delta_rank_90", "intruders", "min_similarity"]


def print_table(table, columns: list[str]) -> None:
    print(table[[column for column in columns if column in table]].to_string(index=False, float_format=lambda value: f"{value:.4g}"))


@app.command()
def analyze(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json + weights).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for analysis.csv, analysis.json, PNG figures and report.html; default: print the table only.")] = None,
    calib: Annotated[Path | None, typer.Option(help="UTF-8 text file to calibrate on: adds whitened ranks and predicted output errors at ratios 0.2/0.4/0.6.")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows (with --calib).")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window (with --calib).")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass (with --calib).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the calibration window sampling.")] = 0,
    reduction: Annotated[float, typer.Option(help="Parameter reduction, in [0, 1), at which WeLore splits low-rank components from the rest.")] = 0.3,
    aspect_ratio: Annotated[float, typer.Option(help="Long/short side (≥ 1) of the submatrices whose averaged spectrum gives alpha_debiased.")] = 1.0,
    embeddings: Annotated[bool, typer.Option(help="Also analyze the input embedding and an untied output head.")] = False,
    include: Annotated[list[str] | None, typer.Option(help="Regex of layer names to analyze (repeatable); default: all linear layers in the blocks.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names to skip (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="Device for calibration and decompositions (cpu, cuda).")] = "cpu",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Spectral diagnosis of every weight matrix: norms, stable/effective ranks, heavy-tail alpha, WeLore split."""
    import lowrank
    from lowrank.analysis import analyze as analyze_model
    from lowrank.analysis import summary, write_report
    from lowrank.calibration import read_text
    from lowrank.io import atomic_directory, check_output
    from lowrank.models import load_pretrained, load_tokenizer

    # Cheap checks first, so a typo fails in a second rather than after calibration.
    if not 0.0 <= reduction < 1.0:
        raise LowrankError(f"--reduction must be in [0, 1), got {reduction}; e.g. 0.3 removes 30 % of the parameters")
    if not 1.0 <= aspect_ratio < float("inf"):
        raise LowrankError(f"--aspect-ratio must be ≥ 1 (long side / short side), got {aspect_ratio}")
    check_positive(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
    check_patterns(include=include, exclude=exclude)
    check_device(device)
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    inputs = [source, model_dir] + ([calib] if calib is not None else [])
    if out is not None:
        check_output(out, inputs, overwrite)
    text = read_text(calib) if calib is not None else None

    model = load_pretrained(model_dir, device=device, trust_remote_code=trust_remote_code)
    stats = None
    if text is not None:
        tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise LowrankError(f"{model_dir} has no tokenizer files; calibration needs the model's tokenizer")
        targets = lowrank.find_targets(model, include=include, exclude=exclude)
        stats = lowrank.calibrate(model, tokenizer, text, num_samples=num_samples, seq_len=seq_len, seed=seed, targets=targets, batch_size=batch_size)
    table = analyze_model(model, stats=stats, include=include, exclude=exclude, embeddings=embeddings, reduction=reduction, aspect_ratio=aspect_ratio)

    print_table(table, ANALYZE_COLUMNS + (CALIBRATED_COLUMNS if stats is not None else []))
    print(json.dumps({key: round(value, 4) for key, value in summary(table).items()}))
    if out is not None:
        with atomic_directory(out, overwrite, inputs) as temporary:
            write_report(table, temporary, title=f"lowrank analysis of {model_dir.name}")
        print(f"wrote {out / 'report.html'} (+ analysis.csv, analysis.json, figures)")


@app.command()
def diff(
    base_dir: Annotated[Path, typer.Argument(help="Base model directory (before fine-tuning).", show_default=False)],
    tuned_dir: Annotated[Path, typer.Argument(help="Fine-tuned model directory (same architecture; a lowrank-compressed model is multiplied out).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for diff.csv and diff.json; default: print the table only.")] = None,
    top_k: Annotated[int, typer.Option(help="Leading singular vectors of each tuned matrix checked for intruders.")] = 10,
    threshold: Annotated[float, typer.Option(help="A tuned singular vector whose best |cosine| with every base singular vector is below this is an intruder.")] = 0.5,
    include: Annotated[list[str] | None, typer.Option(help="Regex of layer names to compare (repeatable); default: all linear layers in the blocks.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names to skip (repeatable).")] = None,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """What fine-tuning changed: spectrum and rank of each ΔW, and intruder dimensions per matrix."""
    import lowrank
    from lowrank.analysis import diff as diff_models
    from lowrank.analysis.report import plain_table
    from lowrank.io import atomic_directory, check_output
    from lowrank.models import load_pretrained

    if top_k < 1:
        raise LowrankError(f"--top-k must be at least 1, got {top_k}")
    if not 0.0 < threshold <= 1.0:
        raise LowrankError(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    if not threshold <= 1.0:  # NaN too
        raise LowrankError(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    check_patterns(include=include, exclude=exclude)
    inputs = [base_dir, tuned_dir]
    base_dir, tuned_dir = input_model(base_dir, trust_remote_code), input_model(tuned_dir, trust_remote_code)
    inputs += [base_dir, tuned_dir]
    if out is not None:
        check_output(out, inputs, overwrite)
    base = load_pretrained(base_dir, trust_remote_code=trust_remote_code)
    tuned = lowrank.load(tuned_dir, trust_remote_code=trust_remote_code)
    table = diff_models(base, tuned, include=include, exclude=exclude, top_k=top_k, threshold=threshold)

    print_table(table, DIFF_COLUMNS)
    print(f"{int(table['intruders'].sum())} intruder dimensions in {int((table['intruders'] > 0).sum())} of {len(table)} matrices; "
          f"mean relative change {table['relative_delta'].mean():.4g}")
    if out is not None:
        rows = plain_table(table.drop(columns=["delta_singular_values"]))
        with atomic_directory(out, overwrite, inputs) as temporary:
            rows.to_csv(temporary / "diff.csv", index=False)
            (temporary / "diff.json").write_text(rows.to_json(orient="records", indent=1) + "\n")
        print(f"wrote {out / 'diff.csv'} and {out / 'diff.json'}")
