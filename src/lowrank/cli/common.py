"""Helpers shared by the sub-commands (not a command module itself)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from ..job import check_device  # noqa: F401  (the commands check --device with it)


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
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped in the model directory (auto_map), as transformers' trust_remote_code. It runs with your permissions: read it first. Off: such a directory is refused (unless transformers knows its model type), never prompted for.",
    ),
]


def check_positive(**values: int | None) -> None:
    """One-line error for any count option that is not a positive integer (``None`` means unset)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise LowrankError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_patterns(**patterns: list[str] | None) -> None:
    """One-line error for a regular expression that does not compile."""
    for option, values in patterns.items():
        for pattern in values or []:
            try:
                re.compile(pattern)
            except re.error as error:
                raise LowrankError(f"--{option} {pattern!r} is not a valid regular expression ({error}); e.g. 'mlp' or r'layers\\.\\d+\\.self_attn'") from None


def check_ratio(ratio: float, option: str = "--ratio") -> None:
    if not (0.0 <= ratio < 1.0):  # also catches NaN
        raise LowrankError(f"{option} must be in [0, 1), got {ratio}; e.g. 0.3 removes 30 % of the targeted parameters")


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
