"""Generation speed at batch size 1."""

from __future__ import annotations

import time

import torch
from torch import nn


@torch.no_grad()
def generation_speed(model: nn.Module, tokenizer, prompt: str = "def main():\n", new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy decoding throughput in tokens per second (batch 1, KV cache on, best of ``repeats``).

    One untimed warm-up run comes first; the best of the timed runs is reported because on a shared
    machine the minimum is the least noisy estimate of what the model costs.
    """
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    model.generate(input_ids, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(input_ids, **kwargs)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best
