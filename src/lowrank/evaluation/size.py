"""Parameter counts and bytes on disk."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values (tied weights, such as shared embeddings, count once)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        key = (parameter.data_ptr(), parameter.shape)
        if key not in seen:
            seen.add(key)
            total += parameter.numel()
    return total


def disk_size(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) in a model directory."""
    path = Path(path)
    return sum(file.stat().st_size for file in path.iterdir() if file.suffix in (".safetensors", ".bin"))
