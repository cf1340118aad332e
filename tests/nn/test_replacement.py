"""The replacement-module interface: every registered structure implements it, and the loader's uses of it hold.

Each row builds a structure from factors and gives the dense weight those factors stand for,
computed here from the factors' tensors (not by the module). The checks: the module applies that
weight; ``empty(**spec())`` plus the state dict rebuilds the same module (what lowrank.load does);
``spec()`` is JSON; ``storage_bits()`` counts what is stored; ``truncate`` keeps a prefix of a nested
structure and is a one-line error for every other.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

import lowrank.train  # noqa: F401  (registers the training structure LowRankSparseLinear)
from lowrank.errors import LowrankError
from lowrank.linalg import LowRankFactors
from lowrank.linalg.quantize import quantize_groups
from lowrank.nn import STRUCTURES, DictionaryLinear, LowRankLinear, LowRankPlusSparseLinear, LowRankQuantLinear, ReplacementLinear, register_structure
from lowrank.nn.dictionary_linear import DictionaryFactors
from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors
from lowrank.nn.lowrank_sparse_linear import LowRankSparseFactors
from lowrank.train import LowRankSparseLinear

OUT, IN, RANK = 12, 40, 3


def _sparse_part(generator: torch.Generator, count: int = 9):
    positions = torch.randperm(OUT * IN, generator=generator)[:count]
    rows, cols = positions // IN, positions % IN
    values = torch.randn(count, generator=generator, dtype=torch.float64)
    dense = torch.zeros(OUT, IN, dtype=torch.float64)
    dense[rows, cols] = values
    return rows, cols, values, dense


def low_rank(generator):
    up, down = torch.randn(OUT, RANK, generator=generator, dtype=torch.float64), torch.randn(RANK, IN, generator=generator, dtype=torch.float64)
    return LowRankFactors(up, down), up @ down


def low_rank_plus_sparse(generator):
    factors, product = low_rank(generator)
    rows, cols, values, sparse = _sparse_part(generator)
    return LowRankSparseFactors(factors.up, factors.down, rows, cols, values), product + sparse


def low_rank_quant(generator):
    factors, product = low_rank(generator)
    residual = quantize_groups(torch.randn(OUT, IN, generator=generator, dtype=torch.float64), bits=3, group_size=16)
    # Dequantized by hand: (code − zero point) · scale, one scale per group of 16 input columns.
    groups = torch.arange(IN) // 16
    dense = (residual.codes.double() - residual.zeros.double()[:, groups]) * residual.scales.double()[:, groups]
    return LowRankQuantFactors(factors.up, factors.down, residual), product + dense


def dictionary(generator):
    atoms = torch.randn(5, IN, generator=generator, dtype=torch.float64)
    indices = torch.stack([torch.randperm(5, generator=generator)[:2] for _ in range(OUT)])
    values = torch.randn(OUT, 2, generator=generator, dtype=torch.float64)
    dense = torch.stack([values[row] @ atoms[indices[row]] for row in range(OUT)])
    return DictionaryFactors(atoms, indices, values), dense


# structure → factors and the dense weight they stand for
ROWS = {
    LowRankLinear: low_rank,
    LowRankPlusSparseLinear: low_rank_plus_sparse,
    LowRankQuantLinear: low_rank_quant,
    DictionaryLinear: dictionary,
    LowRankSparseLinear: low_rank_plus_sparse,
}


def test_every_registered_structure_implements_the_interface():
    assert set(STRUCTURES) >= {structure.__name__ for structure in ROWS}
    for name, structure in STRUCTURES.items():
        assert issubclass(structure, ReplacementLinear) and not inspect.isabstract(structure), name
        assert STRUCTURES.get_entry(name) is structure


def test_registration_refuses_a_module_without_the_interface():
    with pytest.raises(TypeError, match="ReplacementLinear"):
        register_structure(nn.Linear)
    assert "Linear" not in STRUCTURES


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("structure", list(ROWS), ids=lambda structure: structure.__name__)
def test_from_factors_empty_spec_and_to_dense(structure, bias):
    factors, expected = ROWS[structure](torch.Generator().manual_seed(0))
    bias_values = torch.randn(OUT, dtype=torch.float64) if bias else None
    layer = structure.from_factors(factors, bias_values, dtype=torch.float64)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    torch.testing.assert_close(layer.to_dense(), expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T + (bias_values if bias else 0), rtol=1e-9, atol=1e-9)

    spec = json.loads(json.dumps(layer.spec()))  # what lowrank_config.json stores
    rebuilt = structure.empty(IN, OUT, bias, spec, dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())  # strict: the spec gives every tensor its saved shape
    assert torch.equal(rebuilt.to_dense(), layer.to_dense()) and rebuilt.spec() == layer.spec()
    assert layer.weight is None  # model code that peeks at .weight skips instead of failing

    stored = layer.storage_bits()
    assert isinstance(stored, int) and 0 < stored <= 64 * sum(t.numel() for t in list(layer.parameters()) + list(layer.buffers()))


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_truncate_keeps_the_leading_components(bias):
    up, down = torch.randn(OUT, 6, dtype=torch.float64), torch.randn(6, IN, dtype=torch.float64)
    bias_values = torch.randn(OUT, dtype=torch.float64) if bias else None
    layer = LowRankLinear.from_factors(LowRankFactors(up, down), bias_values, dtype=torch.float64)
    smaller = layer.truncate(2)
    assert isinstance(smaller, LowRankLinear) and smaller.spec() == {"rank": 2} and layer.rank == 6
    torch.testing.assert_close(smaller.to_dense(), up[:, :2] @ down[:2], rtol=0, atol=0)
    assert (smaller.up.bias is None) == (not bias) and (not bias or torch.equal(smaller.up.bias, bias_values))
    assert smaller.truncate(0).to_dense().abs().max() == 0
    with pytest.raises(LowrankError, match="choose a rank from 0 to 6"):
        layer.truncate(7)


@pytest.mark.parametrize("structure", [structure for structure in ROWS if structure is not LowRankLinear], ids=lambda structure: structure.__name__)
def test_truncate_of_a_structure_without_nested_ranks_is_a_one_line_error(structure):
    factors, _ = ROWS[structure](torch.Generator().manual_seed(0))
    layer = structure.from_factors(factors, None, dtype=torch.float64)
    with pytest.raises(LowrankError, match="no nested ranks") as error:
        layer.truncate(1)
    assert "\n" not in str(error.value) and structure.__name__ in str(error.value)


def test_every_structure_is_registered_without_importing_its_package_first():
    import subprocess
    import sys

    # A fresh interpreter that imports only lowrank.nn: the SLTrain structure (lowrank.train) must
    # still be known, or a saved SLTrain model would not load without `import lowrank.train`.
    code = "import sys; from lowrank.nn import STRUCTURES; assert 'lowrank.train' not in sys.modules; print(sorted(STRUCTURES))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LowRankSparseLinear" in names and "LowRankQuantLinear" in names
