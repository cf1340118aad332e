"""Decode and prefill speed of what the default recipes write, against the dense model, measured interleaved.

Run: ``python benchmarks/recipe_speed.py --model smollm2`` (about 15 minutes on 2 idle cores).
Writes ``benchmarks/results/recipe-speed-<model>.md``, with the held-out perplexity of the same models
(first ``--max-windows`` windows of ``pycode-eval.txt`` and ``pydocs-eval.txt``).

Unlike ``benchmarks/speed.py`` (random factors of each structure's shapes), these are the real
models ``lowrank compress`` writes, calibrated on 64 × 256 tokens of ``pycode-calib.txt``: the
single-matrix recipe (``fisher-whiten`` + ``global``: which layers stay dense and every rank come
from the data) and the module recipe (``modegpt`` types I + III + ``global``: smaller dense MLPs,
value heads padded per head, the rest factored). One calibration with gradients serves both. Each
model is saved, loaded back (in each ``--dtypes``) and timed by
:func:`lowrank.evaluation.speed.compare_generation_speed` with the dense model: batch 1, greedy,
decode of 64 new tokens with the KV cache and prefill of 1 × 512 tokens, every round timing every
model once in rotating order; speed-ups are medians of per-round time ratios, with their range.

The compressed models are kept in ``--cache`` (default ``/tmp/lowrank-recipe-speed``) and reused when
present, so the timing can be rerun alone on a quiet machine.
"""

from __future__ import annotations

import os

# Before torch starts: with 2 threads on a busy machine, OpenMP threads spin-waiting for each other
# made matmuls up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.configs import parse_overrides  # noqa: E402
from lowrank.evaluation.speed import compare_generation_speed, describe_measurement  # noqa: E402
from lowrank.job import CAUSAL_RECIPE, MODULE_OPTIONS, MODULE_RECIPE  # noqa: E402
from lowrank.models import load_tokenizer  # noqa: E402

RECIPES = {
    "fisher-whiten + global": (*CAUSAL_RECIPE, ()),
    "modegpt (I + III) + global": (*MODULE_RECIPE, MODULE_OPTIONS),
}


def compress_all(model_dir: Path, ratios: list[float], cache: Path, num_samples: int) -> dict[tuple[str, float], Path]:
    """Each recipe at each ratio, saved under ``cache`` (compressed only where not there yet)."""
    paths = {(name, ratio): cache / f"{name.split()[0]}-{ratio:g}" for name in RECIPES for ratio in ratios}
    missing = [key for key, path in paths.items() if not (path / "lowrank_config.json").exists()]
    if not missing:
        return paths
    tokenizer = load_tokenizer(model_dir)
    dense = lowrank.load(model_dir)
    stats = lowrank.calibrate(dense, tokenizer, CALIB.read_text(encoding="utf-8"), num_samples=num_samples, seq_len=256, gradients=True)
    for name, ratio in missing:
        method, strategy, options = RECIPES[name]
        spec = lowrank.get_method(method)
        config = parse_overrides(spec.config_class, list(options))
        model = copy.deepcopy(dense)
        plan = lowrank.allocate(model, ratio, method=method, stats=stats, strategy=strategy, method_config=config)
        report = lowrank.compress_(model, plan, method=method, stats=stats, config=config)
        lowrank.save(model, paths[name, ratio], report=report, tokenizer=tokenizer, overwrite=True)
        del model
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lowrank-recipe-speed"))
    parser.add_argument("--output", default=None, help="results file name (default: recipe-speed-<model>)")
    parser.add_argument("--max-windows", type=int, default=24, help="perplexity windows of pycode-eval.txt and pydocs-eval.txt (0: none)")
    parser.add_argument("--compress-only", action="store_true", help="fill --cache and stop (time later, on a quiet machine)")
    args = parser.parse_args()
    model_dir, label = resolve_model(args.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    paths = compress_all(model_dir, ratios, args.cache / label, args.num_samples)
    if args.compress_only:
        return

    # Quality of the very models timed (float32, as saved), on held-out text.
    quality = {}
    if args.max_windows > 0:
        tokenizer = load_tokenizer(model_dir)
        texts = {"pycode": EVAL.read_text(encoding="utf-8"), "pydocs": DOCS.read_text(encoding="utf-8")}
        for key, path in [(("dense", 0.0), model_dir), *paths.items()]:
            model = lowrank.load(path)
            quality[key] = {name: lowrank.perplexity(model, tokenizer, text, max_windows=args.max_windows, progress=False) for name, text in texts.items()}
            del model

    def perplexities(key) -> str:
        if not quality:
            return "— | —"
        dense = quality["dense", 0.0]
        return " | ".join(f"{quality[key][name]:.2f} ({quality[key][name] / dense[name]:.3f}×)" for name in ("pycode", "pydocs"))

    rows = []
    for dtype in args.dtypes.split(","):
        for ratio in ratios:
            models = {"dense": lowrank.load(model_dir, dtype=dtype)}
            for name in RECIPES:
                models[name] = lowrank.load(paths[name, ratio], dtype=dtype)
            results = compare_generation_speed(models, rounds=args.rounds, threads=args.threads)
            for name in RECIPES:
                result = results[name]
                rows.append(
                    f"| {dtype} | {ratio:g} | {name} | {lowrank.count_parameters(models[name]):,} | {result.decode.median:.1f} "
                    f"| {result.decode_vs_baseline} | {result.prefill_vs_baseline} | {perplexities((name, ratio))} |"
                )
            dense = results["dense"]
            rows.append(f"| {dtype} | {ratio:g} | dense | {lowrank.count_parameters(models['dense']):,} | {dense.decode.median:.1f} | 1 | 1 | {perplexities(('dense', 0.0))} |")
            del models

    text = "\n".join(
        [
            f"# Speed of the default recipes' outputs on {label}",
            "",
            f"`python benchmarks/recipe_speed.py --model {args.model} --ratios {args.ratios} --dtypes {args.dtypes} --rounds {args.rounds} --threads {args.threads} --max-windows {args.max_windows}`",
            "",
            f"Machine: {machine_line()}; `OMP_WAIT_POLICY=PASSIVE`.",
            f"Measurement: {describe_measurement(args.rounds, args.threads)}; each row's ratios are to the dense model of the same table, measured in the same rounds.",
            f"Models: calibrated once with gradients on {args.num_samples} × 256 tokens of `pycode-calib.txt`, compressed, saved, and loaded in the row's dtype.",
            "",
            f"Perplexity: the first {args.max_windows} windows of 256 tokens of `pycode-eval.txt` and of `pydocs-eval.txt` (held out), of the float32 models, seed 0.",
            "",
            "| dtype | ratio | recipe | parameters | decode tokens/s | decode vs dense | prefill vs dense | pycode ppl | pydocs ppl |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_markdown(args.output or f"recipe-speed-{label}", text)


if __name__ == "__main__":
    main()
