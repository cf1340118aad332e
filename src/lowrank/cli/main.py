"""The ``lowrank`` command line: one sub-command per stage, each in its own file."""

from __future__ import annotations

import logging
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer

from ..errors import LowrankError

app = typer.Typer(
    help="Find and exploit low-rank structure in the weights of neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    # Each sub-command lives in its own module and registers itself on `app` when imported.
    from . import commands  # noqa: F401


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code: user errors print one line and give 2."""
    _register_commands()
    # Our own progress bars say what runs; transformers' weight-loading bars would only add noise.
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        # Not standalone: typer's usage errors come back here and are printed as one line like ours.
        result = app(args=argv, prog_name="lowrank", standalone_mode=False)
    except LowrankError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 1
    except typer.TyperException as error:  # a usage error: unknown option, missing argument, bad value
        message = " ".join(str(getattr(error, "format_message", error.__str__)()).split()).rstrip(".")
        context = getattr(error, "ctx", None)
        hint = f"; see '{context.command_path} --help'" if context is not None else ""
        if message:  # no message: typer already printed the help (a bare `lowrank`)
            print(f"error: {message}{hint}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return result if isinstance(result, int) else 0


# OpenMP threads that spin while they wait for each other make torch's SVD and eigendecompositions
# up to 35–60× slower at 2 threads when another job uses the cores; waiting passively costs nothing
# measurable (benchmarks/results/cost-threads.md). The OpenMP runtime reads the
# policy once, when torch loads it.
WAIT_POLICY = "PASSIVE"
_RESTART = "import sys; from lowrank.cli.main import main; sys.argv[0] = 'lowrank'; main()"


def set_wait_policy() -> None:
    """Give the OpenMP runtime ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    The runtime reads it when torch is first imported. ``import lowrank`` does not load torch (its
    names are imported on first use), so the ``lowrank`` script sets it in time; if torch is already
    loaded (``main()`` called from a process that imported it), the process re-executes itself once
    with the variable set, and the child sees it and goes on.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    if "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-c", _RESTART, *sys.argv[1:]])


def main() -> None:
    """Entry point of the ``lowrank`` script."""
    set_wait_policy()
    # A terminated run unwinds like an interrupted one, so its temporary output is removed on the way out.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(run())
