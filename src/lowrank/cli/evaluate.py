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
    sentences: list[str] | None = None,
    reference_embeddings=None,
) -> dict:
    """Measure a saved model: parameters, bytes on disk, perplexity on ``data``, generation speed.

    For an encoder (a model that does not generate), ``sentences`` and ``reference_embeddings``
    (the reference model's :func:`lowrank.demo.embed` of them) give ``cosine``: the mean cosine
    between its sentence embeddings and the reference's. An encoder gets no perplexity and no speed.
    """
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
    causal = hasattr(model, "generate") and model.can_generate()
    if sentences is not None:
        if causal:
            raise LowrankError(
                f"{model_dir} is a causal language model; --reference/--sentences compare sentence embeddings of encoders, use --data for its perplexity"
            )
        if tokenizer is None:
            raise LowrankError(f"{model_dir} has no tokenizer files; sentence embeddings need the model's tokenizer")
        from lowrank.demo import embed

        model.to("cpu")
        embeddings = embed(model, tokenizer, sentences)  # (sentences, hidden), L2-normalized
        if embeddings.shape != reference_embeddings.shape:
            raise LowrankError(
                f"{model_dir} embeds into {embeddings.shape[-1]} dimensions and the --reference model into {reference_embeddings.shape[-1]}; pass the model it was compressed from as --reference"
            )
        result["cosine"] = float((embeddings * reference_embeddings).sum(-1).mean())
        result["sentences"] = len(sentences)
    speed = speed and (causal or text is not None)  # an encoder generates nothing: no speed column for it
    if text is not None or speed:
        if tokenizer is None and text is not None:  # speed runs on seeded random token ids
            raise LowrankError(f"{model_dir} has no tokenizer files; perplexity needs the model's tokenizer")
        if not causal:
            raise LowrankError(
                f"{model_dir} is not a causal language model; perplexity needs one (for an encoder, pass --reference DENSE_DIR --sentences FILE)"
            )
    if text is not None:
        result["perplexity"] = lowrank.perplexity(model, tokenizer, text, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows)
        result["data"] = str(data)
    if speed:
        result["causal"] = True  # its speed is measured afterwards, interleaved with the other models'
    return result


@app.command(name="eval")
def evaluate(
    model_dirs: Annotated[
        list[Path], typer.Argument(help="One or more model directories (compressed or dense), measured side by side.", show_default=False)
    ],
    data: Annotated[Path | None, typer.Option(help="UTF-8 text file for perplexity (non-overlapping windows, token-weighted).")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows (quick checks).")] = None,
    speed: Annotated[
        bool,
        typer.Option(
            help="Measure decode and prefill speed of the causal LMs: batch 1, greedy, 64 new tokens / 1 × 512, all models interleaved over --rounds, median [min–max], ratios to the first model."
        ),
    ] = True,
    rounds: Annotated[int, typer.Option(help="Interleaved speed rounds (each times every model once, in rotating order).")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads while timing (1 avoids OpenMP spin-waiting on a busy machine).")] = 1,
    device: Annotated[str, typer.Option(help="Device to evaluate on.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the --json file if it exists.")] = False,
    reference: Annotated[
        Path | None, typer.Option(help="Encoders: the dense model to compare sentence embeddings with (needs --sentences).", show_default=False)
    ] = None,
    sentences: Annotated[
        Path | None,
        typer.Option(
            help="Encoders: a UTF-8 file of sentences, one a line; prints the mean cosine of each model's embeddings to --reference's.",
            show_default=False,
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Measure perplexity, parameters, size on disk and generation speed (causal LMs) or embedding cosine to a reference (encoders); print a table."""
    from lowrank.io import check_output
    from lowrank.io.paths import write_text_atomic

    # Every input and the output are checked before the first model is measured.
    check_positive(batch_size=batch_size, max_windows=max_windows, rounds=rounds, threads=threads)
    if seq_len < 2:
        raise LowrankError(f"--seq-len must be at least 2 (perplexity predicts each token from the ones before it), got {seq_len}")
    check_device(device)
    given = [*model_dirs, *(path for path in (reference,) if path is not None)]
    if json_out is not None:  # first against the paths as given (a .gguf is converted below)
        check_output(json_out, [*given, *(path for path in (data, sentences) if path is not None)], overwrite, kind="file", option="--json")
    model_dirs = [input_model(path, trust_remote_code) for path in model_dirs]
    if data is not None and not data.is_file():
        raise LowrankError(f"text file {str(data)!r} does not exist; pass a UTF-8 text file")
    if (reference is None) != (sentences is None):
        raise LowrankError("--reference DIR and --sentences FILE go together: the dense encoder and the sentences to embed with both models")
    if reference is not None:
        reference = input_model(reference, trust_remote_code)
    sentence_list = _read_sentences(sentences) if sentences is not None else None
    if json_out is not None:
        inputs = [*given, *model_dirs, *(path for path in (data, reference, sentences) if path is not None)]
        check_output(json_out, inputs, overwrite, kind="file", option="--json")
    reference_embeddings = _reference_embeddings(reference, sentence_list, trust_remote_code) if reference is not None else None
    results = [
        evaluate_directory(path, data, seq_len, batch_size, max_windows, speed, device, trust_remote_code, sentence_list, reference_embeddings)
        for path in model_dirs
    ]
    causal = [path for path, result in zip(model_dirs, results) if result.pop("causal", False)]
    speed = bool(causal)
    if speed:
        _measure_speed(causal, results, model_dirs, rounds, threads, device, trust_remote_code)
    headers = ["model", "method", "ratio", "parameters", "size on disk"]
    headers += ["perplexity"] if data is not None else []
    headers += ["decode tok/s", "decode vs first", "prefill tok/s", "prefill vs first"] if speed else []
    headers += ["cosine to reference"] if sentences is not None else []
    rows = []
    for result in results:
        row = [result["model"], result["method"], f"{result['ratio']:.2f}", f"{result['parameters']:,}", megabytes(result["disk_bytes"])]
        row += [f"{result['perplexity']:.3f}"] if data is not None else []
        if speed:
            measured = result.get("speed")
            row += [measured[key] for key in ("decode", "decode_vs_first", "prefill", "prefill_vs_first")] if measured else ["-"] * 4
        row += [f"{result['cosine']:.4f}"] if sentences is not None else []
        rows.append(row)
    print(format_table(headers, rows))
    if speed:
        from lowrank.evaluation.speed import describe_measurement

        print(f"speed: {describe_measurement(rounds, threads)}")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")


def _measure_speed(causal: list[Path], results: list[dict], model_dirs: list[Path], rounds: int, threads: int, device: str, trust_remote_code: bool) -> None:
    """Decode and prefill speed of the causal models, interleaved in one process (``compare_generation_speed``)."""
    import lowrank
    from lowrank.evaluation.speed import compare_generation_speed

    models = {str(path): lowrank.load(path, device=device, trust_remote_code=trust_remote_code) for path in causal}
    measured = compare_generation_speed(models, rounds=rounds, threads=threads)
    for path, result in zip(model_dirs, results):
        if str(path) in measured:
            comparison = measured[str(path)]
            result["speed"] = {
                "decode": str(comparison.decode), "decode_vs_first": str(comparison.decode_vs_baseline),
                "prefill": str(comparison.prefill), "prefill_vs_first": str(comparison.prefill_vs_baseline),
                "decode_tokens_per_second": comparison.decode.median, "bytes_per_token": comparison.bytes_per_token,
            }  # fmt: skip


def _read_sentences(path: Path) -> list[str]:
    """The non-empty lines of ``path`` (one-line errors for a missing or empty file)."""
    from lowrank.calibration import read_text

    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def _reference_embeddings(reference: Path, sentences: list[str], trust_remote_code: bool):
    """The reference encoder's sentence embeddings (:func:`lowrank.demo.embed`), on the CPU."""
    import lowrank
    from lowrank.demo import embed
    from lowrank.models import load_tokenizer

    model = lowrank.load(reference, trust_remote_code=trust_remote_code)
    if hasattr(model, "generate") and model.can_generate():
        raise LowrankError(
            f"--reference {reference} is a causal language model; --reference/--sentences compare encoders (use --data for perplexity)"
        )
    tokenizer = load_tokenizer(reference, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LowrankError(f"--reference {reference} has no tokenizer files; sentence embeddings need the model's tokenizer")
    return embed(model, tokenizer, sentences)
