"""One dataclass config per adapter initialization, and the registry from config type to builder.

A builder turns one linear layer (plus its calibration statistics, when the init needs them) into
the adapter layer that replaces it. Adding an initialization means one new file with a config and
a builder registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..calibration import LayerStatistics
from ..errors import LowrankError
from ..registry import Registry

SVD_METHODS = ("exact", "randomized")


@dataclass
class AdapterConfig:
    """Options every initialization shares.

    Attributes:
        rank: adapter rank r (per targeted layer; capped at min(out, in)).
        include: regular expressions of layer names to adapt (default: every linear layer inside
            the transformer blocks, see :func:`lowrank.find_targets`).
        exclude: regular expressions of layer names to leave alone.
        svd: ``"exact"`` (full SVD in float64) or ``"randomized"`` (Halko et al.; for big matrices,
            top components only).
        power_iterations: power iterations of the randomized SVD; each one sharpens the decay of the
            spectrum the sketch sees (4 matches the exact top-r error to < 1 % on the fixture).
        seed: seed of every random draw (randomized SVD, random LoRA factors).
    """

    version: int = 1
    rank: int = 8
    include: list[str] | None = None
    exclude: list[str] | None = None
    svd: str = "exact"
    power_iterations: int = 4
    seed: int = 0

    name = "base"
    needs_statistics = False
    changes_base = True
    uses_top_components = True

    def validate(self) -> None:
        """Raise a one-line :class:`LowrankError` for impossible option combinations."""
        if self.rank < 1:
            raise LowrankError(f"adapter rank must be ≥ 1, got {self.rank}")
        if self.svd not in SVD_METHODS:
            raise LowrankError(f"unknown svd {self.svd!r}; choose one of: {', '.join(SVD_METHODS)}")
        if self.svd == "randomized" and not self.uses_top_components:
            raise LowrankError(
                f"the {self.name} init needs the smallest singular triplets, which randomized SVD cannot find; use svd='exact'"
            )
        if self.power_iterations < 0:
            raise LowrankError(f"power_iterations must be ≥ 0, got {self.power_iterations}")


# (layer, statistics or None, config, layer name) -> adapter layer replacing ``layer``
Builder = Callable[[nn.Module, LayerStatistics | None, AdapterConfig, str], nn.Module]
@dataclass(frozen=True)
class AdapterInit:
    """An adapter initialization (``--init NAME``): its config class and the builder of its layers."""

    name: str
    config_class: type
    build: Builder


INITS: Registry[AdapterInit] = Registry("adapter init", "lowrank.adapt")


def register_init(config_class: type):
    """Decorator: ``builder`` makes the adapter layers for configs of ``config_class``."""

    def decorator(builder: Builder) -> Builder:
        INITS.register(config_class.name, AdapterInit(config_class.name, config_class, builder))
        return builder

    return decorator


def init_names() -> list[str]:
    return INITS.names()


def config_class(name: str) -> type:
    """The config class of the initialization called ``name`` (``"principal"``, ``"minor"``, ...)."""
    return INITS.get_entry(name).config_class
