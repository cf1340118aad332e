"""Healing hyperparameters: held-out validation KL of one compressed model under several healing configurations.

Run: ``nice python benchmarks/heal_sweep.py --configs lr=3e-4 lr=1e-3 lr=3e-3`` (the reference model,
``modegpt`` type III + ``global`` at 0.4). The model is compressed once (calibration: 64 × 256-token
windows of ``pycode-calib.txt``), the teacher's top-k distributions are cached once over enough training
windows for the longest configuration (sampled from ``pycode-calib.txt`` without its tail) and once over
``--validation-windows`` windows of that tail (never trained on); then every configuration heals a fresh
copy of the compressed model, measuring the top-k KL to the teacher on the validation windows before
training and every ``--eval-every`` steps. Configurations are chosen by that KL only, never by the
evaluation text (``pycode-eval.txt`` is not read here).

A configuration is ``key=value`` pairs joined by ``:``: ``lr``, ``steps``, ``batch``, ``warmup``,
``wd`` (weight decay), ``norms`` (0/1), ``clip`` (max grad norm), ``temperature`` (needs its own
cache, built on demand). *CPU s*: process CPU time (user + sys, all threads) of the training, plus the
teacher cache's CPU time for the windows that configuration reads (measured once, charged per window).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, machine_line, require_shared, write_markdown
from quality import resolve_model

import lowrank
from lowrank.allocation import strategy_needs_gradients
from lowrank.calibration import sample_windows, tokenize_stream
from lowrank.calibration.data import consecutive_windows
from lowrank.configs import parse_overrides
from lowrank.models import load_pretrained, load_tokenizer
from lowrank.train.heal import HealConfig, build_teacher_cache, heal, split_tokens

KEYS = {"lr": "learning_rate", "steps": "steps", "batch": "batch_size", "warmup": "warmup_steps", "wd": "weight_decay",
        "norms": "train_norms", "clip": "max_grad_norm", "temperature": "temperature"}  # fmt: skip


def parse_config(text: str, seq_len: int, top_k: int, eval_every: int, seed: int) -> HealConfig:
    """``lr=1e-3:steps=200`` → a :class:`HealConfig` (unnamed fields: the defaults)."""
    values = {}
    for pair in filter(None, text.split(":")):
        key, _, value = pair.partition("=")
        if key not in KEYS:
            raise SystemExit(f"unknown key {key!r} in {text!r}; use {', '.join(KEYS)}")
        field = KEYS[key]
        values[field] = bool(int(value)) if field == "train_norms" else (int(value) if field in ("steps", "batch_size", "warmup_steps") else float(value))
    config = HealConfig(seq_len=seq_len, top_k=top_k, eval_every=eval_every, seed=seed, **values)
    config.warmup_steps = min(config.warmup_steps, config.steps)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--method", default="modegpt")
    parser.add_argument("--strategy", default="global")
    parser.add_argument("--option", action="append", default=None, help="method option KEY=VALUE (default for modegpt: type III, o_proj metric)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--configs", nargs="+", required=True, help="healing configurations, e.g. lr=1e-3:steps=200")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=HealConfig.seq_len)
    parser.add_argument("--top-k", type=int, default=HealConfig.top_k)
    parser.add_argument("--validation-windows", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--output", default=None)
    parser.add_argument("--keep", default=None, help="directory keeping the compressed model and caches between runs (reused when present)")
    args = parser.parse_args()
    require_shared()
    if args.option is None:
        args.option = ["factored=fisher-whiten", "attention=value", "value_metric=o_proj"] if args.method == "modegpt" else []
    model_dir, model_name = resolve_model(args.model)
    output = args.output or f"heal-sweep-{model_name}-{args.ratio}"
    tokenizer = load_tokenizer(model_dir)
    calib_text = CALIB.read_text()
    calib_ids = tokenize_stream(tokenizer, calib_text)
    train_ids, tail = split_tokens(calib_ids, args.validation_windows * args.seq_len / calib_ids.numel())
    held_out = consecutive_windows(tail, args.seq_len, args.validation_windows)
    configs = [parse_config(text, args.seq_len, args.top_k, args.eval_every, args.seed) for text in args.configs]

    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="heal-sweep-"))
    label = "-".join([args.method, args.strategy, *args.option, str(args.num_samples), str(args.seed), str(args.ratio)]).replace("=", "")
    compressed_dir = keep / f"{model_name}-{label}"
    if not (compressed_dir / "config.json").is_file():
        spec = lowrank.get_method(args.method)
        stats = lowrank.calibrate(
            load_pretrained(model_dir), tokenizer, calib_text, num_samples=args.num_samples, seq_len=256, seed=args.seed,
            gradients=spec.needs_gradients or strategy_needs_gradients(args.strategy), weight_gradients=spec.needs_weight_gradients, progress=False,
        )  # fmt: skip
        model = load_pretrained(model_dir)
        method_config = parse_overrides(spec.config_class, args.option)
        plan = lowrank.allocate(model, args.ratio, method=args.method, stats=stats, strategy=args.strategy, method_config=method_config)
        report = lowrank.compress_(model, plan, method=args.method, stats=stats, config=method_config, progress=False)
        lowrank.save(model, compressed_dir, report=report, tokenizer=tokenizer, overwrite=True)
        del model, stats
    windows_needed = max(config.steps * config.batch_size for config in configs)
    windows = sample_windows(train_ids, windows_needed, args.seq_len, seed=args.seed)
    caches, validations, cache_cpu = {}, {}, {}
    rows = []
    for text, config in zip(args.configs, configs):
        if config.temperature not in caches:
            teacher = load_pretrained(model_dir)
            cpu = time.process_time()
            caches[config.temperature] = build_teacher_cache(
                teacher, windows, keep / f"teacher-{model_name}-{args.seed}-{windows_needed}-{args.seq_len}-{args.top_k}-{config.temperature}",
                top_k=args.top_k, temperature=config.temperature, teacher_name=str(model_dir), progress=False,
            )  # fmt: skip
            cache_cpu[config.temperature] = (time.process_time() - cpu) / windows_needed  # CPU s per window (0 when reused: then re-measured below)
            if cache_cpu[config.temperature] < 1e-4:  # a reused cache: time the teacher on a few windows
                cpu = time.process_time()
                build_teacher_cache(teacher, windows[:32], keep / "teacher-timing", top_k=args.top_k, temperature=config.temperature, progress=False)
                cache_cpu[config.temperature] = (time.process_time() - cpu) / 32
            validations[config.temperature] = build_teacher_cache(
                teacher, held_out, keep / f"validation-{model_name}-{args.seq_len}-{args.top_k}-{config.temperature}-{args.validation_windows}",
                top_k=args.top_k, temperature=config.temperature, teacher_name=str(model_dir), progress=False,
            )  # fmt: skip
            del teacher
        student = lowrank.load(compressed_dir)
        cpu = time.process_time()
        history = heal(student, caches[config.temperature], config, progress=False, validation=validations[config.temperature])
        train_cpu = time.process_time() - cpu
        total_cpu = train_cpu + cache_cpu[config.temperature] * config.steps * config.batch_size
        start_kl = history.validation[0][1]
        best_kl = dict(history.validation)[history.best_step]
        trace = " ".join(f"{step}:{kl:.4f}" for step, kl in history.validation)
        rows.append((text, config, start_kl, best_kl, history.best_step, train_cpu, total_cpu, history.trainable_parameters, trace))
        print(f"{text}: held-out KL {start_kl:.4f} → {best_kl:.4f} (step {history.best_step}) CPU {train_cpu:.0f} + cache = {total_cpu:.0f} s; {trace}", flush=True)
        write_results(args, output, model_name, rows, windows_needed)
        del student


def write_results(args, output, model_name, rows, windows_needed) -> None:
    command = " ".join(["nice python benchmarks/heal_sweep.py", *sys.argv[1:]])
    name = f"{args.method} + {args.strategy}" + "".join(f" ({option})" for option in args.option)
    lines = [
        f"# Healing hyperparameters: {name} at {args.ratio} on {model_name}",
        "",
        f"Command: `{command}`. Machine: {machine_line()}, shared with other jobs.",
        f"Compression: {name} at ratio {args.ratio}, calibrated on {args.num_samples} × 256-token windows of `pycode-calib.txt` (seed {args.seed}).",
        f"Healing: top-{args.top_k} teacher cache, {args.seq_len}-token training windows sampled from `pycode-calib.txt` without its last"
        f" {args.validation_windows} × {args.seq_len} tokens (seed {args.seed}); *held-out KL*: the top-k KL to the teacher on those"
        f" {args.validation_windows} tail windows (never trained on), before training and every {args.eval_every} steps; the best"
        " measurement's parameters are kept (*kept step*). No evaluation text is read: this table chooses hyperparameters.",
        "*CPU s*: the process's CPU time (user + sys, all threads) for the training plus the teacher cache's CPU time per window"
        " times the windows the configuration reads; 1200 CPU s is the budget of 10 minutes on 2 cores.",
        "Defaults for keys a configuration does not name: "
        + ", ".join(f"{key}={getattr(HealConfig, field)}" for key, field in KEYS.items() if key != "temperature")
        + " (warm-up linear, then cosine decay to 10 %).",
        "",
        "| configuration | tokens/step | trainable parameters | held-out KL start | kept | kept step | train CPU s | total CPU s | trace (step:KL) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for text, config, start_kl, best_kl, best_step, train_cpu, total_cpu, trainable, trace in rows:
        lines.append(
            f"| `{text}` | {config.batch_size * config.seq_len} | {trainable:,} | {start_kl:.4f} | **{best_kl:.4f}** | {best_step} | {train_cpu:.0f} | {total_cpu:.0f} | {trace} |"
        )
    write_markdown(output, "\n".join(lines) + "\n", echo=False)


if __name__ == "__main__":
    main()
