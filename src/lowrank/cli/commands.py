"""Imports every sub-command module of this package so that each registers itself on the app.

A new command is a new file here that does ``from .main import app`` and decorates a function
with ``@app.command()``; nothing else needs editing.
"""

import importlib
import pkgutil

from . import __path__ as _package_path

for _module in sorted(info.name for info in pkgutil.iter_modules(_package_path)):
    if _module not in ("main", "commands", "common"):
        importlib.import_module(f"{__package__}.{_module}")
