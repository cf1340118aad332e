"""Low-rank + sparse linear layers for training from scratch (SLTrain) and their SVD start (LOST).

``W = B·A + S``: a rank-``r`` product plus a sparse matrix whose support (which entries may be
non-zero) is fixed when the layer is built; only the values on the support are trained. A layer
of shape (out, in) holds ``rank·(in + out) + num_nonzero (+ out for the bias)`` trainable numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowrankError
from ..linalg.svd import split_singular_values
from ..nn import find_targets, linear_bias, linear_weight, register_structure, set_submodule
from ..nn.lowrank_sparse_linear import LowRankSparseFactors
from ..nn.replacement import ReplacementLinear

INITIALIZATIONS = ("random", "lost")


def random_support(out_features: int, in_features: int, num_nonzero: int, generator: torch.Generator) -> torch.Tensor:
    """``num_nonzero`` distinct flat indices into an (out, in) matrix, uniformly at random, sorted.

    Example:
        >>> random_support(4, 5, 3, torch.Generator().manual_seed(0)).shape
        torch.Size([3])
    """
    return torch.randperm(out_features * in_features, generator=generator)[:num_nonzero].sort().values


@register_structure
class LowRankSparseLinear(ReplacementLinear):
    """y = (up·down + S)·x + bias, where S is sparse on the fixed flat indices ``sparse_indices``.

    ``up`` (out × rank), ``down`` (rank × in), ``sparse_values`` (num_nonzero) and ``bias`` are
    parameters; ``sparse_indices`` (into the flattened (out, in) weight) is a buffer, so gradients
    reach only the values. The forward pass builds the dense weight once per call (as SLTrain
    does): cheap next to the matrix product with a batch of tokens.

    Parameters: ``rank·(in_features + out_features) + num_nonzero`` plus ``out_features`` with a bias.

    Example:
        >>> layer = LowRankSparseLinear.random(64, 32, rank=8, density=0.05, generator=torch.Generator().manual_seed(0))
        >>> sum(p.numel() for p in layer.parameters()) == 8 * (64 + 32) + round(0.05 * 64 * 32) + 32
        True
    """

    def __init__(self, in_features: int, out_features: int, rank: int, num_nonzero: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.num_nonzero = in_features, out_features, rank, num_nonzero
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.zeros(rank, in_features, device=device, dtype=dtype))
        self.sparse_values = nn.Parameter(torch.zeros(num_nonzero, device=device, dtype=dtype))
        self.register_buffer("sparse_indices", torch.zeros(num_nonzero, dtype=torch.long, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: up·down + S."""
        weight = (self.up @ self.down).reshape(-1)
        return weight.index_add(0, self.sparse_indices, self.sparse_values).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.to_dense(), self.bias)

    @classmethod
    def random(
        cls, in_features: int, out_features: int, rank: int, density: float, bias: bool = True, std: float = 0.02,
        generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
    ) -> "LowRankSparseLinear":  # fmt: skip
        """A freshly initialized layer for training from scratch (SLTrain).

        ``up`` and ``down`` are Gaussian with standard deviation ``sqrt(std / sqrt(rank))``, so each
        entry of ``up·down`` has standard deviation ``std`` (that of the dense layer it stands for);
        the sparse values are Gaussian with ``std`` on ``round(density·in·out)`` random positions;
        the bias is zero.

        Args:
            in_features, out_features: shape of the dense layer replaced.
            rank: rank of ``up·down``.
            density: fraction of the (out, in) entries in the sparse support.
            bias: whether the layer has a bias.
            std: target standard deviation of the weight entries.
            generator: seeded generator for the support and the values.
            dtype: parameter dtype.

        Example:
            >>> LowRankSparseLinear.random(16, 8, rank=2, density=0.1).num_nonzero
            13
        """
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        num_nonzero = round(density * in_features * out_features)
        layer = cls(in_features, out_features, rank, num_nonzero, bias=bias, dtype=dtype)
        factor_std = math.sqrt(std / math.sqrt(rank))
        with torch.no_grad():
            layer.up.copy_(torch.randn(out_features, rank, generator=generator) * factor_std)
            layer.down.copy_(torch.randn(rank, in_features, generator=generator) * factor_std)
            layer.sparse_indices.copy_(random_support(out_features, in_features, num_nonzero, generator))
            layer.sparse_values.copy_(torch.randn(num_nonzero, generator=generator) * std)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, density: float) -> "LowRankSparseLinear":
        """Start from a trained dense layer (LOST): the dominant part as ``up·down``, the rest channel-wise sparse.

        ``up·down`` is the truncated SVD of ``W`` (singular values split evenly as √σ on both
        factors). Of the residual ``W − up·down`` the ``round(density·in)`` input channels (columns)
        with the largest norms are kept whole as the sparse part, so ``num_nonzero =
        out·round(density·in)``. Computed in float32 or better, stored in the layer's dtype.

        Args:
            linear: an ``nn.Linear`` or transformers ``Conv1D``.
            rank: rank of ``up·down``.
            density: fraction of input channels kept in the sparse residual.

        Example:
            >>> dense = nn.Linear(32, 16)
            >>> layer = LowRankSparseLinear.from_linear(dense, rank=4, density=0.25)
            >>> layer.num_nonzero
            128
        """
        weight = linear_weight(linear)
        bias = linear_bias(linear)
        out_features, in_features = weight.shape
        exact = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        left, singular, right = torch.linalg.svd(exact, full_matrices=False)
        factors = split_singular_values(left[:, :rank], singular[:rank], right[:rank])
        up, down = factors.up, factors.down
        residual = exact - up @ down
        channels = torch.topk(residual.norm(dim=0), round(density * in_features)).indices.sort().values
        rows = torch.arange(out_features, device=weight.device).repeat_interleave(channels.numel())
        cols = channels.repeat(out_features)
        factors = LowRankSparseFactors(up=up, down=down, rows=rows, cols=cols, values=residual[rows, cols])
        return cls.from_factors(factors, bias, dtype=weight.dtype, device=weight.device)

    @classmethod
    def from_factors(cls, factors: LowRankSparseFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> "LowRankSparseLinear":
        """Build from W ≈ up·down + S; the positions of S's entries become the fixed support.

        Example:
            >>> factors = LowRankSparseFactors(torch.randn(8, 2), torch.randn(2, 6), torch.tensor([3, 0]), torch.tensor([1, 5]), torch.randn(2))
            >>> torch.allclose(LowRankSparseLinear.from_factors(factors, bias=None, dtype=torch.float32).to_dense(), factors.dense())
            True
        """
        out_features, rank = factors.up.shape
        in_features = factors.down.shape[1]
        device = device if device is not None else factors.up.device
        indices = factors.rows * in_features + factors.cols
        order = torch.argsort(indices)
        layer = cls(in_features, out_features, rank, indices.numel(), bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.up.copy_(factors.up)
            layer.down.copy_(factors.down)
            layer.sparse_indices.copy_(indices[order])
            layer.sparse_values.copy_(factors.values[order])
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> "LowRankSparseLinear":
        return cls(in_features, out_features, spec["rank"], spec["num_nonzero"], bias=bias, dtype=dtype)

    def spec(self) -> dict:
        return {"rank": self.rank, "num_nonzero": self.num_nonzero}

    def extra_repr(self) -> str:
        density = self.num_nonzero / (self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, density={density:.3f}, bias={self.bias is not None}"


@dataclasses.dataclass
class LowRankSparseConfig:
    """How :func:`to_low_rank_sparse_` replaces linear layers.

    Attributes:
        rank: rank of the low-rank part, or a fraction in (0, 1) of each layer's smaller side.
        density: fraction of the entries (``random``) or input channels (``lost``) in the sparse part.
        init: ``"random"`` (SLTrain, for training from scratch: random factors and random support)
            or ``"lost"`` (start from the current weights: SVD part + channel-wise sparse residual).
        seed: seeds the random initialization and supports.
        version: format version of this config.

    Example:
        >>> LowRankSparseConfig(rank=64, density=0.03)
        LowRankSparseConfig(rank=64, density=0.03, init='random', seed=0, version=1)
    """

    rank: float = 0.25
    density: float = 0.03
    init: str = "random"
    seed: int = 0
    version: int = 1

    def layer_rank(self, out_features: int, in_features: int) -> int:
        """The rank for a layer of this shape (at least 1)."""
        smaller = min(out_features, in_features)
        rank = round(self.rank * smaller) if self.rank < 1 else int(self.rank)
        return max(1, min(rank, smaller))


def to_low_rank_sparse_(
    model: nn.Module, config: LowRankSparseConfig, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Replace the model's linear layers, in place, by :class:`LowRankSparseLinear` layers.

    Targets are chosen as in compression (:func:`lowrank.find_targets`: by default every linear
    layer in the transformer blocks, never the embedding or LM head). With ``init="random"`` each
    new layer's weight entries keep the standard deviation of the weight it replaces (so a model
    fresh from ``from_config`` keeps its initialization scale).

    Args:
        model: the model to convert.
        config: rank, density, initialization and seed.
        include, exclude: regular expressions on layer names, as in :func:`lowrank.find_targets`.

    Returns:
        The names of the replaced layers.

    Example:
        >>> names = to_low_rank_sparse_(model, LowRankSparseConfig(rank=64, density=0.03))  # doctest: +SKIP
    """
    if config.init not in INITIALIZATIONS:
        raise LowrankError(f"init must be one of {INITIALIZATIONS}, got {config.init!r}")
    if not 0.0 <= config.density <= 1.0:
        raise LowrankError(f"density must be in [0, 1], got {config.density}")
    if config.rank <= 0:
        raise LowrankError(f"rank must be positive (an integer, or a fraction of the smaller side), got {config.rank}")
    generator = torch.Generator().manual_seed(config.seed)
    names = find_targets(model, include=include, exclude=exclude)
    for name in names:
        linear = model.get_submodule(name)
        weight = linear_weight(linear)
        out_features, in_features = weight.shape
        rank = config.layer_rank(out_features, in_features)
        if config.init == "lost":
            layer = LowRankSparseLinear.from_linear(linear, rank, config.density)
        else:
            std = float(weight.detach().float().std())
            has_bias = linear_bias(linear) is not None
            layer = LowRankSparseLinear.random(in_features, out_features, rank, config.density, has_bias, std, generator, weight.dtype)
            layer.to(weight.device)
        set_submodule(model, name, layer)
    return names


def merge_low_rank_sparse_(model: nn.Module) -> list[str]:
    """Replace every :class:`LowRankSparseLinear` by an ``nn.Linear`` holding its dense weight, in place.

    A merged model saves as a plain Hugging Face checkpoint that loads anywhere (transformers,
    :func:`lowrank.load`, ``lowrank compress``).

    Returns:
        The names of the merged layers.

    Example:
        >>> names = merge_low_rank_sparse_(model)  # doctest: +SKIP
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LowRankSparseLinear)]
    for name in names:
        layer = model.get_submodule(name)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.up.device, dtype=layer.up.dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.to_dense())
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        set_submodule(model, name, dense)
    return names
