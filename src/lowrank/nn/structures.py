"""Registry of replacement modules by class name, so a saved model can be rebuilt from its config.

Every structure subclasses :class:`~lowrank.nn.replacement.ReplacementLinear` (``from_factors``,
``empty``, ``spec``, ``to_dense``, ``storage_bits``, ``truncate``); registration refuses anything else.
"""

from __future__ import annotations

from ..registry import Registry
from .replacement import ReplacementLinear

# Structures register themselves where they are defined; the registry imports those modules on first
# use, so loading a saved SLTrain model needs no `import lowrank.train` first.
STRUCTURES: Registry[type[ReplacementLinear]] = Registry("module structure", ("lowrank.nn", "lowrank.train.sltrain"))


def register_structure(cls: type[ReplacementLinear]) -> type[ReplacementLinear]:
    """Class decorator: make ``cls`` loadable by its class name.

    Raises:
        TypeError: if ``cls`` is not a :class:`ReplacementLinear` (it would lack what load needs).
    """
    if not (isinstance(cls, type) and issubclass(cls, ReplacementLinear)):
        raise TypeError(f"{cls!r} is not a ReplacementLinear subclass; a structure must implement that interface")
    return STRUCTURES.register(cls.__name__, cls)
