"""Helpers shared by the sub-commands (not a command module itself)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from ..validation import check_device, check_patterns, check_positive, check_ratio  # noqa: F401  (re-exported for the commands)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[str(cell) for cell in headers]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(row) for row in cells[1:]])


def megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


# Options that several commands share, declared once.
Overwrite = Annotated[bool, typer.Option(help="Replace --out if it exists.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped in the model directory (auto_map), as transformers' trust_remote_code. It runs with your permissions: read it first. Off: such a directory is refused (unless transformers knows its model type), never prompted for.",
    ),
]


def input_model(path: Path, trust_remote_code: bool = False) -> Path:
    """Check a model input up front (directory, config, shipped code) and return the directory to read.

    A ``.gguf`` file (or a directory holding one) is converted once into a cached Hugging Face
    directory (:func:`lowrank.gguf.resolve_model_dir`), which is what the command then reads.
    """
    from ..gguf import resolve_model_dir
    from ..models import load_config

    directory = resolve_model_dir(path)
    load_config(directory, trust_remote_code)  # config.json parsed and checked here, so its errors are named as such
    return directory
