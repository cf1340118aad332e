"""Control for healing with a next-token term: the *dense* model trained with the same objective.

Run: ``python benchmarks/heal_dense_control.py --model smollm2 --hard-weight 0.1 --lr 2e-4 --steps 300``
(writes ``benchmarks/results/heal-dense-control-smollm2.md``). A healed model compared with its dense
original can look better than healing alone makes it when the loss also fits the calibration text
(``--hard-weight`` α > 0): the dense original never saw that text. This trains the dense model itself
with the healing objective, (1 − α)·KL to its own frozen copy + α·next-token cross-entropy, on the
same windows, schedule and parameter set as ``benchmarks/heal.py`` (every block linear layer and the
norms): each block linear is wrapped as a full-size ``ResizedLinear`` (the same weights, so the same
function) and :func:`lowrank.train.heal.heal` runs unchanged. Rows come every ``--report-every``
steps (the run resumes from its checkpoint between them); the file is rewritten after each row.
Early stopping is heal's: a finished run keeps its lowest held-out loss, which for a model that starts
as its own teacher can be step 0, so the rows before the last are the ones to read.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, machine_line, require_shared, write_markdown  # noqa: E402
from heal import training_windows  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.calibration import tokenize_stream  # noqa: E402
from lowrank.calibration.data import consecutive_windows  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402
from lowrank.nn.resized_linear import ResizedLinear  # noqa: E402
from lowrank.nn.targets import set_submodule  # noqa: E402
from lowrank.train.heal import HealConfig, build_teacher_cache, heal, split_tokens  # noqa: E402


def wrap_dense_(model) -> int:
    """Replace every targeted linear layer by a full-size ``ResizedLinear`` with its own weights (in place)."""
    names = lowrank.find_targets(model)
    for name in names:
        layer = model.get_submodule(name)
        set_submodule(model, name, ResizedLinear.from_factors(layer.weight.detach(), layer.bias, dtype=layer.weight.dtype, device=layer.weight.device))
    return len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hard-weight", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--cache-windows", type=int, default=960)
    parser.add_argument("--validation-windows", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-windows", type=int, default=24)
    parser.add_argument("--docs-windows", type=int, default=24)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    require_shared()
    model_dir, model_name = resolve_model(args.model)
    output = args.output or f"heal-dense-control-{model_name}"
    tokenizer = load_tokenizer(model_dir)
    eval_text, docs_text = EVAL.read_text(), DOCS.read_text()
    calib_ids = tokenize_stream(tokenizer, CALIB.read_text())
    train_ids, tail = split_tokens(calib_ids, args.validation_windows * args.seq_len / calib_ids.numel())  # as heal.py holds out
    held_out = consecutive_windows(tail, args.seq_len, args.validation_windows)
    windows = training_windows(train_ids, min(args.steps * args.batch_size, args.cache_windows), args.seq_len, "random", args.seed)
    config = HealConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=min(args.warmup, args.steps),
        hard_weight=args.hard_weight, seed=args.seed, eval_every=args.eval_every,
    )  # fmt: skip

    def measure(model) -> tuple[float, float]:
        return (
            lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False),
            lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False),
        )

    workspace = Path(tempfile.mkdtemp(prefix="heal-dense-control-"))
    start, cpu_start = time.perf_counter(), time.process_time()
    teacher = load_pretrained(model_dir)
    cache = build_teacher_cache(teacher, windows, workspace / "teacher", top_k=config.top_k, batch_size=config.batch_size, teacher_name=str(model_dir), progress=False)
    validation = build_teacher_cache(teacher, held_out, workspace / "validation", top_k=config.top_k, batch_size=config.batch_size, teacher_name=str(model_dir), progress=False)
    dense_code, dense_docs = measure(teacher)
    del teacher
    student = load_pretrained(model_dir)
    wrapped = wrap_dense_(student)
    rows = [["0", f"{dense_code:.2f}", "1.000", f"{dense_docs:.2f}", "1.000", "—", "0"]]
    for until in range(args.report_every, args.steps + 1, args.report_every):
        history = heal(student, cache, config, work_dir=workspace / "work", progress=False, until=until, validation=validation)
        code, docs = measure(student)
        held = dict(history.validation)
        rows.append([str(until), f"{code:.2f}", f"{code / dense_code:.3f}", f"{docs:.2f}", f"{docs / dense_docs:.3f}",
                     f"{held[0]:.4f} → {held[max(held)]:.4f}", f"{time.process_time() - cpu_start:.0f}"])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
        header = ["steps", "pycode ppl", "× dense", "pydocs ppl", "× dense", "held-out loss", "CPU s"]
        text = [
            f"# The dense {model_name} trained with the healing objective (control)",
            "",
            f"Command: `python benchmarks/heal_dense_control.py {' '.join(sys.argv[1:])}`. Machine: {machine_line()}.",
            f"Objective: (1 − {args.hard_weight:g})·top-{config.top_k} KL to the frozen dense model + {args.hard_weight:g}·next-token"
            f" cross-entropy, AdamW lr {args.lr:g} (warm-up {config.warmup_steps}, cosine to 10 % over {args.steps} steps),"
            f" {args.batch_size} × {args.seq_len}-token windows of `pycode-calib.txt` per step (the teacher on {len(windows)} windows at"
            f" random offsets, seed {args.seed}, read in epochs), {wrapped} block linear layers and the norms trained: what"
            " `benchmarks/heal.py` trains in a compressed model, here at full size.",
            f"Perplexity on the first {args.max_windows} windows of `pycode-eval.txt` and {args.docs_windows} of `pydocs-eval.txt` (held out);"
            f" *held-out loss*: the training objective on {args.validation_windows} windows held out from the end of `pycode-calib.txt`,"
            " before training → at the row's step; *CPU s*: since the teacher cache began, all threads.",
            f"Rows at the step they name, of one {args.steps}-step run, each with the parameters of that step, except a row at step {args.steps},"
            " which keeps the lowest held-out loss as `heal.py` does (here that can be step 0: the model starts as its own teacher).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
        write_markdown(output, "\n".join(text) + "\n", echo=False)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
