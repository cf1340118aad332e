"""Where outputs may go, and how they get there: the one home of every rule that protects user data.

Every command treats its inputs as read-only and writes its output to a temporary sibling that is
renamed into place at the end. The checks here run before any work starts, so a bad ``--out`` fails
in a second rather than after an hour of compression:

- an output that is an input, or a directory that contains an input (replacing it with
  ``--overwrite`` would delete the input), or that lies inside an input (it would write into the
  user's model directory), is refused;
- so is an output that contains the working directory or the home directory;
- an existing output is refused without ``--overwrite``; a directory output that is a file, and a
  file output that is a directory, are refused even with it;
- leftovers of interrupted runs (``.<name>.tmp-<pid>`` of a process that no longer exists) are
  removed before a new run writes beside them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import LowrankError

log = logging.getLogger("lowrank")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    out: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False, kind: str = "directory", option: str = "--out"
) -> Path:
    """Refuse an output path that would lose data or fail late; return it resolved.

    Args:
        out: the output path the user gave.
        inputs: the paths the command reads (model directories, text files, adapters).
        overwrite: whether the user passed ``--overwrite``.
        kind: ``"directory"`` or ``"file"``: what the command writes at ``out``.
        option: the option's name, for the message.

    Raises:
        LowrankError: naming the problem and the fix.
    """
    given, target = str(out), _resolved(out)
    for item in inputs:
        source = _resolved(item)
        if _contains(target, source):
            what = "is" if target == source else "contains"
            raise LowrankError(f"{option} {given!r} {what} the input {str(item)!r}; writing it would destroy the input, choose another path")
        if _contains(source, target) and source.is_dir():
            raise LowrankError(f"{option} {given!r} lies inside the input directory {str(item)!r}; inputs are read-only, choose a path outside it")
    for protected, label in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory")):
        if _contains(target, protected):
            raise LowrankError(f"{option} {given!r} contains {label}; replacing it would delete it, choose a new path")
    if target.exists() or target.is_symlink():
        if kind == "directory" and not target.is_dir():
            raise LowrankError(f"{option} {given!r} is an existing file, not a directory; choose a directory path")
        if kind == "file" and target.is_dir():
            raise LowrankError(f"{option} {given!r} is a directory; give a file path")
        if not overwrite:
            noun = "directory" if kind == "directory" else "file"
            raise LowrankError(f"output {noun} {given!r} already exists; pass --overwrite to replace it")
    parent = target.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LowrankError(f"{option} {given!r} is under {str(existing)!r}, which is a file; choose a path in a directory")
    if kind == "file" and not parent.is_dir():
        raise LowrankError(f"the directory of {option} {given!r} does not exist; create it first or choose another path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise LowrankError(f"cannot write {option} {given!r}: {str(existing)!r} is not writable; choose another path")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` / ``.old-<pid>`` siblings of ``out`` left by processes that died."""
    if not out.parent.is_dir():
        return
    for marker in ("tmp", "old"):
        for leftover in out.parent.glob(f".{out.name}.{marker}-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                log.info("removing %s, left by an interrupted run", leftover)
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def replace_directory(source: Path, out: Path) -> None:
    """Move the finished directory ``source`` to ``out``, replacing an existing ``out`` last."""
    if out.exists():
        previous = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(previous)
        source.rename(out)
        shutil.rmtree(previous)
    else:
        source.rename(out)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir`` that becomes ``out_dir`` only on success.

    ``out_dir`` is checked first (:func:`check_output`: never an input or a directory holding one;
    an existing one only with ``overwrite``). It is replaced only after the new one is complete, so
    a failure never loses the old output, and the temporary directory is removed on any error.
    """
    out = check_output(out_dir, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    temporary = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        replace_directory(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so a crash never leaves half a file."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
