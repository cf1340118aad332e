"""SharedBasisLinear: a group of layers holding one basis parameter, stored once, tied again on load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.errors import LowrankError
from lowrank.nn import STRUCTURES
from lowrank.nn.shared_basis_linear import SharedBasisLayerFactors, SharedBasisLinear, link_shared_bases

OUT, IN, RANK = 6, 10, 3


def _group(side: str, bias: bool):
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn((RANK, IN) if side == "input" else (OUT, RANK), generator=generator, dtype=torch.float64)
    coefficients = [torch.randn((OUT, RANK) if side == "input" else (RANK, IN), generator=generator, dtype=torch.float64) for _ in range(2)]
    biases = [torch.randn(OUT, generator=generator, dtype=torch.float64) if bias else None for _ in range(2)]
    container = nn.Module()
    container.first = SharedBasisLinear.from_factors(SharedBasisLayerFactors(side, basis, coefficients[0]), biases[0], torch.float64)
    owner = container.first.basis
    container.second = SharedBasisLinear.from_factors(
        SharedBasisLayerFactors(side, owner, coefficients[1], basis_from="first"), biases[1], torch.float64
    )
    dense = [basis @ c if side == "output" else c @ basis for c in coefficients]
    return container, dense, biases


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("side", ["input", "output"])
def test_forward_storage_and_state_dict_hold_the_basis_once(side, bias):
    container, dense, biases = _group(side, bias)
    x = torch.randn(4, IN, dtype=torch.float64)
    for layer, weight, b in zip((container.first, container.second), dense, biases):
        torch.testing.assert_close(layer.to_dense(), weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), x @ weight.T + (b if bias else 0), rtol=1e-10, atol=1e-10)
    assert container.second.basis is container.first.basis
    assert len(list(container.parameters())) == 1 + 2 * (2 if bias else 1)  # the basis once
    state = container.state_dict()
    assert "first.basis" in state and "second.basis" not in state
    value_bits = 64
    basis_bits = RANK * (IN if side == "input" else OUT) * value_bits
    own = RANK * (OUT if side == "input" else IN) * value_bits + (OUT * value_bits if bias else 0)
    assert container.first.storage_bits() == basis_bits + own and container.second.storage_bits() == own


@pytest.mark.parametrize("side", ["input", "output"])
def test_rebuilt_from_specs_and_state_dict_then_linked_gives_the_same_outputs(side):
    container, _, _ = _group(side, bias=True)
    rebuilt = nn.Module()
    for name in ("first", "second"):
        layer = getattr(container, name)
        setattr(rebuilt, name, STRUCTURES["SharedBasisLinear"].empty(IN, OUT, True, layer.spec(), dtype=torch.float64))
    rebuilt.load_state_dict(container.state_dict())  # strict: the non-owner expects no basis
    x = torch.randn(3, IN, dtype=torch.float64)
    with pytest.raises(LowrankError, match="not linked") as error:
        rebuilt.second(x)
    assert "\n" not in str(error.value)
    link_shared_bases(rebuilt)
    assert rebuilt.second.basis is rebuilt.first.basis
    for name in ("first", "second"):
        assert torch.equal(getattr(rebuilt, name)(x), getattr(container, name)(x))
    rebuilt.to(torch.float32)  # a cast keeps one shared parameter
    assert rebuilt.second.basis is rebuilt.first.basis and rebuilt.second.basis.dtype == torch.float32


def test_bad_links_and_truncation_are_one_line_errors():
    container, _, _ = _group("input", bias=False)
    container.second.basis_from = "missing"
    with pytest.raises(LowrankError, match="owned by missing"):
        link_shared_bases(container)
    with pytest.raises(LowrankError, match="no nested ranks"):
        container.first.truncate(1)
    with pytest.raises(LowrankError, match="shared basis must be the owner's parameter"):
        SharedBasisLinear.from_factors(SharedBasisLayerFactors("input", torch.zeros(RANK, IN), torch.zeros(OUT, RANK), "first"), None, torch.float32)
