"""The calibration stage: text in, per-layer statistics out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import find_targets
from .data import sample_windows, tokenize_stream
from .statistics import LayerStatistics, StatisticsCollector


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    names: Sequence[str],
    progress: bool = True,
    total: int | None = None,
) -> dict[str, LayerStatistics]:
    """Run ``model(**batch)`` for every batch and return the input statistics of layers ``names``.

    The low-level entry point: use it for inputs that are not plain token windows (an encoder's
    sentences with attention masks, say).
    """
    model.eval()
    device = next(model.parameters()).device
    with StatisticsCollector(model, names) as collector:
        for batch in tqdm(batches, desc="calibrate", total=total, disable=not progress, unit="batch"):
            model(**{key: value.to(device) for key, value in batch.items()})
    missing = [name for name in names if name not in collector.statistics]
    assert not missing, f"calibration never reached layers {missing[:3]}"
    return collector.statistics


def calibrate(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str],
    num_samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, LayerStatistics]:
    """Accumulate XᵀX of every targeted linear layer over ``num_samples`` windows of ``seq_len`` tokens.

    Windows start at seeded random offsets in the concatenated token stream of ``texts``, so the
    same seed gives the same statistics.

    Args:
        model: a Hugging Face (or any) model taking ``input_ids``.
        tokenizer: the model's tokenizer.
        texts: one text or a list of texts (documents are concatenated).
        num_samples: number of windows.
        seq_len: tokens per window.
        seed: seed of the window sampling.
        targets: layer names; default :func:`lowrank.nn.find_targets` (linears inside the blocks).
        batch_size: windows per forward pass.
        progress: show a progress bar.

    Returns:
        ``{layer name: LayerStatistics}``.

    Example:
        >>> stats = calibrate(model, tokenizer, open("calib.txt").read(), num_samples=64)  # doctest: +SKIP
    """
    names = list(targets) if targets is not None else find_targets(model)
    windows = sample_windows(tokenize_stream(tokenizer, texts), num_samples, seq_len, seed)
    batches = [{"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size)]
    return collect_statistics(model, batches, names, progress=progress, total=len(batches))
