"""Shared steps of the method tests: budgets, tiny models with planted structure, save → load."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.nn.lowrank_sparse_linear import value_bits
from tiny_models import tiny_model


def budget_bits(out_features: int, in_features: int, rank: int, dtype: torch.dtype) -> int:
    """The storage a plan's rank buys: rank·(out + in) values of ``dtype``."""
    return rank * (out_features + in_features) * value_bits(dtype)


def weight_bits(module: torch.nn.Module) -> int:
    """Stored bits of a replacement module without its bias (the plan's budget excludes biases)."""
    bias_bits = sum(p.numel() * value_bits(p.dtype) for name, p in module.named_parameters() if name.endswith("bias"))
    return module.storage_bits() - bias_bits


def random_batches(count: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=generator)} for _ in range(count)]


def plant(model: torch.nn.Module, make_weight) -> torch.nn.Module:
    """Replace every targeted layer's weight by ``make_weight(out, in, generator)`` (structure a method can find)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in lowrank.find_targets(model):
            weight = lowrank.nn.linear_weight(model.get_submodule(name))
            weight.copy_(make_weight(*weight.shape, generator).to(weight.dtype))
    return model


def compress_save_load(tmp_path, family: str, method: str, config, make_weight=None, ratio: float = 0.5, dtype=torch.float32):
    """Compress a tiny model, save it, load it back; returns (model, loaded, report)."""
    model = tiny_model(family).to(dtype)
    if make_weight is not None:
        plant(model, make_weight)
    stats = lowrank.collect_statistics(model, random_batches(), lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, ratio, method=method, stats=stats)
    report = lowrank.compress_(model, plan, method=method, stats=stats, config=config, progress=False)
    lowrank.save(model, tmp_path / "out", report=report)
    return model, lowrank.load(tmp_path / "out"), report


def assert_same_logits(model, loaded, vocab_size: int = 128) -> None:
    x = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.fixture
def one_thread():
    """Run LAPACK on one thread: on two cores shared with other processes, two OpenMP threads spin-wait
    for each other and make every SVD 20× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
