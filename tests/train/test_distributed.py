"""DDP and FSDP (2 gloo processes on CPU) give the parameters of one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from processes import load_worker

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(load_worker(WORKER).run_process, args=(str(out),), nprocs=2)
    return out


def _assert_same(distributed: dict, single: dict) -> None:
    assert distributed.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-5, msg=lambda message: f"{name}: {message}")


@pytest.mark.slow
def test_ddp_with_sltrain_layers_matches_one_process(distributed_runs):
    worker = load_worker(WORKER)
    initial = {name: p.detach().clone() for name, p in worker.build(sltrain=True).named_parameters()}
    single = worker.train(worker.build(sltrain=True))
    distributed = torch.load(distributed_runs / "ddp.pt", weights_only=True)
    assert any(not torch.equal(single[name], initial[name]) for name in initial)  # training moved the weights
    _assert_same(distributed, single)
    # The tolerance tells runs apart: training on one process's half of the batch lands elsewhere.
    half = worker.train(worker.build(sltrain=True), batch_size=2)
    with pytest.raises(AssertionError):
        _assert_same(distributed, half)


@pytest.mark.slow
def test_fsdp_projected_optimizer_matches_one_process(distributed_runs):
    worker = load_worker(WORKER)
    single = worker.train(worker.build(sltrain=False))
    distributed = torch.load(distributed_runs / "fsdp.pt", weights_only=True)
    _assert_same(distributed, single)
