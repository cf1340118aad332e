"""The adapter layer: a frozen ``base_layer`` plus a trainable low-rank term ``lora_B · lora_A``.

Names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``), so the exported keys need no renaming.
Every adapter layer (this one and :class:`~lowrank.adapt.singular_value.SingularValueLinear`)
offers two views of what it learned:

- ``adapter_factors()``: (up, down) with  weight = base weight + up·down  (base = the residual);
- ``delta_factors()``:   (up, down) with  weight = original weight + up·down.
"""

from __future__ import annotations

import torch
from torch import nn

from ..linalg import LowRankFactors
from ..nn import linear_weight


class LoraLinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(x)), scaling 1.

    ``initial_up``/``initial_down`` (buffers, not saved in the state dict) hold B₀, A₀: the part of
    the original weight moved out of the base, so that original = base + B₀A₀ and the learned
    change is ΔW = BA − B₀A₀ = [B, −B₀]·[A; A₀].

    Example:
        >>> base = nn.Linear(16, 8)
        >>> layer = LoraLinear(base, up=torch.zeros(8, 2), down=torch.randn(2, 16))
        >>> x = torch.randn(3, 16)
        >>> torch.allclose(layer(x), base(x))
        True
    """

    def __init__(self, base_layer: nn.Module, up: torch.Tensor, down: torch.Tensor, initial: LowRankFactors | None = None):
        super().__init__()
        out_features, in_features = linear_weight(base_layer).shape
        weight = linear_weight(base_layer)
        rank = down.shape[0]
        assert up.shape == (out_features, rank) and down.shape == (rank, in_features), "factor shapes do not match the layer"
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(down)
            self.lora_B.weight.copy_(up)
        if initial is None:  # nothing was moved out of the base: B₀A₀ = 0 (rank 0)
            initial = LowRankFactors(up=up.new_zeros(out_features, 0), down=down.new_zeros(0, in_features))
        self.register_buffer("initial_up", initial.up.to(weight.dtype).clone(), persistent=False)
        self.register_buffer("initial_down", initial.down.to(weight.dtype).clone(), persistent=False)

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))

    def adapter_factors(self) -> LowRankFactors:
        return LowRankFactors(up=self.lora_B.weight.detach(), down=self.lora_A.weight.detach())

    def delta_factors(self) -> LowRankFactors:
        up = torch.cat([self.lora_B.weight.detach(), -self.initial_up], dim=1)
        down = torch.cat([self.lora_A.weight.detach(), self.initial_down], dim=0)
        return LowRankFactors(up=up, down=down)

    def merged_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: base + BA."""
        return linear_weight(self.base_layer).detach() + self.lora_B.weight.detach() @ self.lora_A.weight.detach()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, moved_out_of_base={self.initial_down.shape[0]}"


def kaiming_down(rank: int, in_features: int, seed: int) -> torch.Tensor:
    """PEFT's default lora_A draw (Kaiming-uniform with a = √5: U(−1/√in, 1/√in)), seeded."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / in_features**0.5
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def residual_layer(layer: nn.Module, factors: LowRankFactors) -> nn.Module:
    """Subtract up·down from ``layer``'s weight in place (computed in float64) and return the layer."""
    weight = linear_weight(layer)
    with torch.no_grad():
        weight.copy_(weight.to(torch.float64) - factors.dense().to(torch.float64))
    return layer


def lora_from_factors(layer: nn.Module, factors: LowRankFactors) -> LoraLinear:
    """Move ``factors`` out of ``layer``'s weight into a trainable adapter: W = (W − BA) + BA."""
    dtype = linear_weight(layer).dtype
    up, down = factors.up.to(dtype), factors.down.to(dtype)
    # Subtract the factors as the model will hold them, so base + BA reproduces W up to one rounding.
    residual_layer(layer, LowRankFactors(up=up, down=down))
    return LoraLinear(layer, up, down, initial=LowRankFactors(up=up, down=down))
