"""The ``lowrank`` command gives torch's OpenMP runtime a passive wait policy before it starts.

What the runtime actually uses is read from the runtime itself: with ``OMP_DISPLAY_ENV=VERBOSE``
GNU OpenMP prints its settings when it loads, and ``GOMP_SPINCOUNT`` is how long an idle thread
spins (300000 by default, 0 under ``OMP_WAIT_POLICY=PASSIVE``). Every process that loads torch prints
one block, so the last block is the one of the process that ran the command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ENTRY_POINT = "import sys; from lowrank.cli.main import main; sys.argv[0] = 'lowrank'; main()"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("OMP_", "GOMP_"))}
    environment.update(OMP_DISPLAY_ENV="VERBOSE", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", ENTRY_POINT, *args], env=environment, capture_output=True, text=True, timeout=300)


def spin_counts(stderr: str) -> list[int]:
    """GOMP_SPINCOUNT of every OpenMP runtime that loaded, in order."""
    return [int(value) for value in re.findall(r"GOMP_SPINCOUNT = '(\d+)'", stderr)]


@pytest.mark.slow
def test_the_command_runs_with_a_passive_wait_policy():
    done = run_cli("methods")  # a command that loads torch
    assert done.returncode == 0, done.stderr
    assert "whiten" in done.stdout
    counts = spin_counts(done.stderr)
    assert counts, "the OpenMP runtime printed no settings; is torch built with GNU OpenMP?"
    # One process: `import lowrank` loads no torch, so the policy is set before the runtime starts
    # and the command never needs to restart itself; its threads never spin.
    assert counts == [0], counts


@pytest.mark.slow
def test_a_wait_policy_the_user_chose_wins():
    done = run_cli("methods", OMP_WAIT_POLICY="ACTIVE")
    assert done.returncode == 0, done.stderr
    counts = spin_counts(done.stderr)
    assert len(counts) == 1 and counts[0] > 0, counts  # no restart, the user's spinning kept


def test_importing_the_library_sets_no_wait_policy():
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", "import os, lowrank, lowrank.cli.main; print(os.environ.get('OMP_WAIT_POLICY'))"],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
