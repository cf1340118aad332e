"""Registry of replacement modules by name, so a saved model can be rebuilt from its config.

Every structure module implements:
- ``spec() -> dict``: JSON-serializable constructor arguments beyond in/out features and bias;
- ``empty(in_features, out_features, bias, spec, dtype) -> module`` (classmethod): an
  uninitialized module of the right shapes, to load a state dict into.
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry

# Structures register themselves where they are defined (lowrank.nn and lowrank.train.sltrain).
STRUCTURES: Registry[type[nn.Module]] = Registry("module structure")


def register_structure(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` loadable by its class name."""
    return STRUCTURES.register(cls.__name__, cls)
