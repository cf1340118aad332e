"""DictionaryLinear: every output row mixes a few atoms of a shared dense dictionary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import run_linear
from .lowrank_sparse_linear import SparseRows, index_bits, index_dtype, value_bits
from .prepared import PreparedCache, tensor_key
from .replacement import ReplacementLinear
from .structures import register_structure


@dataclass
class DictionaryFactors:
    """W ≈ codes @ atoms: ``atoms`` (k, in) dense; row i of W mixes atoms ``indices[i]`` with weights ``values[i]``.

    Attributes:
        atoms: (num_atoms, in).
        indices: (out, nonzeros) long, distinct within a row.
        values: (out, nonzeros).
    """

    atoms: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    def codes(self) -> torch.Tensor:
        """The (out, num_atoms) code matrix, dense."""
        codes = torch.zeros(self.indices.shape[0], self.atoms.shape[0], dtype=self.values.dtype, device=self.values.device)
        return codes.scatter(1, self.indices, self.values)

    def dense(self) -> torch.Tensor:
        return self.codes() @ self.atoms


# Many tokens: scattering the codes into a dense (out, num_atoms) matrix for the call and running one
# GEMM beats the sparse product once the scatter is paid for by enough tokens and the codes are
# dense enough for the GEMM's higher rate to pay for multiplying the zeros. The thresholds come from
# `benchmarks/results/layer-speed.md` (dictionary rows, both paths forced against the old path) and
# its repeat of the bfloat16 dictionary rows, `layer-speed-dictionary-bf16.md`: in bfloat16 at 128
# tokens the dense codes were at best even (0.46–0.98× and 0.91–1.01×); at 256 tokens they won or
# tied where the dense codes take at most 4 MiB (q/o, k/v, down: 1.00–1.14× and 1.07–1.11×), while
# on gate/up (10 MiB) they swung from 0.72× to 1.14× between the two runs, so codes that large wait
# for 512 tokens (0.97× and 1.36×). In float32 the (sliced) sparse product matched or beat the dense
# codes up to 46 % density, and at 49 % they were about even.
DENSE_CODES_MIN_TOKENS = 256
# Dense codes larger than this need more tokens to pay for their scatter (which leaves the cache).
DENSE_CODES_LARGE_BYTES = 4 * 2**20
DENSE_CODES_LARGE_MIN_TOKENS = 512


def dense_codes_min_tokens(out_features: int, num_atoms: int, dtype: torch.dtype) -> int:
    """The least token count at which dense-enough codes of that shape are scattered for one GEMM.

    Example:
        >>> dense_codes_min_tokens(2048, 901, torch.bfloat16), dense_codes_min_tokens(5632, 903, torch.bfloat16)
        (256, 512)
    """
    large = out_features * num_atoms * torch.finfo(dtype).bits // 8 > DENSE_CODES_LARGE_BYTES
    return DENSE_CODES_LARGE_MIN_TOKENS if large else DENSE_CODES_MIN_TOKENS


def dense_codes_min_density(dtype: torch.dtype) -> float:
    """The least fraction nonzeros / num_atoms at which many tokens use the dense-codes GEMM: 0.3 in
    half precision (whose GEMM is much faster than its sparse kernel), 0.5 in float32/float64."""
    return 0.5 if dtype in (torch.float32, torch.float64) else 0.3


@register_structure
class DictionaryLinear(ReplacementLinear):
    """y = Codes·(Atoms·x) + bias, Atoms dense (num_atoms × in), Codes (out × num_atoms) with ``nonzeros`` per row.

    The codes have the same number of non-zeros in every row, so they are stored without row
    pointers: ``code_values`` (a parameter, out × nonzeros, model dtype) and ``code_indices`` (a
    buffer, out × nonzeros, int16 when num_atoms ≤ 32768, else int32), sorted within each row.
    ``atoms`` is an ``nn.Linear(in, num_atoms)``.

    The forward pass reads the codes in a run-time form (:class:`SparseRows`: int32 indices, a CSR
    tensor for one token) built at the first call and rebuilt only when the stored tensors change;
    it is not a buffer, so the state dict and ``storage_bits`` are unchanged. From
    :func:`dense_codes_min_tokens` tokens on (prefill), codes dense enough (:func:`dense_codes_min_density`)
    are scattered into a dense matrix for that call only and applied by one GEMM
    (:meth:`uses_dense_codes` says which path a call takes). bfloat16 atoms run from oneDNN's
    packed layout without gradients (:func:`~lowrank.nn.layout.run_linear`, a cached run-time copy).

    Example:
        >>> factors = DictionaryFactors(torch.randn(5, 6), torch.tensor([[0, 3], [1, 4], [2, 0]]), torch.randn(3, 2))
        >>> layer = DictionaryLinear.from_factors(factors, bias=None, dtype=torch.float32)
        >>> torch.allclose(layer.to_dense(), factors.dense())
        True
    """

    def __init__(self, in_features: int, out_features: int, num_atoms: int, nonzeros: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.num_atoms, self.nonzeros = in_features, out_features, num_atoms, nonzeros
        self.atoms = nn.Linear(in_features, num_atoms, bias=False, device=device, dtype=dtype)
        self.code_values = nn.Parameter(torch.zeros(out_features, nonzeros, device=device, dtype=dtype))
        self.register_buffer("code_indices", torch.zeros(out_features, nonzeros, dtype=index_dtype(num_atoms), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._prepared = PreparedCache()

    def prepared_codes(self) -> SparseRows:
        """The codes in their run-time form, built at the first call and kept while the stored tensors are unchanged."""

        def build() -> SparseRows:
            row_pointers = torch.arange(self.out_features + 1, device=self.code_indices.device) * self.nonzeros
            shape = (self.out_features, self.num_atoms)
            return SparseRows.build(row_pointers, self.code_indices.reshape(-1), self.code_values.reshape(-1), shape)

        return self._prepared.get((tensor_key(self.code_indices), tensor_key(self.code_values)), build)

    def uses_dense_codes(self, tokens: int, dtype: torch.dtype) -> bool:
        """Whether a call on ``tokens`` tokens of ``dtype`` multiplies by the codes scattered into a dense
        (out, num_atoms) matrix (one GEMM) rather than by their sparse form: many tokens, codes dense enough."""
        if self.nonzeros < dense_codes_min_density(dtype) * self.num_atoms:
            return False
        return tokens >= dense_codes_min_tokens(self.out_features, self.num_atoms, dtype)

    def dense_codes(self) -> torch.Tensor:
        """The (out, num_atoms) code matrix, built for one call (never kept: it is the bytes the sparse codes save)."""
        codes = torch.zeros(self.out_features, self.num_atoms, dtype=self.code_values.dtype, device=self.code_values.device)
        return codes.scatter_(1, self.code_indices.long(), self.code_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = run_linear(self.atoms, x).reshape(-1, self.num_atoms)  # (tokens, atoms); bfloat16 atoms from oneDNN's packed layout
        if self.uses_dense_codes(mixed.shape[0], mixed.dtype):
            y = F.linear(mixed, self.dense_codes(), self.bias)
        else:
            y = self.prepared_codes().matmul(mixed, self.code_values.reshape(-1), self.out_features)
            y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], self.out_features)

    def runtime_bits(self) -> int:
        """Bits one forward pass for one token reads: atoms, bias and code values at the model dtype
        (float32 for half-precision models, whose CSR kernel needs it), int32 indices and row pointers."""
        dtype = self.atoms.weight.dtype
        values = self.num_atoms * self.in_features + (self.out_features if self.bias is not None else 0)
        code_value_bits = value_bits(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        return values * value_bits(dtype) + self.out_features * self.nonzeros * (code_value_bits + 32) + (self.out_features + 1) * 32

    @classmethod
    def from_factors(cls, factors: DictionaryFactors, bias: torch.Tensor | None, dtype: torch.dtype, device=None) -> DictionaryLinear:
        """Build from factors computed in high precision, cast to the model's ``dtype``."""
        num_atoms, in_features = factors.atoms.shape
        out_features, nonzeros = factors.indices.shape
        device = device if device is not None else factors.atoms.device
        layer = cls(in_features, out_features, num_atoms, nonzeros, bias=bias is not None, device=device, dtype=dtype)
        indices, order = factors.indices.sort(dim=1)
        with torch.no_grad():
            layer.atoms.weight.copy_(factors.atoms)
            layer.code_indices.copy_(indices)
            layer.code_values.copy_(factors.values.gather(1, order))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, spec: dict, dtype=None) -> DictionaryLinear:
        return cls(in_features, out_features, spec["num_atoms"], spec["nonzeros"], bias=bias, dtype=dtype)

    def spec(self) -> dict:
        return {"num_atoms": self.num_atoms, "nonzeros": self.nonzeros}

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies: Codes·Atoms."""
        codes = torch.zeros(self.out_features, self.num_atoms, dtype=self.code_values.dtype, device=self.code_values.device)
        return codes.scatter(1, self.code_indices.long(), self.code_values) @ self.atoms.weight

    def storage_bits(self) -> int:
        """Bits this layer stores: atoms, code values and bias at the model dtype, plus the code indices."""
        values = self.num_atoms * self.in_features + self.out_features * self.nonzeros
        values += self.out_features if self.bias is not None else 0
        return values * value_bits(self.atoms.weight.dtype) + self.out_features * self.nonzeros * index_bits(self.code_indices.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_atoms={self.num_atoms}, "
            f"nonzeros={self.nonzeros}, bias={self.bias is not None}"
        )
