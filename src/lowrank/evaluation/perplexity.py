"""Perplexity over non-overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import consecutive_windows, tokenize_stream


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str],
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """exp of the token-weighted mean next-token loss over non-overlapping ``seq_len`` windows.

    The text is tokenized as one stream and cut into consecutive windows; every window predicts its
    ``seq_len − 1`` next tokens, and the losses are averaged over all predicted tokens.

    Args:
        model: a causal language model.
        tokenizer: its tokenizer.
        texts: evaluation text (one string, or documents that are concatenated).
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        max_windows: evaluate only the first windows (quick checks).
        progress: show a progress bar.

    Example:
        >>> perplexity(model, tokenizer, open("eval.txt").read())  # doctest: +SKIP
        12.93
    """
    model.eval()
    device = next(model.parameters()).device
    windows = consecutive_windows(tokenize_stream(tokenizer, texts), seq_len, max_windows)
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()  # (B, T, V)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens)
