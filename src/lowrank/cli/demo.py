"""``lowrank demo``: the main job end to end on a real pretrained model, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import format_table, megabytes
from .main import app


@app.command()
def demo(
    ratio: Annotated[float, typer.Option(help="Fraction of the encoder's linear-layer weights to remove.")] = 0.4,
    out: Annotated[Path | None, typer.Option(help="Also save the whitened compressed model here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Compress all-MiniLM-L6-v2 (bundled by the [demo] extra) with svd and whiten; print before/after.

    Quality is code search over the Python standard library that ships with the interpreter:
    docstring → function code, top-1 accuracy among 256 held-out functions, plus the mean cosine
    similarity of the compressed model's embeddings to the dense model's.
    """
    from ..demo import run_demo
    from ..errors import LowrankError

    if not 0.0 <= ratio < 1.0:
        raise LowrankError(f"--ratio must be in [0, 1), got {ratio}")
    if out is not None and out.exists() and not overwrite:
        raise LowrankError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it")
    rows = run_demo(ratio=ratio, out=out, overwrite=overwrite)
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
