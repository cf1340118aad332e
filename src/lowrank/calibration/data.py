"""Text → token windows, deterministically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import LowrankError


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with one-line errors for missing or empty files."""
    path = Path(path)
    if path.is_dir():
        raise LowrankError(f"{str(path)!r} is a directory; pass a UTF-8 text file")
    if not path.is_file():
        raise LowrankError(f"text file {str(path)!r} does not exist; pass a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LowrankError(f"text file {str(path)!r} is empty; pass a file with text in it")
    return text


def tokenize_stream(tokenizer, texts: str | Sequence[str]) -> torch.Tensor:
    """Token ids of one text, or of several texts concatenated, as a 1-D tensor (no special tokens)."""
    if isinstance(texts, str):
        texts = [texts]
    pieces = [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long) for text in texts]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def sample_windows(token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets, shape (num_samples, seq_len).

    Raises:
        LowrankError: if the text is shorter than one window.
    """
    if num_samples < 1 or seq_len < 2:
        raise LowrankError(f"need num_samples ≥ 1 and seq_len ≥ 2, got {num_samples} and {seq_len}")
    if token_ids.numel() < seq_len:
        raise LowrankError(
            f"calibration text has {token_ids.numel()} tokens, fewer than one window of {seq_len}; "
            "pass a longer file or a smaller --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([token_ids[start : start + seq_len] for start in starts.tolist()])


def consecutive_windows(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens from the start (the tail shorter than a window is dropped)."""
    count = token_ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise LowrankError(
            f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seq_len}; "
            "pass a longer file or a smaller --seq-len"
        )
    return token_ids[: count * seq_len].view(count, seq_len)
