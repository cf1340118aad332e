"""Shared test fixtures: paths to ../shared, the reference model, and tiny models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads its OpenMP runtime: threads that spin while they wait make every SVD 20–40×
# slower when anything else runs on the machine (what the lowrank command sets too).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from shared_data import CALIB, EVAL, FIXTURE  # noqa: F401  (tests import paths from shared_data)


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    if not FIXTURE.is_dir():
        pytest.skip(f"reference model not found at {FIXTURE}")
    return FIXTURE


@pytest.fixture(scope="session")
def calib_text() -> str:
    if not CALIB.is_file():
        pytest.skip(f"calibration text not found at {CALIB}")
    return CALIB.read_text()


@pytest.fixture(scope="session")
def eval_text() -> str:
    if not EVAL.is_file():
        pytest.skip(f"evaluation text not found at {EVAL}")
    # The first ~20 k characters (about 24 windows of 256 tokens): stable enough, quick on 2 cores.
    return EVAL.read_text()[:20_000]


@pytest.fixture(scope="session")
def tokenizer(fixture_path):
    from lowrank.models import load_tokenizer

    return load_tokenizer(fixture_path)


@pytest.fixture
def dense_model(fixture_path):
    """A fresh float32 copy of the reference model (tests may modify it)."""
    from lowrank.models import load_pretrained

    return load_pretrained(fixture_path)


@pytest.fixture(scope="session")
def fixture_stats(fixture_path, calib_text, tokenizer):
    """Calibration statistics of the reference model: 16 windows × 128 tokens (shared, read-only)."""
    import lowrank
    from lowrank.models import load_pretrained

    model = load_pretrained(fixture_path)
    return lowrank.calibrate(model, tokenizer, calib_text, num_samples=16, seq_len=128, progress=False)


def pytest_collection_modifyitems(config, items):
    """Modules holding a ``slow`` test run first: pytest-xdist (``--dist loadfile``) hands modules to
    workers in this order, so the long ones start early instead of keeping one worker busy at the end."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: the order within stays


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
