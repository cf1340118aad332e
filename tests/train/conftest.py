"""Training tests run torch on one thread: on a shared, busy machine two threads per process make
small steps many times slower (threads wait on each other), and results do not depend on it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
