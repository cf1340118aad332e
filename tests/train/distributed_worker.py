"""Two-process CPU (gloo) training runs for tests/train/test_distributed.py.

``torch.multiprocessing.spawn(run_process, args=(OUT_DIR,), nprocs=2)`` (or ``python
distributed_worker.py OUT_DIR``) runs 2 processes that train the tiny Llama
(a) with SLTrain layers under DistributedDataParallel and (b) dense under FSDP ``fully_shard``,
both with GradientProjectionAdamW, and write the final parameters to ``OUT_DIR/{ddp,fsdp}.pt``.
The test imports :func:`train` to run the same recipe in one process on the whole batch.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

import torch
import torch.distributed as dist

from lowrank.train import GradientProjectionAdamW, LowRankSparseConfig, PretrainConfig, pretrain, projected_parameter_groups, to_low_rank_sparse_
from tiny_models import tiny_model

CONFIG = PretrainConfig(steps=4, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, log_every=100)


def build(sltrain: bool) -> torch.nn.Module:
    model = tiny_model("llama", seed=0).train()
    if sltrain:
        to_low_rank_sparse_(model, LowRankSparseConfig(rank=8, density=0.1, seed=0))
    return model


def token_ids() -> torch.Tensor:
    return torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(1))


def train(model: torch.nn.Module, trained: torch.nn.Module | None = None, batch_size: int = CONFIG.batch_size) -> dict[str, torch.Tensor]:
    """Train ``trained`` (``model`` wrapped for distribution, or ``model`` itself) and return ``model``'s full parameters.

    Rank 2 with an SVD basis refreshed every 2 steps: a projection of a process's own gradient
    instead of the averaged one would give a different basis and different parameters.
    """
    groups = projected_parameter_groups(model, rank=2, update_proj_gap=2, scale=1.0, proj_type="svd")
    optimizer = GradientProjectionAdamW(groups, lr=CONFIG.lr)
    config = dataclasses.replace(CONFIG, batch_size=batch_size)
    pretrain(trained if trained is not None else model, token_ids(), config, optimizer=optimizer, on_log=lambda step, loss: None)
    state = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        state[name] = full.detach().clone()
    return state


def run_process(rank: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    # A file rendezvous in the run's own folder: no TCP port that another job could take between
    # choosing it and binding it.
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank, world_size=2)
    model = state = None
    try:
        model = build(sltrain=True)
        state = train(model, DistributedDataParallel(model))
        if rank == 0:
            torch.save(state, Path(out_dir) / "ddp.pt")
        model = build(sltrain=False)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        state = train(model)
        if rank == 0:
            torch.save(state, Path(out_dir) / "fsdp.pt")
    finally:
        # DDP and FSDP keep the process group alive through reference cycles that only the garbage
        # collector frees. Left to interpreter shutdown, gloo's threads were destroyed half-torn-down
        # and the process aborted ("terminate called without an active exception", SIGABRT) in about
        # 1 run in 5 after both files were written; freed here, while the interpreter is whole, 0 in 30.
        del model, state
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run_process, args=(sys.argv[1],), nprocs=2)
