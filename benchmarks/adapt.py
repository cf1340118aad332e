"""Adapting the code model to English documentation: which initialization learns, which forgets.

Run:  python benchmarks/adapt.py   (34 minutes on a busy shared 2-core CPU at the defaults;
      `--steps 50 --batch-size 4` takes about a quarter of that)

Every variant trains the same number of steps on ``pydocs-train.txt`` with the same adapter rank
on every linear layer of the blocks, in its own subprocess (so peak memory is its own), then
reports perplexity on ``pydocs-eval.txt`` (learning) and ``pycode-eval.txt`` (forgetting).
Writes ``benchmarks/results/adapt.md``.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWRANK_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "pycode-llama"
DATA = SHARED / "data"
RESULT = REPO / "benchmarks" / "results" / "adapt.md"

VARIANTS = ["dense", "lora", "principal", "minor", "covariance-instruction", "covariance-knowledge", "singular-value", "full", "welore"]
DESCRIPTIONS = {
    "dense": "no training (reference)",
    "lora": "random-init LoRA via `peft.get_peft_model`",
    "principal": "PiSSA: top-r triplets as adapter",
    "minor": "MiLoRA: bottom-r triplets as adapter",
    "covariance-instruction": "CorDA instruction-previewed (C from pydocs-train)",
    "covariance-knowledge": "CorDA knowledge-preserving (C from pycode-calib)",
    "singular-value": "SVFit/SALT: scale+shift top-r σ, rank-r LoRA on rest",
    "full": "full fine-tuning (every parameter)",
    "welore": "WeLore: whiten-compress 40 %, train the factors",
}


def read(name: str, limit: int | None = None) -> str:
    text = (DATA / name).read_text()
    return text[:limit] if limit else text


def prepare(variant: str, args, tokenizer):
    """Load the fixture and make ``variant``'s parameters trainable; returns the model to train."""
    import peft

    import lowrank
    from lowrank import adapt
    from lowrank.models import load_pretrained

    model = load_pretrained(FIXTURE)
    targets = lowrank.find_targets(model)
    calibrate = lambda text: lowrank.calibrate(model, tokenizer, text, num_samples=32, seq_len=128, progress=False)  # noqa: E731
    if variant == "dense":
        return model
    if variant == "lora":
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=targets)
        return peft.get_peft_model(model, config)
    if variant == "full":
        return model.requires_grad_(True)
    if variant == "welore":
        stats = calibrate(read("pycode-calib.txt"))
        plan = lowrank.allocate(model, 0.4, method="whiten", stats=stats)
        lowrank.compress_(model, plan, method="whiten", stats=stats, progress=False)
        adapt.prepare_welore_(model)
        return model
    configs = {
        "principal": adapt.PrincipalConfig(rank=args.rank),
        "minor": adapt.MinorConfig(rank=args.rank),
        "covariance-instruction": adapt.CovarianceConfig(rank=args.rank, mode="instruction"),
        "covariance-knowledge": adapt.CovarianceConfig(rank=args.rank, mode="knowledge"),
        "singular-value": adapt.SingularValueConfig(rank=args.rank),
    }
    stats = None
    if variant == "covariance-instruction":
        stats = calibrate(read("pydocs-train.txt"))
    elif variant == "covariance-knowledge":
        stats = calibrate(read("pycode-calib.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adapt.adapt_(model, configs[variant], stats=stats)
    return model


def run_variant(variant: str, args) -> dict:
    """Train and evaluate one variant in this process; returns its row as a dict."""
    import lowrank
    from lowrank import adapt
    from lowrank.models import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(FIXTURE)
    start = time.perf_counter()
    model = prepare(variant, args, tokenizer)
    prepare_seconds = time.perf_counter() - start
    summary = adapt.trainable_summary(model)
    row = {"variant": variant, "trainable": summary.trainable_parameters, "prepare_s": prepare_seconds}
    if variant != "dense":
        config = adapt.FinetuneConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            learning_rate=args.full_lr if variant in ("full", "welore") else args.lr,
            warmup_steps=10,
        )
        result = adapt.finetune(model, tokenizer, read("pydocs-train.txt"), config, progress=False)
        row.update(
            steps_per_second=result.steps_per_second,
            optimizer_mb=result.optimizer_bytes / 2**20,
            first_loss=sum(result.losses[:10]) / len(result.losses[:10]),
            last_loss=sum(result.losses[-10:]) / len(result.losses[-10:]),
            learning_rate=config.learning_rate,
        )
    for name in ("pydocs-eval", "pycode-eval"):
        row[name] = lowrank.perplexity(model, tokenizer, read(f"{name}.txt", 400_000), seq_len=256, max_windows=args.eval_windows, progress=False)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def randomized_accuracy(rank: int, threads: int) -> list[list[str]]:
    """Top-r reconstruction error of randomized vs exact SVD on all 42 fixture matrices."""
    import lowrank
    from lowrank.adapt import principal_factors
    from lowrank.models import load_pretrained

    torch.set_num_threads(threads)
    model = load_pretrained(FIXTURE)
    weights = [model.get_submodule(name).weight.detach() for name in lowrank.find_targets(model)]

    def timed(function):
        start = time.perf_counter()
        errors = [(w.double() - function(w).dense()).norm().item() for w in weights]
        return errors, time.perf_counter() - start

    exact, exact_seconds = timed(lambda w: principal_factors(w, rank))
    rows = [["exact (torch.linalg.svd)", "-", "0", "0", f"{exact_seconds:.2f}", "1.00"]]
    for iterations in (0, 1, 2, 4):
        errors, seconds = timed(lambda w: principal_factors(w, rank, svd="randomized", power_iterations=iterations))
        excess = [e / x - 1 for e, x in zip(errors, exact)]
        rows.append(
            [
                "randomized",
                str(iterations),
                f"{100 * sum(excess) / len(excess):.3f} %",
                f"{100 * max(excess):.3f} %",
                f"{seconds:.2f}",
                f"{exact_seconds / seconds:.2f}",
            ]
        )
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r of every variant")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapters")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning and WeLore")
    parser.add_argument("--eval-windows", type=int, default=24, help="256-token windows of each evaluation text")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--variants", nargs="*", default=VARIANTS, help="subset of variants to run")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()

    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)))
        return

    rows = []
    forwarded = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}", f"--rank={args.rank}"]
    forwarded += [f"--lr={args.lr}", f"--full-lr={args.full_lr}", f"--eval-windows={args.eval_windows}", f"--threads={args.threads}"]
    for variant in args.variants:
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, __file__, f"--variant={variant}", *forwarded], capture_output=True, text=True)
        line = next((line for line in completed.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{completed.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT ") :]))
        print(f"{variant}: {rows[-1]} ({time.perf_counter() - started:.0f} s)", flush=True)

    lora = next((row for row in rows if row["variant"] == "lora"), None)
    body = []
    for row in rows:
        trained = "steps_per_second" in row
        forgetting = f"{row['pycode-eval']:.2f}"
        if lora and row["variant"] != "lora" and trained:
            forgetting += " (less than LoRA)" if row["pycode-eval"] < lora["pycode-eval"] else ""
        body.append(
            [
                f"`{row['variant']}`",
                DESCRIPTIONS[row["variant"]],
                f"{row['pydocs-eval']:.2f}",
                forgetting,
                f"{row['trainable']:,}",
                f"{row['optimizer_mb']:.2f}" if trained else "-",
                f"{row['peak_rss_mb']:.0f}",
                f"{row['steps_per_second']:.2f}" if trained else "-",
                f"{row['first_loss']:.2f} → {row['last_loss']:.2f}" if trained else "-",
                f"{row['learning_rate']:g}" if trained else "-",
            ]
        )
    headers = ["variant", "what", "pydocs-eval ppl ↓ (learning)", "pycode-eval ppl ↓ (forgetting)", "trainable params",
               "AdamW state MB", "peak RSS MB", "steps/s", "train loss (first 10 → last 10)", "lr"]
    accuracy = randomized_accuracy(args.rank, args.threads)
    text = f"""# Adapting the code model to English documentation

`python benchmarks/adapt.py` — fixture `pycode-llama` (7.2 M parameters, dense perplexity 12.93 on
all of pycode-eval, 51.4 on all of pydocs-eval), trained on `pydocs-train.txt`.

Setup (the same for every variant, measured in one run): {args.steps} AdamW steps of {args.batch_size} windows ×
{args.seq_len} tokens (linear warmup 10 steps, cosine decay to 10 %), rank r = {args.rank} on all 42 linear
layers of the 6 blocks, learning rate {args.lr:g} for the adapters and {args.full_lr:g} for full fine-tuning and
WeLore (every parameter of the matrix trains there). Perplexity on the first {args.eval_windows} non-overlapping
256-token windows of each evaluation text (not the whole file, so the dense row differs from the
full-file numbers). Each variant runs in its own process with {args.threads} torch thread(s) on a shared
2-core CPU machine: peak RSS is that process's maximum resident memory (model, data, optimizer),
steps/s is noisy in absolute terms — compare ratios. "AdamW state MB" is exact (the optimizer's
moment tensors). CorDA covariances come from 32 × 128-token windows: pydocs-train for the
instruction-previewed mode (the task), pycode-calib for the knowledge-preserving mode (what to keep).
WeLore compresses 40 % of the block weights with `whiten` (calibrated on pycode-calib) before training.

{table(headers, body)}

## Randomized SVD against the exact one (rank {args.rank}, all 42 fixture matrices, float64)

Excess error = ‖W − W_r^randomized‖_F / ‖W − W_r^exact‖_F − 1 (oversampling 8). The residual base is
always W − BA, so every variant is exact at step 0; the randomized SVD only changes which subspace
the adapter starts in.

{table(["svd", "power iterations", "mean excess error", "max excess error", "seconds (42 matrices)", "speed-up"], accuracy)}
"""
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
