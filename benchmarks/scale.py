"""Block-by-block compression of a ~1 B-parameter Llama that is never whole in memory.

Run: ``python benchmarks/scale.py`` (about 30 minutes on 2 cores; needs ~8 GB of free disk in
``--workdir``). Generates a TinyLlama-shaped model (hidden 2048, MLP 5632, 22 layers, 4 key/value
heads; 1.1 B parameters) with random weights, saves it in float32 shards, then compresses it with
``lowrank.blockwise.compress_blockwise`` in a fresh process and records wall time, peak resident
memory (target: under 35 % of the checkpoint's size) and the time per block. Writes
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
batches = [{{"input_ids": torch.randint(0, {vocab}, ({batch}, {seq_len}), generator=generator)}} for _ in range({windows} // {batch})]
seconds = []
start = time.perf_counter()
spec = get_method("{method}")
report = compress_blockwise(r"{path}", r"{out}", {ratio}, method="{method}", config=spec.config_class(precision="{precision}"),
                            batches=batches if spec.needs_statistics else None, propagate="compressed", progress=False,
                            on_block=lambda index, s: seconds.append(s))
wall = time.perf_counter() - start
print(json.dumps({{"wall": wall, "seconds": seconds, "peak": peak_rss(),
                  "baseline": baseline, "checkpoint": CheckpointReader(r"{path}").num_bytes, "parameters": report.parameters}}))
"""


def python(code: str, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
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
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--precision", default="float32", help="dtype of the factorization (float32 or float64)")
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
        ("compression", f"`{args.method}` at ratio {args.ratio}, factorized in {args.precision}, uniform allocation"),
        ("calibration", f"{args.windows} windows × {args.seq_len} tokens, propagated through the compressed blocks"),
        ("wall time", f"{measured['wall']:.0f} s ({args.threads} threads)"),
        ("time per block", f"mean {sum(seconds) / len(seconds):.1f} s, min {min(seconds):.1f} s, max {max(seconds):.1f} s"),
        ("peak RSS", f"**{measured['peak'] / gb:.2f} GB = {measured['peak'] / measured['checkpoint']:.1%} of the checkpoint** (target < 35 %)"),
        ("of which the interpreter", f"{measured['baseline'] / gb:.2f} GB (torch + transformers + lowrank imported, before any work)"),
        (
            "targeted weights",
            f"{counts['targeted_before'] / 1e9:.3f} B → {counts['targeted_after'] / 1e9:.3f} B ({1 - counts['targeted_after'] / counts['targeted_before']:.1%} removed)",
        ),
        ("output", f"{output_bytes / gb:.2f} GB"),
    ]
    lines = [
        "# Block-by-block compression at scale",
        "",
        f"Command: `python benchmarks/scale.py` ({' '.join(sys.argv[1:]) or 'defaults'}). Machine: {machine_line()}.",
        "The compressing process builds the model on the `meta` device and reads one block at a time from the shards;"
        " peak RSS is the compressing process's own high-water mark (`VmHWM`). No GPU was available to this run, so the GPU and 7B-shaped rows are absent.",
        "",
        "| quantity | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    write_markdown(args.output, "\n".join(lines))


if __name__ == "__main__":
    main()
