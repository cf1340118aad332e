"""Reading a JSON file that must hold an object, with one-line errors that say how to fix it.

It lives at the top of the package, not in :mod:`lowrank.io`, because :mod:`lowrank.models` reads
``config.json`` with it and :mod:`lowrank.io` imports :mod:`lowrank.models`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LowrankError


def read_json_object(file: str | Path, fix: str) -> dict:
    """The JSON object in ``file``, or a one-line :class:`LowrankError` ending with ``fix``.

    Args:
        file: the file to read.
        fix: what the user should do when it is damaged (``"save the model again"``).

    Raises:
        LowrankError: if the file is not valid JSON (or not UTF-8), or holds something other than an object.

    Example:
        >>> read_json_object("out/pycode-30/lowrank_config.json", "save the model again")["method"]  # doctest: +SKIP
        'whiten'
    """
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LowrankError(f"{file} is not valid JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise LowrankError(f"{file} does not hold a JSON object; {fix}")
    return data
