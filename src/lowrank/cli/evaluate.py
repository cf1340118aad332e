"""``lowrank eval``: perplexity, size and speed of a saved (compressed or dense) model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import TrustRemoteCode, check_device, check_positive, format_table, input_model, megabytes
from .main import app


def evaluate_directory(
    model_dir: Path,
    data: Path | None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    speed: bool = True,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> dict:
    """Measure a saved model: parameters, bytes on disk, perplexity on ``data``, generation speed."""
    import lowrank
    from lowrank.calibration import read_text
    from lowrank.io import read_lowrank_config
    from lowrank.models import load_tokenizer

    text = read_text(data) if data is not None else None
    model = lowrank.load(model_dir, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    meta = read_lowrank_config(model_dir)
    result = {
        "model": str(model_dir),
        "method": meta["method"] if meta else "dense",
        "ratio": meta["ratio"] if meta else 0.0,
        "parameters": lowrank.count_parameters(model),
        "disk_bytes": lowrank.disk_size(model_dir),
    }
    if text is not None or speed:
        if tokenizer is None:
            raise LowrankError(f"{model_dir} has no tokenizer files; perplexity and speed need the model's tokenizer")
        if not hasattr(model, "generate") or not model.can_generate():
            raise LowrankError(f"{model_dir} is not a causal language model; perplexity and generation speed need one")
    if text is not None:
        result["perplexity"] = lowrank.perplexity(model, tokenizer, text, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows)
        result["data"] = str(data)
    if speed:
        result["tokens_per_second"] = lowrank.generation_speed(model, tokenizer)
    return result


@app.command(name="eval")
def evaluate(
    model_dirs: Annotated[list[Path], typer.Argument(help="One or more model directories (compressed or dense), measured side by side.", show_default=False)],
    data: Annotated[Path | None, typer.Option(help="UTF-8 text file for perplexity (non-overlapping windows, token-weighted).")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows (quick checks).")] = None,
    speed: Annotated[bool, typer.Option(help="Measure generation speed (tokens/s, batch 1, greedy, 64 new tokens).")] = True,
    device: Annotated[str, typer.Option(help="Device to evaluate on.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the --json file if it exists.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Measure perplexity, parameters, size on disk and generation speed; print a table."""
    from lowrank.io import check_output
    from lowrank.io.paths import write_text_atomic

    # Every input and the output are checked before the first model is measured.
    check_positive(batch_size=batch_size, max_windows=max_windows)
    if seq_len < 2:
        raise LowrankError(f"--seq-len must be at least 2 (perplexity predicts each token from the ones before it), got {seq_len}")
    check_device(device)
    model_dirs = [input_model(path, trust_remote_code) for path in model_dirs]
    if data is not None and not data.is_file():
        raise LowrankError(f"text file {str(data)!r} does not exist; pass a UTF-8 text file")
    if json_out is not None:
        check_output(json_out, [*model_dirs, *([data] if data is not None else [])], overwrite, kind="file", option="--json")
    results = [evaluate_directory(path, data, seq_len, batch_size, max_windows, speed, device, trust_remote_code) for path in model_dirs]
    headers = ["model", "method", "ratio", "parameters", "size on disk"]
    headers += ["perplexity"] if data is not None else []
    headers += ["tokens/s"] if speed else []
    rows = []
    for result in results:
        row = [result["model"], result["method"], f"{result['ratio']:.2f}", f"{result['parameters']:,}", megabytes(result["disk_bytes"])]
        row += [f"{result['perplexity']:.3f}"] if data is not None else []
        row += [f"{result['tokens_per_second']:.1f}"] if speed else []
        rows.append(row)
    print(format_table(headers, rows))
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")
