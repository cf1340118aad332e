"""Loading Hugging Face models and tokenizers from local directories, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from .errors import LowrankError
from .nn.experts import unfuse_experts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def read_model_config(path: str | Path) -> dict:
    """Return the parsed ``config.json`` of a model directory, or raise a one-line error."""
    path = Path(path)
    if not path.exists():
        raise LowrankError(f"model directory {str(path)!r} does not exist; pass the path of a Hugging Face model directory")
    if not path.is_dir():
        raise LowrankError(f"{str(path)!r} is a file, not a model directory; pass the directory that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LowrankError(f"{str(path)!r} is not a model directory (no config.json); pass a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise LowrankError(f"{config_file} is not valid JSON ({error}); repair or re-download the model") from None


def model_class(config: transformers.PretrainedConfig) -> type[nn.Module]:
    """The transformers class named by ``config.architectures`` (falling back to ``AutoModel``)."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def load_pretrained(path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a dense Hugging Face model from a local directory, without network access.

    Mixture-of-experts blocks are unfused (:func:`lowrank.nn.unfuse_experts`): same function, one
    ``nn.Linear`` per expert projection.

    Args:
        path: directory with ``config.json`` and weights.
        dtype: ``"float32"``, ``"bfloat16"``, ... or a ``torch.dtype``; default: the checkpoint's dtype.
        device: where to put the model.

    Example:
        >>> model = load_pretrained("../shared/fixtures/pycode-llama")  # doctest: +SKIP
    """
    read_model_config(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    try:
        model = model_class(config).from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    except OSError as error:
        raise LowrankError(f"could not load the weights in {str(path)!r}: {str(error).splitlines()[0]}") from None
    # Fused mixture-of-experts weights become one nn.Linear per expert (same outputs), so every stage
    # sees, calibrates and compresses each expert; lowrank.save fuses them back for a dense model.
    unfuse_experts(model)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """Load the tokenizer stored beside a model; ``None`` if the directory has none."""
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
