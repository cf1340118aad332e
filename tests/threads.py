"""One torch thread for a folder of tests: ``from threads import one_thread`` in its conftest.py.

On a shared 2-core machine, two OpenMP threads competing with other processes make LAPACK calls
(SVD, eigh) and small training steps many times slower than one thread; results do not depend on
it. The setting is restored after each test.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
