"""LowRankLinear: a linear layer stored as two thin matrices."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowrankError
from ..linalg import LowRankFactors
from .layout import run_linear
from .replacement import ReplacementLinear
from .structures import register_structure


@register_structure
class LowRankLinear(ReplacementLinear):
    """y = up(down(x)) = A·B·x + bias, with B = ``down.weight`` (rank × in), A = ``up.weight`` (out × rank).

    Two ``nn.Linear`` children keep the state-dict keys plain (``<name>.down.weight``,
    ``<name>.up.weight``, ``<name>.up.bias``) and let adapter libraries target them.

    Example:
        >>> dense = nn.Linear(64, 32)
        >>> layer = LowRankLinear.from_linear(dense, rank=32)
        >>> x = torch.randn(4, 64)
        >>> torch.allclose(layer(x), dense(x), atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.shared_input = None  # a fused.SharedInputGroup when siblings share one down matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # run_linear: a tall float32 up factor reads faster column-major at one token (1.37-1.42x,
        # layer-speed.md), a bfloat16 factor from oneDNN's packed layout; both set up once, at the
        # first call, whatever way the weight arrived.
        if self.shared_input is not None and not torch.is_grad_enabled():
            return run_linear(self.up, self.shared_input.down(self, x))
        return run_linear(self.up, run_linear(self.down, x))

    @classmethod
    def from_factors(cls, factors: LowRankFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> "LowRankLinear":
        """Build from factors computed in high precision, cast back to the model's ``dtype``."""
        out_features, rank = factors.up.shape
        in_features = factors.down.shape[1]
        device = device if device is not None else factors.up.device
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(factors.down)
            layer.up.weight.copy_(factors.up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> "LowRankLinear":
        """Truncated SVD of an ``nn.Linear`` or transformers ``Conv1D`` (data-free)."""
        from ..linalg import truncated_svd
        from .targets import linear_bias, linear_weight

        weight = linear_weight(linear)
        return cls.from_factors(truncated_svd(weight, rank), linear_bias(linear), dtype=weight.dtype, device=weight.device)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> "LowRankLinear":
        return cls(in_features, out_features, spec["rank"], bias=bias, dtype=dtype)

    def spec(self) -> dict:
        return {"rank": self.rank}

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""
        return self.up.weight @ self.down.weight

    def truncate(self, rank: int) -> "LowRankLinear":
        """A new layer holding the first ``rank`` components: the rank-``rank`` layer of a nested
        factorization (singular vectors in decreasing order, as ``--elastic`` saves them).

        Example:
            >>> layer = LowRankLinear.from_linear(nn.Linear(64, 32), rank=32)
            >>> layer.truncate(8).rank
            8
        """
        if not 0 <= rank <= self.rank:
            raise LowrankError(f"cannot truncate a rank-{self.rank} LowRankLinear to rank {rank}; choose a rank from 0 to {self.rank}")
        factors = LowRankFactors(up=self.up.weight[:, :rank], down=self.down.weight[:rank])
        return type(self).from_factors(factors, self.up.bias, dtype=self.up.weight.dtype, device=self.up.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"
