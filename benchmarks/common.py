"""Shared benchmark helpers: paths to ../shared, peak-memory sampling, Markdown output."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWRANK_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "pycode-llama"
CALIB = SHARED / "data" / "pycode-calib.txt"
EVAL = SHARED / "data" / "pycode-eval.txt"
DOCS = SHARED / "data" / "pydocs-eval.txt"
RESULTS = REPO / "benchmarks" / "results"


def require_shared() -> None:
    if not FIXTURE.is_dir():
        raise SystemExit(f"benchmarks need the reference model at {FIXTURE}; clone the project beside ../shared")


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the rise above the start."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.process = interval, psutil.Process()
        self.start = self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def machine_line() -> str:
    return f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_markdown(name: str, text: str, echo: bool = True) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    if echo:
        print(text)
    return path
