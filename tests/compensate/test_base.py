"""Base compressors: spec parsing, pruning masks against brute force, storage counted by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank.calibration import LayerStatistics
from lowrank.compensate import BaseSpec, compress_base
from lowrank.errors import LowrankError
from lowrank.linalg.prune import n_m_mask, pruning_scores, unstructured_mask


@pytest.mark.parametrize(
    "text, expected",
    [
        ("gptq:4", BaseSpec("gptq", bits=4)),
        ("RTN:3", BaseSpec("rtn", bits=3)),
        ("wanda:0.5", BaseSpec("wanda", sparsity=0.5)),
        ("magnitude:2:4", BaseSpec("magnitude", n=2, m=4)),
    ],
)
def test_specs_parse(text, expected):
    assert BaseSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["gptq", "gptq:9", "gptq:1", "awq:4", "wanda:1.0", "wanda:4:2", "rtn:4:2", "wanda:-0.1"])
def test_bad_specs_fail_in_one_line(text):
    with pytest.raises(LowrankError, match="base compressor"):
        BaseSpec.parse(text)


def best_subset(row: torch.Tensor, keep: int) -> set[int]:
    """The ``keep`` positions of largest total score, by trying every subset."""
    return set(max(itertools.combinations(range(len(row)), keep), key=lambda subset: sum(row[i].item() for i in subset)))


def test_wanda_keeps_the_best_subset_of_each_row():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 8, generator=generator)
    x = torch.randn(50, 8, generator=generator) * torch.arange(1, 9)
    scores = pruning_scores(weight, x.T @ x)
    # Wanda's score, written out: |W_ij| times the l2 norm of input j over the tokens.
    assert torch.allclose(scores, weight.abs().double() * x.double().norm(dim=0), rtol=1e-5)
    mask = unstructured_mask(scores, 0.5)
    for row in range(5):
        assert set(mask[row].nonzero().flatten().tolist()) == best_subset(scores[row], 4)


def test_two_four_keeps_the_best_two_of_every_four():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    mask = n_m_mask(scores, 2, 4)
    for row in range(6):
        for start in range(0, 16, 4):
            kept = {start + i for i in mask[row, start : start + 4].nonzero().flatten().tolist()}
            assert kept == {start + i for i in best_subset(scores[row, start : start + 4], 2)}


def test_storage_is_counted_in_bits_for_each_part():
    weight = torch.randn(8, 64)
    stats = LayerStatistics.zeros(64)
    stats.inputs.update(torch.randn(100, 64))
    # 3-bit codes for 8·64 weights, 3-bit zero points and 16-bit scales for 8·2 groups of 32.
    assert compress_base(weight, stats, BaseSpec.parse("gptq:3"), group_size=32).storage_bits(torch.float32) == 8 * 64 * 3 + 16 * 3 + 16 * 16
    # 2:4 keeps 256 values: each a float32 plus an int16 column index, and 9 int32 row pointers.
    pruned = compress_base(weight, stats, BaseSpec.parse("wanda:2:4"))
    assert pruned.storage_bits(torch.float32) == 256 * (32 + 16) + 9 * 32
    assert pruned.storage_bits(torch.bfloat16) == 256 * (16 + 16) + 9 * 32


def test_statistics_are_required_where_the_base_reads_them():
    with pytest.raises(LowrankError, match="needs calibration statistics"):
        compress_base(torch.randn(4, 8), None, BaseSpec.parse("wanda:0.5"))
    with pytest.raises(LowrankError, match="divisible by 4"):
        compress_base(torch.randn(4, 6), None, BaseSpec.parse("magnitude:2:4"))
