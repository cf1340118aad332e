"""Name → entry registries: one pattern for methods, allocation strategies, adapter inits and module structures.

An entry registers itself where it is defined (``registry.register(name, entry)``, usually through a
decorator), so adding a method is adding its file. A registry knows the package that holds its
built-in entries and imports every module of it the first time it is asked for anything: no entry
depends on an import a user could forget.

Example:
    >>> from lowrank.methods import METHODS
    >>> "whiten" in METHODS.names()
    True
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from .errors import LowrankError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name; a mapping, with one-line errors for unknown names.

    Args:
        kind: what an entry is, for messages ("method", "allocation strategy", ...).
        package: dotted name of the package whose modules define the built-in entries (every
            module of it is imported on first use), or a tuple of such packages and modules.
    """

    def __init__(self, kind: str, package: str | tuple[str, ...] | None = None):
        self.kind = kind
        self.packages = (package,) if isinstance(package, str) else tuple(package or ())
        self._entries: dict[str, T] = {}
        self._loaded = not self.packages

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` as ``name`` (a later registration of the same name replaces it)."""
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package in self.packages:
            module = importlib.import_module(package)
            for info in pkgutil.iter_modules(getattr(module, "__path__", [])):  # a plain module has no submodules
                importlib.import_module(f"{package}.{info.name}")

    def get_entry(self, name: str) -> T:
        """The entry called ``name``, or a one-line error listing the known names."""
        self._load()
        if name not in self._entries:
            raise LowrankError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)
