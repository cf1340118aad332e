"""Block-by-block compression on 2 gloo processes, for tests/blockwise/test_blockwise_distributed.py.

``torch.multiprocessing.start_processes(run_process, args=(ROOT, PORT), nprocs=2)`` runs, in each
of 2 processes with one torch thread:

1. ``lowrank compress --blockwise`` as ``torchrun`` would run it (``WORLD_SIZE``, ``RANK``,
   ``MASTER_ADDR``, ... in the environment; the command starts and ends the process group), its
   output in ``ROOT/cli-distributed`` and what it printed in ``ROOT/cli-rank<r>.txt``, then the
   same without ``--blockwise`` (refused);
2. every case of :data:`CASES` in a process group of its own making, with ``ROOT/dense-<model>``
   as input and ``ROOT/<case>-distributed`` as output, writing ``ROOT/<case>-rank<r>.json``: the
   blocks the process wrote, or the error it raised.

The test runs the same in one process and compares.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

import torch
import torch.distributed as dist
import transformers
from tiny_models import tiny_config

from lowrank.blockwise import compress_blockwise
from lowrank.errors import LowrankError


def dense_model(family: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(family)
    config.num_hidden_layers = layers  # more blocks than processes: the pipeline runs ahead and lags
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def batches(count: int, labels: bool) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (4, 16), generator=generator) for _ in range(count)]
    return [{"input_ids": x, "labels": x} if labels else {"input_ids": x} for x in ids]


# name → (model, compress_blockwise keyword arguments); 5 llama blocks over 2 processes, batches split 2/2 or 3/2.
CASES = {
    "whiten": ("llama", {"ratio": 0.5, "method": "whiten", "batches": batches(4, labels=False)}),
    "fisher-global": ("llama", {"ratio": 0.5, "method": "fisher-whiten", "strategy": "global", "batches": batches(5, labels=True)}),
    "svd-bfloat16": ("gpt2", {"ratio": 0.4, "method": "svd", "dtype": "bfloat16"}),
    "compressed-propagation": ("llama", {"ratio": 0.5, "method": "whiten", "propagate": "compressed", "batches": batches(4, labels=False)}),
    "resume": ("llama", {"ratio": 0.5, "method": "whiten", "batches": batches(4, labels=False), "resume": True}),
    "too-few-batches": ("llama", {"ratio": 0.5, "method": "whiten", "batches": batches(1, labels=False)}),
}


def run_case(root: Path, case: str, out: Path, rank: int | None = None) -> list[int]:
    """Run ``case`` to ``out``; the blocks this process wrote."""
    family, kwargs = CASES[case]
    written = []
    compress_blockwise(root / f"dense-{family}", out, progress=False, on_block=lambda index, _: written.append(index), **kwargs)
    return written


CLI = ["compress", "--blockwise", "--method", "svd", "--allocate", "uniform", "--ratio", "0.5"]


def run_cli(root: Path, out: Path) -> int:
    from lowrank.cli.main import run

    return run([CLI[0], str(root / "dense-gpt2"), "--out", str(out), *CLI[1:]])


def run_process(rank: int, root: str, port: int) -> None:
    torch.set_num_threads(1)
    torchrun = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(torchrun)
    printed = Path(root) / f"cli-rank{rank}.txt"
    with printed.open("w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        code = run_cli(Path(root), Path(root) / "cli-distributed")
        print(f"exit {code}")
        from lowrank.cli.main import run

        in_memory = run(["compress", str(Path(root) / "dense-gpt2"), "--out", str(Path(root) / "cli-in-memory"), "--method", "svd"])
        print(f"exit {in_memory}")
    for key in torchrun:
        del os.environ[key]

    # A file rendezvous: no second TCP port that another job could take before it is bound.
    dist.init_process_group("gloo", init_method=f"file://{Path(root) / 'rendezvous'}", rank=rank, world_size=2)
    try:
        for case in CASES:
            try:
                result = {"written": run_case(Path(root), case, Path(root) / f"{case}-distributed")}
            except LowrankError as error:
                result = {"error": str(error)}
            (Path(root) / f"{case}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
