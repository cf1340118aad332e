"""Where the project's shared read-only material lives (``../shared`` beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWRANK_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "pycode-llama"
CALIB = SHARED / "data" / "pycode-calib.txt"
EVAL = SHARED / "data" / "pycode-eval.txt"

needs_shared = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason=f"reference model not found at {FIXTURE} (clone the project beside ../shared or set LOWRANK_SHARED)"
)
