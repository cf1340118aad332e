"""The ``lowrank`` command line: one sub-command per stage, each in its own file."""

from __future__ import annotations

import logging
import os
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
        # Standalone mode lets typer print usage errors (unknown option, ...) and exit with 2.
        app(args=argv, prog_name="lowrank")
    except LowrankError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def main() -> None:
    """Entry point of the ``lowrank`` script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(run())
