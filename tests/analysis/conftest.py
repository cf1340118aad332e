"""Fixtures of the analysis tests; also makes this folder's ``analysis_helpers`` importable in any pytest import mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from threads import one_thread  # noqa: F401  (autouse: one torch thread)

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def tiny_llama():
    """A two-block Llama with random weights (hidden 32, MLP 64), built offline."""
    from tiny_models import tiny_model

    return tiny_model("llama", seed=0)
