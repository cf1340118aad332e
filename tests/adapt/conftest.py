"""Fixtures of the adapt tests: token ids, statistics of tiny models, quiet adapt_, fake training."""

from __future__ import annotations

import warnings

import pytest
import torch
from threads import one_thread  # noqa: F401  (autouse: one torch thread)

import lowrank
from lowrank.adapt import adapt_

# The fixture's layers the fine-tune tests adapt: two of six blocks keep decompositions quick.
FIRST_BLOCKS = (r"layers\.[01]\.",)


@pytest.fixture(scope="session")
def data_dir(fixture_path):
    """``../shared/data`` (skips with the fixture when ../shared is absent)."""
    return fixture_path.parents[1] / "data"


@pytest.fixture(scope="session")
def block_stats(fixture_path, tokenizer, data_dir):
    """Calibration statistics of the fixture's first two blocks (8 windows × 64 tokens): enough for
    the covariance init, and much cheaper than the whole model's."""
    from lowrank.models import load_pretrained

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_pretrained(fixture_path)
    targets = lowrank.find_targets(model, include=list(FIRST_BLOCKS))
    text = (data_dir / "pycode-calib.txt").read_text()[:100_000]
    stats = lowrank.calibrate(model, tokenizer, text, num_samples=8, seq_len=64, targets=targets, progress=False)
    torch.set_num_threads(threads)
    return stats


@pytest.fixture
def sample_ids() -> torch.Tensor:
    """Token ids for the tiny models (vocabulary 128)."""
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_stats():
    """A function: calibration statistics of a tiny model's targets, from seeded random token batches."""

    def statistics(model: torch.nn.Module) -> dict:
        generator = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)} for _ in range(4)]
        return lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)

    return statistics


@pytest.fixture
def adapt_quietly():
    """A function: adapt_ without its warning about changed base weights (tested on its own)."""

    def run(model, config, stats=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return adapt_(model, config, stats=stats)

    return run


@pytest.fixture
def perturb_adapters():
    """A function standing in for training: moves every trainable tensor, so exports carry a change."""

    def perturb(model: torch.nn.Module, size: float = 0.02, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * size)

    return perturb
