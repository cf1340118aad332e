"""A tiny Llama and its calibration statistics (with gradients), shared by the compensation tests."""

from __future__ import annotations

import pytest
import torch
from threads import one_thread  # noqa: F401  (autouse: one torch thread)
from tiny_models import tiny_model

import lowrank


@pytest.fixture(scope="module")
def tiny_stats():
    """Statistics of ``tiny_model("llama")`` on 4 × 32 random tokens, with output gradients."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 32), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return lowrank.collect_statistics(model, batches, lowrank.find_targets(model), gradients=True, progress=False)


@pytest.fixture(scope="module")
def sample_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
