"""Healing: held-out perplexity of a compressed model against distillation steps and wall time.

Run: ``nice python benchmarks/heal.py`` (the reference model, fisher-whiten + global at 0.4 and 0.6)
or ``nice python benchmarks/heal.py --model smollm2 --ratios 0.2,0.4`` (SmolLM2-135M-Instruct, held-out
Python and English documentation); ``--method lowrank-quant --strategy uniform --option bits=4`` heals
another structure (its quantized codes stay fixed, its factors train). For every calibration seed and
ratio the model is compressed (default: ``fisher-whiten`` + ``global``; calibration: 64 × 256-token
windows of ``pycode-calib.txt``, skipped for a method and allocation that read none), saved, and for every
step count loaded fresh and healed (:func:`lowrank.train.heal.heal`: the teacher's top-k cache over
``steps × batch`` windows of ``pycode-calib.txt``, or ``--cache-windows`` of them read in epochs, then AdamW
on the factors and norms), saved,
loaded again (the logits must equal the healed model's) and evaluated on held-out text only
(``pycode-eval.txt``, ``pydocs-eval.txt``). Heal time = teacher loading and cache (training and held-out
windows), student loading, training and its held-out KL measurements, on the threads stated; *CPU s* is the same
span's process CPU time (user + sys, all threads), which 1200 CPU s (10 minutes on 2 cores) bounds.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown
from quality import mean, resolve_model, spread

import lowrank
from lowrank.allocation import strategy_needs_gradients
from lowrank.calibration import sample_windows, tokenize_stream
from lowrank.calibration.data import consecutive_windows
from lowrank.configs import parse_overrides
from lowrank.methods.registry import output_gram_layers
from lowrank.models import load_pretrained, load_tokenizer
from lowrank.train.heal import HealConfig, build_teacher_cache, heal, split_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--method", default="fisher-whiten", help="compression method (lowrank.get_method name)")
    parser.add_argument("--strategy", default="global", help="rank allocation strategy")
    parser.add_argument("--option", action="append", default=[], help="method option KEY=VALUE (repeatable), e.g. bits=4")
    parser.add_argument("--ratios", default="0.4,0.6")
    parser.add_argument(
        "--steps", default="100,300",
        help="comma-separated step counts (each a run of its own, from the compressed model); RATIO:STEPS applies to that ratio only, e.g. 0.4:1650,0.6:2100",
    )  # fmt: skip
    parser.add_argument("--seeds", default="0", help="calibration (and healing) seeds; several give mean ± half range")
    parser.add_argument("--lr", type=float, default=HealConfig.learning_rate)
    parser.add_argument("--batch-size", type=int, default=HealConfig.batch_size)
    parser.add_argument("--seq-len", type=int, default=HealConfig.seq_len)
    parser.add_argument("--top-k", type=int, default=HealConfig.top_k)
    parser.add_argument("--temperature", type=float, default=HealConfig.temperature)
    parser.add_argument("--warmup", type=int, default=HealConfig.warmup_steps)
    parser.add_argument("--no-norms", action="store_true", help="train the factors only")
    parser.add_argument("--hard-weight", type=float, default=HealConfig.hard_weight, help="weight of the next-token cross-entropy in the loss")
    parser.add_argument(
        "--validation-windows", type=int, default=0,
        help="early stopping on this many windows held out from the end of pycode-calib.txt (never trained on; 0: off)",
    )  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out KL measurements (with --validation-windows)")
    parser.add_argument(
        "--validation-seq-len", type=int, default=None,
        help="tokens per held-out window (default: --seq-len); a fixed length keeps held-out KLs comparable across training window lengths",
    )  # fmt: skip
    parser.add_argument(
        "--cache-windows", type=int, default=None,
        help="training windows the teacher runs on (default: steps × batch, each read once); fewer are read in epochs, which saves teacher passes",
    )  # fmt: skip
    parser.add_argument(
        "--cache-sampling", choices=["random", "tiled"], default="random",
        help="random: training windows at seeded random offsets (they overlap); tiled: the training text cut into non-overlapping windows"
        " from a seeded offset, in seeded random order (each token at most once, so fewer teacher windows cover the text)",
    )  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows of the compression")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows of pycode-eval only")
    parser.add_argument("--docs-windows", type=int, default=200, help="windows of pydocs-eval.txt (0: skip)")
    parser.add_argument("--output", default=None, help="results file name (default: heal, or heal-<model>)")
    parser.add_argument("--keep", default=None, help="directory keeping the compressed models between runs (reused when present)")
    args = parser.parse_args()
    require_shared()
    ratios = [float(r) for r in args.ratios.split(",")]
    step_counts = parse_steps(args.steps, ratios)
    seeds = [int(s) for s in args.seeds.split(",")]
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("heal" if args.model == "reference" else f"heal-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    calib_text, eval_text, docs_text = CALIB.read_text(), EVAL.read_text(), DOCS.read_text()
    calib_ids = tokenize_stream(tokenizer, calib_text)
    train_ids, held_out = calib_ids, None
    if args.validation_windows:  # the tail of the calibration text, never the evaluation text
        validation_seq_len = args.validation_seq_len or args.seq_len
        train_ids, tail = split_tokens(calib_ids, args.validation_windows * validation_seq_len / calib_ids.numel())
        held_out = consecutive_windows(tail, validation_seq_len, args.validation_windows)
    probe = tokenize_stream(tokenizer, eval_text)[:256][None]  # one held-out window for the save → load check

    def measure(model) -> tuple[float, float | None]:
        """Held-out perplexity on Python code, and on the documentation text (``None`` with ``--docs-windows 0``)."""
        code = lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
        docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False) if args.docs_windows else None
        return code, docs

    def describe(code: float, docs: float | None) -> str:
        return f"pycode {code:.3f}" + (f" pydocs {docs:.3f}" if docs is not None else "")

    dense_code, dense_docs = measure(load_pretrained(model_dir))
    print(f"dense: {describe(dense_code, dense_docs)}", flush=True)
    spec = lowrank.get_method(args.method)
    method_config = parse_overrides(spec.config_class, args.option)
    needs_stats = needs_calibration(args)
    gradients = spec.needs_gradients or strategy_needs_gradients(args.strategy)
    # (ratio, steps) → per seed (code, docs, seconds, final loss, CPU seconds, kept step, teacher windows, held-out KL start, kept)
    results: dict[tuple[float, int], list[tuple]] = {}
    storage: dict[float, tuple[float, float]] = {}  # ratio → (bits per targeted weight, removed against bfloat16)
    max_logit_difference = 0.0
    workspace = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    keep = Path(args.keep) if args.keep else workspace
    label = "-".join([args.method, args.strategy, *args.option, str(args.num_samples)]).replace("=", "")
    for seed in seeds:
        stats = None
        for ratio in ratios:
            # Without calibration the compressed model does not depend on the seed: compress it once.
            compressed_dir = keep / f"{model_name}-{label}-{seed if needs_stats else 'any'}-{ratio}"
            if (compressed_dir / "config.json").is_file():
                model, report = lowrank.load(compressed_dir, return_report=True)
            else:
                if needs_stats and stats is None:
                    dense = load_pretrained(model_dir)
                    stats = lowrank.calibrate(
                        dense, tokenizer, calib_text, num_samples=args.num_samples, seq_len=256, seed=seed,
                        gradients=gradients, weight_gradients=spec.needs_weight_gradients, progress=False,
                        output_gram=output_gram_layers(spec, dense, lowrank.find_targets(dense), method_config) if gradients else (),
                    )  # fmt: skip
                    del dense
                model = load_pretrained(model_dir)
                start = time.perf_counter()
                plan = lowrank.allocate(model, ratio, method=args.method, stats=stats, strategy=args.strategy, method_config=method_config)
                report = lowrank.compress_(model, plan, method=args.method, stats=stats, config=method_config, progress=False)
                print(f"compressed {args.method} + {args.strategy} at {ratio} in {time.perf_counter() - start:.0f} s", flush=True)
                lowrank.save(model, compressed_dir, report=report, tokenizer=tokenizer, overwrite=True)
            counts = report.parameters
            bits = counts["targeted_bits_after"] / counts["targeted_before"]
            storage[ratio] = (bits, 1 - bits / 16)
            code, docs = measure(model)
            results.setdefault((ratio, 0), []).append((code, docs, 0.0, float("nan"), 0.0, 0, 0, None, None))
            print(f"seed {seed} ratio {ratio} ({bits:.2f} bits/weight) steps 0: {describe(code, docs)}", flush=True)
            del model
            for steps in step_counts[ratio]:
                config = HealConfig(
                    steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=min(args.warmup, steps),
                    temperature=args.temperature, top_k=args.top_k, train_norms=not args.no_norms, hard_weight=args.hard_weight, seed=seed,
                    eval_every=args.eval_every if held_out is not None else 0,
                )  # fmt: skip
                windows = training_windows(
                    train_ids,
                    min(steps * config.batch_size, args.cache_windows or steps * config.batch_size),
                    config.seq_len,
                    args.cache_sampling,
                    seed,
                )
                teacher_windows = len(windows)
                start, cpu_start = time.perf_counter(), time.process_time()
                teacher = load_pretrained(model_dir)
                cache = build_teacher_cache(
                    teacher, windows, workspace / "teacher", top_k=config.top_k, temperature=config.temperature,
                    batch_size=config.batch_size, teacher_name=str(model_dir), progress=False,
                )  # fmt: skip
                validation = None
                if held_out is not None:
                    validation = build_teacher_cache(
                        teacher, held_out, workspace / "validation", top_k=config.top_k, temperature=config.temperature,
                        batch_size=config.batch_size, teacher_name=str(model_dir), progress=False,
                    )  # fmt: skip
                del teacher
                student, student_report = lowrank.load(compressed_dir, return_report=True)
                history = heal(student, cache, config, progress=False, validation=validation)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                healed_dir = workspace / "healed"
                lowrank.save(student, healed_dir, report=student_report, tokenizer=tokenizer, overwrite=True)
                reloaded = lowrank.load(healed_dir)
                with torch.no_grad():
                    difference = (reloaded(input_ids=probe).logits - student(input_ids=probe).logits).abs().max().item()
                max_logit_difference = max(max_logit_difference, difference)
                code, docs = measure(reloaded)
                kls = dict(history.validation)
                results.setdefault((ratio, steps), []).append(
                    (code, docs, seconds, history.mean_loss(last=10), cpu_seconds, history.best_step, teacher_windows, kls.get(0), kls.get(history.best_step))
                )  # fmt: skip
                print(
                    f"seed {seed} ratio {ratio} steps {steps}: {describe(code, docs)} heal {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU "
                    f"(cache {cache.meta['seconds']:.0f} s) KL {history.mean_loss(first=10):.4f} → {history.mean_loss(last=10):.4f} "
                    f"save→load max |Δlogit| {difference:.1e}"
                    + (
                        f" held-out {'loss' if args.hard_weight else 'KL'} {' '.join(f'{step}:{kl:.4f}' for step, kl in history.validation)} kept {history.best_step}"
                        if history.validation
                        else ""
                    ),
                    flush=True,
                )
                del student, reloaded
                # Every row pays for its own teacher pass: a cache reused from the previous row would leave it out of CPU s.
                shutil.rmtree(workspace / "teacher", ignore_errors=True)
                shutil.rmtree(workspace / "validation", ignore_errors=True)
                write_results(args, output, model_name, dense_code, dense_docs, results, storage, max_logit_difference, seeds)


def write_results(args, output, model_name, dense_code, dense_docs, results, storage, max_logit_difference, seeds) -> None:
    command = " ".join(["nice python benchmarks/heal.py", *sys.argv[1:]])
    windows = f"first {args.max_windows} windows" if args.max_windows else "all non-overlapping 256-token windows"
    docs = args.docs_windows > 0
    name = f"{args.method} + {args.strategy}" + "".join(f" ({option})" for option in args.option)
    validation_seq_len = args.validation_seq_len or args.seq_len
    lines = [
        f"# Healing {name} on {model_name}",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        f"Dense perplexity: **{dense_code:.2f}** on `pycode-eval.txt` ({windows})"
        + (
            f", **{dense_docs:.2f}** on the first {args.docs_windows} windows of `pydocs-eval.txt`."
            if docs
            else "; the documentation text (`pydocs-eval.txt`) was not measured (`--docs-windows 0`)."
        ),
        f"Compression: {name}"
        + (
            f", calibrated on {args.num_samples} × 256-token windows of `pycode-calib.txt`."
            if needs_calibration(args)
            else " (reads no calibration data)."
        )
        + f" Healing: top-{args.top_k} teacher cache at temperature {args.temperature}"
        + (f", loss (1 − {args.hard_weight})·KL + {args.hard_weight}·next-token cross-entropy" if args.hard_weight else "")
        + f", AdamW lr {args.lr} (warm-up {args.warmup}, cosine to 10 %),"
        f" {args.batch_size} × {args.seq_len}-token windows of `pycode-calib.txt` per step"
        + (
            (
                f" (the teacher cached on at most {args.cache_windows} windows"
                + (" at random offsets" if args.cache_sampling == "random" else ", non-overlapping tiles of the text in random order")
                + ", read in epochs in the same order; *teacher windows*), "
            )
            if args.cache_windows
            else " (each window read once; the teacher cached on all of them: *teacher windows*), "
        )
        + ("factors only." if args.no_norms else "factors and norms.")
        + (
            f" Early stopping: {'the training objective' if args.hard_weight else 'top-k KL to the teacher'} on {args.validation_windows} × {validation_seq_len}-token windows held out from the end of"
            f" `pycode-calib.txt` (never trained on), measured before training and every {args.eval_every} steps; the best is kept"
            f" (*kept step*; *held-out {'loss' if args.hard_weight else 'KL'}*: before training → at the kept step)."
            if args.validation_windows
            else ""
        )
        + f" Seeds {','.join(map(str, seeds))} (calibration and healing windows)"
        + (": a cell is the mean ± half the range." if len(seeds) > 1 else "."),
        (
            "Every perplexity is on held-out text (never the calibration file); each healed model was saved and loaded"
            f" before evaluation (largest |Δlogit| between the healed and the reloaded model: {max_logit_difference:.1e})."
        ),
        (
            "*bits/weight*: the compressed targeted weights' stored bits per weight; *vs bf16*: 1 − bits/weight / 16, the fraction"
            " removed against a bfloat16 dense model (the models load in float32, so `--ratio` counts against 32 bits). "
            "*heal s*: wall time of teacher loading, both teacher caches, student loading, training and the held-out KL"
            " measurements (compression, saving and evaluation excluded), on a machine shared with other jobs; *CPU s*: the CPU time"
            " (user + sys) this process used for the same span, all threads together: on a shared machine wall time"
            " overstates the cost, so 1200 CPU s counts as the budget of 10 minutes on 2 cores;"
            " *final KL*: the distillation loss (top-k KL to the teacher) of the last 10 training steps, on training windows."
        ),
        "",
        f"| ratio | bits/weight | vs bf16 | steps | teacher windows | kept step | held-out {'loss' if args.hard_weight else 'KL'} | pycode ppl | × dense |"
        + (" pydocs ppl | × dense |" if docs else "")
        + " heal s | CPU s | final KL |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if docs else "") + "---|---|---|",
    ]
    for (ratio, steps), runs in sorted(results.items()):
        codes = [run[0] for run in runs]
        kls = [f"{run[7]:.4f} → {run[8]:.4f}" for run in runs if run[7] is not None and run[8] is not None]
        cells = [
            f"{ratio:.2f}", f"{storage[ratio][0]:.2f}", f"{storage[ratio][1]:.3f}", str(steps), "/".join(str(run[6]) for run in runs),
            "/".join(str(run[5]) for run in runs), "; ".join(kls) or "—", spread(codes), f"{mean(codes) / dense_code:.3f}",
        ]  # fmt: skip
        if docs:
            docs_values = [run[1] for run in runs]
            cells += [spread(docs_values), f"{mean(docs_values) / dense_docs:.3f}"]
        cells += [f"{mean([run[2] for run in runs]):.0f}", f"{mean([run[4] for run in runs]):.0f}", f"{mean([run[3] for run in runs]):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    write_markdown(output, "\n".join(lines) + "\n", echo=False)


def training_windows(token_ids: torch.Tensor, count: int, seq_len: int, sampling: str, seed: int) -> torch.Tensor:
    """The windows the teacher is cached on: ``count`` at random offsets, or up to ``count`` non-overlapping tiles.

    Tiles start at a seeded offset below ``seq_len`` and come in a seeded random order, so a batch mixes distant
    parts of the text; when ``count`` exceeds the tiles, all of them (:func:`lowrank.train.heal.heal` reads the
    cache in epochs).

    Example:
        >>> training_windows(torch.arange(10), 9, 3, "tiled", 0).tolist()  # offset 2: tiles 2-4 and 5-7, shuffled
        [[5, 6, 7], [2, 3, 4]]
    """
    if sampling == "random":
        return sample_windows(token_ids, count, seq_len, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, seq_len, (1,), generator=generator))
    tiles = consecutive_windows(token_ids[offset:], seq_len)
    return tiles[torch.randperm(len(tiles), generator=generator)[:count]]


def parse_steps(text: str, ratios: list[float]) -> dict[float, list[int]]:
    """``--steps``: ``100,300`` (every ratio) or ``0.4:1650,0.6:2100`` (per ratio; both forms mix) → ratio → step counts.

    Example:
        >>> parse_steps("100,0.6:2100", [0.4, 0.6])
        {0.4: [100], 0.6: [100, 2100]}
    """
    counts: dict[float, list[int]] = {ratio: [] for ratio in ratios}
    for item in filter(None, text.split(",")):
        ratio, _, steps = item.rpartition(":")
        try:
            targets = [float(ratio)] if ratio else ratios
            value = int(steps)
        except ValueError:
            raise SystemExit(f"--steps: cannot read {item!r}; give STEPS or RATIO:STEPS, e.g. 0.4:1650") from None
        for target in targets:
            if target not in counts:
                raise SystemExit(f"--steps: ratio {target} in {item!r} is not one of --ratios {','.join(map(str, ratios))}")
            counts[target].append(value)
    return counts


def needs_calibration(args) -> bool:
    """Whether the compression reads calibration statistics: a method or method option that needs them, or any allocation but ``uniform``."""
    spec = lowrank.get_method(args.method)
    config = parse_overrides(spec.config_class, args.option)
    return bool(spec.needs_statistics or getattr(config, "needs_statistics", False) or args.strategy != "uniform")


if __name__ == "__main__":
    main()
