"""Block-by-block compression: dense versus compressed propagation of the calibration inputs.

Run: ``python benchmarks/propagation.py`` (about 10 minutes on 2 cores). Compresses the reference
model with ``lowrank.blockwise.compress_blockwise`` (``whiten``, 64 × 256 calibration tokens) at
each ratio with both ``propagate`` settings, and writes perplexity on all of ``pycode-eval.txt``
and on 200 windows of ``pydocs-eval.txt`` to ``benchmarks/results/propagation.md``.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, DOCS, EVAL, FIXTURE, machine_line, require_shared, write_markdown  # noqa: E402

import lowrank  # noqa: E402
from lowrank.blockwise import compress_blockwise  # noqa: E402
from lowrank.calibration import calibration_batches  # noqa: E402
from lowrank.models import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--docs-windows", type=int, default=200)
    args = parser.parse_args()
    require_shared()
    tokenizer = load_tokenizer(FIXTURE)
    eval_text, docs_text = EVAL.read_text(), DOCS.read_text()
    batches = calibration_batches(tokenizer, CALIB.read_text(), 64, 256, 0, 8)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowrank-propagation-"))
    try:
        for ratio in (float(r) for r in args.ratios.split(",")):
            for propagate in ("dense", "compressed"):
                out = work / f"{propagate}-{ratio}"
                compress_blockwise(FIXTURE, out, ratio, batches=batches, propagate=propagate, progress=False)
                model = lowrank.load(out)
                code = lowrank.perplexity(model, tokenizer, eval_text, progress=False)
                docs = lowrank.perplexity(model, tokenizer, docs_text, max_windows=args.docs_windows, progress=False)
                rows.append(f"| {ratio:.1f} | {propagate} | {code:.2f} | {docs:.2f} |")
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Block-by-block compression: dense versus compressed propagation",
        "",
        f"Command: `python benchmarks/propagation.py`. Machine: {machine_line()}.",
        "`whiten`, uniform ranks, calibration 64 windows × 256 tokens of `pycode-calib.txt` (seed 0). *dense*: every block calibrates"
        " on the dense blocks' outputs (the in-memory path's statistics); *compressed*: on the compressed blocks' outputs.",
        f"Perplexity on all of `pycode-eval.txt` and on the first {args.docs_windows} windows of `pydocs-eval.txt`.",
        "",
        "| ratio | propagate | pycode ppl | pydocs ppl |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    write_markdown("propagation", "\n".join(lines))


if __name__ == "__main__":
    main()
