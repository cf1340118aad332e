"""``lowrank convert``: a GGUF file (llama.cpp format) to a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import megabytes
from .main import app


@app.command()
def convert(
    gguf: Annotated[Path, typer.Argument(help="A .gguf file, or a directory holding exactly one.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="The Hugging Face directory to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Dequantize a GGUF model to float32 and write config.json, model.safetensors and the tokenizer.

    Uses transformers' GGUF loader (llama, mistral, qwen2, qwen3, phi3, gemma2/3, ...). OUT_DIR is written under a temporary name
    and renamed when complete. A conversion already cached by lowrank.gguf.resolve_model_dir ($LOWRANK_CACHE) is copied, not redone.
    """
    from ..evaluation import disk_size
    from ..gguf import convert_gguf

    written = convert_gguf(gguf, out_dir, overwrite=overwrite)
    print(f"wrote {written} ({megabytes(disk_size(written))} of float32 weights, config and tokenizer)")
