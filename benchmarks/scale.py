"""Block-by-block compression of a ~1 B-parameter Llama that is never whole in memory.

Run: ``python benchmarks/scale.py`` (about 30 minutes on 2 cores; needs ~8 GB of free disk in
``--workdir``). Generates a TinyLlama-shaped model (hidden 2048, MLP 5632, 22 layers, 4 key/value
heads; 1.1 B parameters) with random weights, saves it in float32 shards, then compresses it with
``lowrank.blockwise.compress_blockwise`` in a fresh process (default: the CLI's recipe for causal
LMs, ``fisher-whiten`` + ``--allocate global`` with dense propagation; ``--device cuda`` on a GPU)
and records wall time, the time of each phase and per block, peak resident memory (target: under
35 % of the checkpoint's size; peak GPU memory on CUDA). Writes
``benchmarks/results/scale.md``. Nothing here needs ../shared: calibration uses seeded random token
windows, which exercise the same code and cost the same as text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402

GENERATE = """
import torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(hidden_size={hidden}, intermediate_size={intermediate}, num_hidden_layers={layers},
    num_attention_heads={heads}, num_key_value_heads={kv_heads}, vocab_size={vocab}, tie_word_embeddings=False,
    architectures=["LlamaForCausalLM"])
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu")
for name, parameter in model.named_parameters():  # what from_config's init does, without its slow per-module pass
    if parameter.ndim == 2:
        torch.nn.init.normal_(parameter, std=0.02)
    else:
        torch.nn.init.ones_(parameter)
model.save_pretrained(r"{path}", max_shard_size="1GB")
print(sum(p.numel() for p in model.parameters()))
"""

COMPRESS = """
import json, time
def peak_rss():  # this process's own high-water mark; ru_maxrss would include the parent's, inherited through vfork + exec
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
import torch
from lowrank.blockwise import CheckpointReader, compress_blockwise
from lowrank.methods import get_method
baseline = peak_rss()
generator = torch.Generator().manual_seed(0)
ids = [torch.randint(0, {vocab}, ({batch}, {seq_len}), generator=generator) for _ in range({windows} // {batch})]
batches = [{{"input_ids": x, "labels": x}} for x in ids]  # labels: the next-token loss that global allocation back-propagates
seconds, phases = [], {{}}
start = time.perf_counter()
spec = get_method("{method}")
config = spec.config_class(**({{"precision": "{precision}"}} if "{precision}" else {{}}))
report = compress_blockwise(r"{path}", r"{out}", {ratio}, method="{method}", config=config, strategy="{allocate}",
                            batches=batches if spec.needs_statistics else None, propagate="{propagate}", progress=False,
                            device="{device}", on_block=lambda index, s: seconds.append(s), on_phase=phases.__setitem__)
wall = time.perf_counter() - start
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and "{device}".startswith("cuda") else None
print(json.dumps({{"wall": wall, "seconds": seconds, "phases": phases, "gpu_peak": gpu, "precision": config.precision, "peak": peak_rss(),
                  "baseline": baseline, "checkpoint": CheckpointReader(r"{path}").num_bytes, "parameters": report.parameters}}))
"""


def python(code: str, threads: int) -> str:
    # OpenMP threads that spin-wait made factorizations up to 40× slower at 2 threads on a busy
    # machine; the lowrank command sets PASSIVE before torch starts, and so does this.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--method", default="fisher-whiten", help="default: the CLI's recipe for causal LMs")
    parser.add_argument("--allocate", default="global", help="uniform or global (default: the CLI's)")
    parser.add_argument("--propagate", default="dense", help="dense (the CLI's default) or compressed")
    parser.add_argument("--precision", default="", help="the factorization's precision option (default: the method's)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is present")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/lowrank-scale")
    parser.add_argument("--output", default="scale")
    args = parser.parse_args()

    work = Path(args.workdir)
    dense, out = work / "dense", work / "compressed"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    parameters = int(python(GENERATE.format(path=dense, **vars(args)), args.threads))
    generate_seconds = time.perf_counter() - start
    measured = json.loads(python(COMPRESS.format(path=dense, out=out, **vars(args)), args.threads))
    output_bytes = sum(file.stat().st_size for file in out.glob("*.safetensors"))
    shards = len(list(dense.glob("*.safetensors")))
    shutil.rmtree(work, ignore_errors=True)

    gb = 1e9
    seconds = measured["seconds"]
    counts = measured["parameters"]
    rows = [
        (
            "model",
            f"Llama, hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, vocabulary {args.vocab}",
        ),
        ("parameters", f"{parameters / 1e9:.2f} B"),
        ("checkpoint", f"{measured['checkpoint'] / gb:.2f} GB float32 in {shards} shards (generated in {generate_seconds:.0f} s)"),
        ("compression", f"`{args.method}` at ratio {args.ratio}, precision {measured['precision']}, `--allocate {args.allocate}`, on {args.device}"),
        ("calibration", f"{args.windows} windows × {args.seq_len} tokens (seeded random tokens), propagated through the {args.propagate} blocks"),
        ("wall time", f"{measured['wall']:.0f} s ({args.threads} threads)"),
        ("phases", ", ".join(f"{name} {value:.0f} s" for name, value in measured["phases"].items())),
        (
            "time per block",
            f"{(measured['phases'].get('gradients', 0) + measured['phases']['blocks']) / args.layers:.1f} s (first pass and factoring pass);"
            f" factoring pass per block: mean {sum(seconds) / len(seconds):.1f} s, min {min(seconds):.1f} s, max {max(seconds):.1f} s",
        ),
        ("peak RSS", f"**{measured['peak'] / gb:.2f} GB = {measured['peak'] / measured['checkpoint']:.1%} of the checkpoint** (target < 35 %)"),
        ("of which the interpreter", f"{measured['baseline'] / gb:.2f} GB (torch + transformers + lowrank imported, before any work)"),
        (
            "targeted weights",
            f"{counts['targeted_before'] / 1e9:.3f} B → {counts['targeted_after'] / 1e9:.3f} B ({1 - counts['targeted_after'] / counts['targeted_before']:.1%} removed)",
        ),
        ("output", f"{output_bytes / gb:.2f} GB"),
    ]
    if measured["gpu_peak"] is not None:
        rows.append(("peak GPU memory", f"{measured['gpu_peak'] / gb:.2f} GB"))
    load = os.getloadavg()
    lines = [
        "# Block-by-block compression at scale",
        "",
        f"Command: `python benchmarks/scale.py` ({' '.join(sys.argv[1:]) or 'defaults'}). Machine: {machine_line()};"
        f" load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; above 2, the cores were shared with other jobs and times are upper bounds).",
        "The compressing process builds the model on the `meta` device and reads one block at a time from the shards;"
        " peak RSS is the compressing process's own high-water mark (`VmHWM`).",
        "",
        "| quantity | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    write_markdown(args.output, "\n".join(lines))


if __name__ == "__main__":
    main()
