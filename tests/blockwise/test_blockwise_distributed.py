"""Block-by-block compression on 2 gloo processes writes the very bytes one process writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from processes import free_port, load_worker

from lowrank.blockwise.distributed import Group, add_flat_, collect_pieces, flatten

WORKER = Path(__file__).with_name("blockwise_worker.py")


def _files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every case of the worker on 2 processes, and the same cases in this process (one thread)."""
    worker = load_worker(WORKER)
    root = tmp_path_factory.mktemp("distributed")
    (root / ".resume-distributed.partial").mkdir()  # an unfinished run, which 2 processes cannot resume
    worker.dense_model("llama", layers=5).save_pretrained(root / "dense-llama", max_shard_size="20KB")  # several shards
    worker.dense_model("gpt2", layers=3).save_pretrained(root / "dense-gpt2")
    # Forked rather than spawned: the processes need not import torch and transformers again (each
    # sets one torch thread first, as DataLoader workers do, so OpenMP is safe after the fork).
    torch.multiprocessing.start_processes(worker.run_process, args=(str(root), free_port()), nprocs=2, start_method="fork")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the processes, so that the bytes can be equal
    try:
        for case in ("whiten", "fisher-global", "svd-bfloat16"):
            worker.run_case(root, case, root / f"{case}-single")
        assert worker.run_cli(root, root / "cli-single") == 0
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("case", ["whiten", "fisher-global", "svd-bfloat16"])
def test_two_processes_write_the_bytes_of_one(runs, case):
    single, distributed = _files(runs / f"{case}-single"), _files(runs / f"{case}-distributed")
    blocks = 5 if case != "svd-bfloat16" else 3
    assert distributed.keys() == single.keys() and f"model-{blocks + 1:05d}-of-{blocks + 1:05d}.safetensors" in single
    assert [name for name in single if distributed[name] != single[name]] == []
    # Each process wrote its own blocks (round robin), process 0 the rest.
    written = [json.loads((runs / f"{case}-rank{rank}.json").read_text())["written"] for rank in (0, 1)]
    assert written == [list(range(0, blocks, 2)), list(range(1, blocks, 2))]
    assert not list(runs.glob(f".{case}-distributed.*"))  # nothing left beside the output


@pytest.mark.parametrize(
    "case, message",
    [
        ("compressed-propagation", "--propagate compressed .* run it in one process"),
        ("resume", "several processes cannot resume; resume it in one process .*, or pass --overwrite"),
        ("too-few-batches", "1 calibration batches cannot be shared by 2 processes"),
    ],
)
def test_what_two_processes_cannot_do_is_one_line_error_on_both(runs, case, message):
    for rank in (0, 1):
        error = json.loads((runs / f"{case}-rank{rank}.json").read_text())["error"]
        assert "\n" not in error
        assert re.search(message, error), error
    assert not (runs / f"{case}-distributed").exists()


def test_the_owner_sums_in_batch_order_which_partial_sums_would_not():
    """The byte comparison above can fail: added per-process partial sums give other bits.

    (Activations of very different sizes in different batches: with similar ones a float64 sum of a
    few float32 products is often exact, whatever the order.)
    """
    layer = torch.nn.Sequential(torch.nn.Linear(8, 4))
    generator = torch.Generator().manual_seed(1)
    scales = [1.0, 1e-6, 1e4, 1e-3, 1e6, 1e-2]
    batches = [scale * torch.randn(3, 5, 8, generator=generator) for scale in scales]
    first, second = Group(rank=1, world=2).batch_counts(len(batches))  # process 0: batches 0-2, process 1: 3-5

    def pieces(indices, per_batch):
        with torch.no_grad():
            return collect_pieces(layer, ["0"], len(indices), lambda b: layer(batches[indices[b]]), per_batch=per_batch)

    whole = flatten(pieces(range(6), per_batch=False)[0])  # one process
    owner = pieces(range(first), per_batch=False)[0]
    for piece in pieces(range(first, first + second), per_batch=True):  # what the owner does
        add_flat_(owner, flatten(piece))
    assert torch.equal(flatten(owner), whole)
    partial = pieces(range(first), per_batch=False)[0]
    add_flat_(partial, flatten(pieces(range(first, first + second), per_batch=False)[0]))
    assert not torch.equal(flatten(partial), whole)
    torch.testing.assert_close(flatten(partial), whole, rtol=1e-12, atol=0)  # ... in the last bits only


def test_torchrun_style_cli_run_writes_the_bytes_of_one_process_and_one_summary(runs):
    assert _files(runs / "cli-distributed") == _files(runs / "cli-single")
    printed = [(runs / f"cli-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert printed[0].count("whole model") == 1 and "whole model" not in printed[1]
    for text in printed:
        # Without --blockwise each process would compress the whole model to the same --out: refused.
        assert "exit 0\n" in text and text.endswith(
            "torchrun shares only --blockwise compression among processes; add --blockwise, or run without torchrun\nexit 2\n"
        )
    assert not (runs / "cli-in-memory").exists()
