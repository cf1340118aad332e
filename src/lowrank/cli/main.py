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


def main() -> None:
    """Entry point of the ``lowrank`` script: user errors become one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _register_commands()
    try:
        app(standalone_mode=False)
    except LowrankError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
