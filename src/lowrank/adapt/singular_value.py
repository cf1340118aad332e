"""Singular-value tuning (SVFit / SALT): scale and shift the top singular values, LoRA on the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import LayerStatistics
from ..linalg import LowRankFactors
from ..nn import linear_weight
from .config import AdapterConfig, register_init
from .decompose import balance, singular_triplets
from .layer import kaiming_down, residual_layer


@dataclass
class SingularValueConfig(AdapterConfig):
    """W = U_r diag(s) V_rᵀ + W_res; train s ↦ s·scale + shift (2r numbers) and a LoRA B·A on W_res.

    The top singular vectors stay fixed, only their strengths move; the low-rank update lets the
    rest of the matrix change too (SVFit, SALT). ``rank`` is the number of tuned singular values.

    Attributes:
        update_rank: rank of the LoRA update of the residual (0: none; default: ``rank``).

    Example:
        >>> config = SingularValueConfig(rank=8, update_rank=8)
    """

    update_rank: int | None = None

    name = "singular-value"


class SingularValueLinear(nn.Module):
    """y = base_layer(x) + U diag(s·scale + shift) Vᵀ x + lora_B(lora_A(x)), base = W − U diag(s) Vᵀ.

    Frozen buffers ``singular_up`` (U, out × r), ``singular_down`` (Vᵀ, r × in) and
    ``singular_values`` (s); trainable ``scale`` (ones), ``shift`` (zeros), ``lora_A`` (random),
    ``lora_B`` (zeros), so the layer reproduces W at step 0.

    Example:
        >>> layer = build(nn.Linear(16, 8), None, SingularValueConfig(rank=4))
        >>> layer.scale.shape
        torch.Size([4])
    """

    def __init__(self, base_layer: nn.Module, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, update_rank: int, seed: int = 0):
        super().__init__()
        weight = linear_weight(base_layer)
        out_features, in_features = weight.shape
        options = dict(device=weight.device, dtype=weight.dtype)
        self.base_layer = base_layer
        self.register_buffer("singular_up", u.to(**options).contiguous())
        self.register_buffer("singular_down", vh.to(**options).contiguous())
        self.register_buffer("singular_values", s.to(**options))
        self.scale = nn.Parameter(torch.ones(s.numel(), **options))
        self.shift = nn.Parameter(torch.zeros(s.numel(), **options))
        self.lora_A = nn.Linear(in_features, update_rank, bias=False, **options)
        self.lora_B = nn.Linear(update_rank, out_features, bias=False, **options)
        with torch.no_grad():
            self.lora_A.weight.copy_(kaiming_down(update_rank, in_features, seed))
            self.lora_B.weight.zero_()

    def tuned_values(self) -> torch.Tensor:
        return self.singular_values * self.scale + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coordinates = nn.functional.linear(x, self.singular_down) * self.tuned_values()  # (..., r)
        return self.base_layer(x) + nn.functional.linear(coordinates, self.singular_up) + self.lora_B(self.lora_A(x))

    def adapter_factors(self) -> LowRankFactors:
        """weight = base + [U diag(s′), B]·[Vᵀ; A]."""
        return self._factors(self.tuned_values().detach())

    def delta_factors(self) -> LowRankFactors:
        """weight = original + [U diag(s′ − s), B]·[Vᵀ; A]: rank r + update_rank."""
        return self._factors(self.tuned_values().detach() - self.singular_values)

    def _factors(self, values: torch.Tensor) -> LowRankFactors:
        spectral = balance(self.singular_up * values, self.singular_down)
        up = torch.cat([spectral.up, self.lora_B.weight.detach()], dim=1)
        down = torch.cat([spectral.down, self.lora_A.weight.detach()], dim=0)
        return LowRankFactors(up=up, down=down)

    def merged_weight(self) -> torch.Tensor:
        return linear_weight(self.base_layer).detach() + self.adapter_factors().dense()

    def extra_repr(self) -> str:
        return f"singular_values={self.singular_values.numel()}, update_rank={self.lora_A.out_features}"


@register_init(SingularValueConfig)
def build(layer: nn.Module, statistics: LayerStatistics | None, config: SingularValueConfig, name: str = "") -> SingularValueLinear:
    weight = linear_weight(layer)
    rank = min(config.rank, *weight.shape)
    update_rank = config.rank if config.update_rank is None else config.update_rank
    u, s, vh = singular_triplets(weight, rank, svd=config.svd, power_iterations=config.power_iterations, seed=config.seed)
    dtype = weight.dtype
    # Subtract the top part as the model will hold it, so base + U diag(s) Vᵀ reproduces W.
    u, s, vh = u.to(dtype), s.to(dtype), vh.to(dtype)
    residual_layer(layer, LowRankFactors(up=u * s, down=vh))
    return SingularValueLinear(layer, u, s, vh, update_rank, seed=config.seed)
