"""LowRankPlusSparseLinear: a low-rank product plus a sparse matrix stored in CSR form.

Named apart from the training layer ``lowrank.train.sltrain.LowRankSparseLinear`` (random fixed
support, flat indices), because saved models find their structure by class name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import low_rank_plus
from .prepared import PreparedCache, tensor_key
from .replacement import ReplacementLinear
from .structures import register_structure

ROW_POINTER_DTYPE = torch.int32


def index_dtype(size: int) -> torch.dtype:
    """The smallest signed integer dtype holding indices below ``size``: int16 up to 32768, else int32."""
    return torch.int16 if size <= 2**15 else torch.int32


def value_bits(dtype: torch.dtype) -> int:
    """Bits of one stored value of a floating dtype (32 for float32, 16 for bfloat16)."""
    return torch.finfo(dtype).bits


def index_bits(dtype: torch.dtype) -> int:
    """Bits of one stored index of an integer dtype."""
    return torch.iinfo(dtype).bits


@dataclass
class SparseRows:
    """A sparse (out, in) matrix in the forms the forward pass reads, built once from the stored CSR.

    ``embedding_bag`` (each output row a weighted sum of the input columns it names) serves many
    tokens and gradients; for one token with no gradient, a CSR tensor's ``mv`` reads values and
    indices once (measured at 10 % density, 2048 × 2048, one thread: CSR ``mv`` 0.13 ms,
    ``embedding_bag`` 2.7 ms, dense 0.8 ms; at 512 tokens ``embedding_bag`` 25 ms, CSR 44 ms,
    dense 72 ms). PyTorch's CPU CSR kernels lack half precision, so a bfloat16 or float16 matrix
    keeps a float32 copy of its values for ``mv``.

    Attributes:
        col_indices: (nnz,) int32. offsets: (out,) int32, where each row's entries start.
        csr: the CSR tensor for ``mv`` (values in float32 or float64).
    """

    col_indices: torch.Tensor
    offsets: torch.Tensor
    csr: torch.Tensor

    @classmethod
    def build(cls, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> SparseRows:
        cols, crow = col_indices.to(torch.int32), crow_indices.to(torch.int32)
        compute = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(crow, cols, values.detach().to(compute), size=shape, check_invariants=False)
        return cls(cols, crow[:-1].contiguous(), csr)

    def matmul(self, x: torch.Tensor, values: torch.Tensor, out_features: int) -> torch.Tensor:
        """x·Sᵀ for x of shape (tokens, in), S having ``values`` (the live parameter) at the stored positions."""
        if x.shape[0] == 1 and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)):
            return torch.mv(self.csr, x[0].to(self.csr.dtype)).to(x.dtype)[None]
        weights = values.to(x.dtype)
        parts = [
            F.embedding_bag(self.col_indices, part.T.contiguous(), self.offsets, mode="sum", per_sample_weights=weights)
            for part in x.tensor_split(token_slices(x.shape[0], x.shape[1], x.dtype))
        ]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).T  # (tokens, out)


# The float32 embedding_bag reads, for each output row, whole rows of xᵀ (one per non-zero, each as
# long as the token count): once xᵀ outgrows the L2 cache (1 MiB per core here) those reads miss
# it. Cutting the tokens into even slices of xᵀ of at most ~512 KiB keeps each call's xᵀ in L2
# (`benchmarks/results/layer-speed.md`, *new vs old* of the many-token rows); below 1 MiB one call
# is faster than several. The half-precision kernel is bound by arithmetic, not by the cache, so
# it always takes all tokens at once.
L2_BYTES = 2**20
SLICE_BYTES = 2**19


def token_slices(tokens: int, in_features: int, dtype: torch.dtype) -> int:
    """How many even slices of the tokens :meth:`SparseRows.matmul` runs: one while xᵀ fits in
    ``L2_BYTES`` or in half precision, else enough for slices of at most ``SLICE_BYTES`` (and at
    least 32 tokens each).

    Example:
        >>> token_slices(128, 1522, torch.float32), token_slices(512, 1522, torch.float32), token_slices(512, 8192, torch.float32)
        (1, 6, 16)
        >>> token_slices(512, 1522, torch.bfloat16)
        1
    """
    if dtype not in (torch.float32, torch.float64):
        return 1
    row_bytes = in_features * torch.finfo(dtype).bits // 8
    if tokens * row_bytes <= L2_BYTES:
        return 1
    per_slice = max(32, SLICE_BYTES // row_bytes)
    return -(-tokens // per_slice)


def sparse_bits(out_features: int, in_features: int, num_nonzero: int, entry_value_bits: int) -> int:
    """Storage of ``num_nonzero`` CSR entries of an (out, in) matrix as :class:`SparseEntries` stores
    them: each value at ``entry_value_bits`` (the model dtype's) plus its column index (int16 up to
    32768 inputs, else int32), and out + 1 int32 row pointers.

    Example:
        >>> sparse_bits(256, 256, 100, 32)  # 100·(32 + 16) + 257·32
        13024
    """
    pointer_bits = index_bits(ROW_POINTER_DTYPE)
    return num_nonzero * (entry_value_bits + index_bits(index_dtype(in_features))) + (out_features + 1) * pointer_bits


def scatter(out_features: int, in_features: int, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The (out, in) dense matrix holding ``values`` at (``rows``, ``cols``) and zeros elsewhere."""
    dense = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    return dense.index_put((rows, cols), values)


@dataclass
class LowRankSparseFactors:
    """W ≈ up @ down + S, with S given by its non-zero entries (sorted by row, then column).

    Attributes:
        up: (out, rank). down: (rank, in).
        rows, cols: (nnz,) long positions of the sparse entries. values: (nnz,) their values.
    """

    up: torch.Tensor
    down: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def sparse_dense(self) -> torch.Tensor:
        """S as an (out, in) dense matrix."""
        return scatter(self.up.shape[0], self.down.shape[1], self.rows, self.cols, self.values)

    def dense(self) -> torch.Tensor:
        return self.up @ self.down + self.sparse_dense()


class SparseEntries:
    """The sparse part S of a layer, stored in CSR: its tensors, its run-time form, its bits.

    A mixin for the structures that hold one (:class:`LowRankPlusSparseLinear`,
    :class:`~lowrank.nn.lowrank_quant_linear.LowRankQuantSparseLinear`), so both store, count and
    run S the same way: ``sparse_values`` (a parameter, model dtype), ``sparse_col_indices``
    (buffer, int16 when in_features ≤ 32768, else int32) and ``sparse_crow_indices`` (buffer,
    int32, out_features + 1 row pointers); the forward pass reads S as a :class:`SparseRows` built
    at the first call and rebuilt only when the stored tensors change.
    """

    in_features: int
    out_features: int
    num_nonzero: int

    def _register_sparse(self, device, dtype) -> None:
        self.sparse_values = nn.Parameter(torch.zeros(self.num_nonzero, device=device, dtype=dtype))
        self.register_buffer("sparse_col_indices", torch.zeros(self.num_nonzero, dtype=index_dtype(self.in_features), device=device))
        self.register_buffer("sparse_crow_indices", torch.zeros(self.out_features + 1, dtype=ROW_POINTER_DTYPE, device=device))
        self._prepared_sparse = PreparedCache()

    def _copy_sparse(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Store the entries (row, column, value), in any order, as CSR."""
        order = torch.argsort(rows * self.in_features + cols)  # CSR: by row, then column
        self.sparse_values.copy_(values[order])
        self.sparse_col_indices.copy_(cols[order])
        self.sparse_crow_indices[1:].copy_(torch.bincount(rows, minlength=self.out_features).cumsum(0))

    def prepared_sparse(self) -> SparseRows:
        """S in its run-time form, built at the first call and kept while the stored tensors are unchanged."""
        key = tuple(tensor_key(t) for t in (self.sparse_crow_indices, self.sparse_col_indices, self.sparse_values))
        shape = (self.out_features, self.in_features)
        return self._prepared_sparse.get(key, lambda: SparseRows.build(self.sparse_crow_indices, self.sparse_col_indices, self.sparse_values, shape))

    def sparse_product(self, x: torch.Tensor) -> torch.Tensor:
        """S·x for ``x`` of shape (..., in)."""
        flat = x.reshape(-1, self.in_features)
        return self.prepared_sparse().matmul(flat, self.sparse_values, self.out_features).reshape(*x.shape[:-1], self.out_features)

    def sparse(self) -> torch.Tensor:
        """S as an (out, in) dense matrix."""
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=self.sparse_values.device), self.sparse_crow_indices.diff())
        return scatter(self.out_features, self.in_features, rows, self.sparse_col_indices.long(), self.sparse_values)

    def sparse_storage_bits(self) -> int:
        """Bits S stores: values at their dtype, column indices, row pointers."""
        return sparse_bits(self.out_features, self.in_features, self.num_nonzero, value_bits(self.sparse_values.dtype))

    def sparse_runtime_bits(self) -> int:
        """Bits S's CSR form reads per token: values in float32 for half-precision models (whose CSR
        kernel needs it), int32 indices and row pointers."""
        dtype = self.sparse_values.dtype
        entry_value_bits = value_bits(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        return self.num_nonzero * (entry_value_bits + 32) + (self.out_features + 1) * 32


@register_structure
class LowRankPlusSparseLinear(SparseEntries, ReplacementLinear):
    """y = up(down(x)) + S·x + bias: a rank-``rank`` product plus ``num_nonzero`` sparse weights.

    S is stored in compressed sparse row (CSR) form as three plain tensors, so the state dict is
    safetensors-friendly: ``sparse_values`` (a parameter, model dtype), ``sparse_col_indices``
    (buffer, int16 when in_features ≤ 32768, else int32) and ``sparse_crow_indices`` (buffer,
    int32, out_features + 1 row pointers).

    The forward pass reads S in a run-time form (:class:`SparseRows`: int32 indices, a CSR tensor)
    built at the first call and rebuilt only when the stored tensors change; it is not a buffer, so
    the state dict and ``storage_bits`` are unchanged. ``up.weight`` is laid out
    column-major on CPU at the first call in float32 (same shape and values, no copy kept); bfloat16
    factors run from oneDNN's packed layout without gradients (a cached run-time copy;
    :func:`~lowrank.nn.layout.low_rank_plus`).

    Example:
        >>> factors = LowRankSparseFactors(torch.randn(8, 2), torch.randn(2, 6), torch.tensor([0, 3]), torch.tensor([5, 1]), torch.randn(2))
        >>> layer = LowRankPlusSparseLinear.from_factors(factors, bias=None, dtype=torch.float32)
        >>> torch.allclose(layer.to_dense(), factors.dense())
        True
    """

    def __init__(self, in_features: int, out_features: int, rank: int, num_nonzero: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.num_nonzero = in_features, out_features, rank, num_nonzero
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self._register_sparse(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_plus(x, self.down, self.up, self.sparse_product(x))

    def runtime_bits(self) -> int:
        """Bits one forward pass for one token reads: factors and bias at the model dtype, and S as its
        CSR form reads it (:meth:`SparseEntries.sparse_runtime_bits`)."""
        dtype = self.up.weight.dtype
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        return values * value_bits(dtype) + self.sparse_runtime_bits()

    @classmethod
    def from_factors(cls, factors: LowRankSparseFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> LowRankPlusSparseLinear:
        """Build from factors computed in high precision, cast to the model's ``dtype``."""
        out_features, rank = factors.up.shape
        in_features = factors.down.shape[1]
        device = device if device is not None else factors.up.device
        layer = cls(in_features, out_features, rank, factors.values.numel(), bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(factors.down)
            layer.up.weight.copy_(factors.up)
            if bias is not None:
                layer.up.bias.copy_(bias)
            layer._copy_sparse(factors.rows, factors.cols, factors.values)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> LowRankPlusSparseLinear:
        return cls(in_features, out_features, spec["rank"], spec["num_nonzero"], bias=bias, dtype=dtype)

    def spec(self) -> dict:
        return {"rank": self.rank, "num_nonzero": self.num_nonzero}

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: up·down + S."""
        return self.up.weight @ self.down.weight + self.sparse()

    def storage_bits(self) -> int:
        """Bits this layer stores: factors and bias at the model dtype, plus S (values, indices, row pointers)."""
        values = self.rank * (self.in_features + self.out_features) + (self.out_features if self.up.bias is not None else 0)
        return values * value_bits(self.up.weight.dtype) + self.sparse_storage_bits()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"num_nonzero={self.num_nonzero}, bias={self.up.bias is not None}"
        )
