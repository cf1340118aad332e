"""Helpers for tests that start several processes (torch.distributed with gloo on CPU)."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path
from types import ModuleType


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_worker(path: Path) -> ModuleType:
    """Import the worker module at ``path`` by its plain file name, its folder put on ``sys.path``,
    so that spawned processes (which unpickle its functions by module name) can import it too.
    Worker files therefore need names unique across the test folders."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.import_module(path.stem)
    assert Path(module.__file__).resolve() == path.resolve(), f"two worker modules are named {path.stem}"
    return module
