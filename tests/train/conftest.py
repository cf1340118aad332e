"""Training tests run torch on one thread: on a shared, busy machine two threads per process make
small steps many times slower (threads wait on each other), and results do not depend on it."""

from __future__ import annotations

from threads import one_thread  # noqa: F401  (autouse: one torch thread)
