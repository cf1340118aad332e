"""Plain LoRA: random A, zero B, base untouched — the baseline every other init is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import zlib

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..nn import linear_weight
from .config import AdapterConfig, register_init
from .layer import LoraLinear, kaiming_down


@dataclass
class RandomConfig(AdapterConfig):
    """LoRA as PEFT initializes it (A Kaiming-uniform, B = 0); the base weight does not change.

    Example:
        >>> config = RandomConfig(rank=8, seed=0)
    """

    name = "random"
    changes_base = False


@register_init(RandomConfig)
def build(layer: nn.Module, statistics: LayerStatistics | None, config: RandomConfig, name: str = "") -> LoraLinear:
    out_features, in_features = linear_weight(layer).shape
    rank = min(config.rank, out_features, in_features)
    # One seed per layer, derived from its name, so layers do not share a draw.
    seed = config.seed * 1_000_003 + zlib.crc32(name.encode())
    return LoraLinear(layer, up=torch.zeros(out_features, rank), down=kaiming_down(rank, in_features, seed))
