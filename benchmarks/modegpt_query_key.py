"""MoDeGPT type II (``modegpt`` with ``attention=query_key``), one attention at a time: its predicted cost
against the measured one, beside q_proj and k_proj factored (``fisher-whiten``) at the same parameters.

For the first ``--blocks`` attention blocks and each head keeping ¼, ½ and ¾ of its rotary pairs, only
that block's q_proj/k_proj change, either shrunk (CR-selected pairs, the rest zero) or factored at the
best split of the same parameters (:class:`PairFactoredForm`, the form ``modegpt`` falls back to). The
*predicted* columns are the curves the knapsack and the fallback read (per-token loss increase:
½·Fisher-weighted output error on the calibration tokens); the *measured* ones are the increase of the
mean held-out loss, log(ppl / dense ppl) on ``pycode-eval.txt``. It shows whether the fallback's choice
(the smaller prediction) is the better one, and how far the predictions are from the truth.

Run: ``python benchmarks/modegpt_query_key.py`` (reference model; ``--model smollm2`` for the real LLM).
One calibration (64 windows × 256 tokens of ``pycode-calib.txt``, seed 0, with gradients). Writes
``benchmarks/results/modegpt-query-key-check[-<model>].md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, EVAL, machine_line, require_shared, write_markdown  # noqa: E402
from quality import resolve_model  # noqa: E402

import lowrank  # noqa: E402
from lowrank.allocation.plan import Plan  # noqa: E402
from lowrank.methods.modegpt import _factored_tails  # noqa: E402
from lowrank.methods.modegpt_attention import pair_factored_form  # noqa: E402
from lowrank.methods.modegpt_query_key import find_query_key_units, query_key_errors, shrink_query_key  # noqa: E402
from lowrank.models import load_pretrained, load_tokenizer  # noqa: E402

FISHER_DAMP = 1e-6  # ModegptConfig's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference (pycode-llama), smollm2, or a model directory / .gguf")
    parser.add_argument("--blocks", type=int, default=3, help="attention blocks to test (the first ones)")
    parser.add_argument("--max-windows", type=int, default=16, help="windows of pycode-eval.txt")
    parser.add_argument("--output", default=None, help="results file name (default: modegpt-query-key-check[-<model>])")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    model_dir, model_name = resolve_model(args.model)
    output = args.output or ("modegpt-query-key-check" if args.model == "reference" else f"modegpt-query-key-check-{model_name}")
    tokenizer = load_tokenizer(model_dir)
    eval_text = EVAL.read_text()
    dense = load_pretrained(model_dir)
    stats = lowrank.calibrate(
        dense, tokenizer, CALIB.read_text(), num_samples=64, seq_len=256, seed=0, gradients=True, weight_gradients=False, progress=False
    )
    dense_ppl = lowrank.perplexity(dense, tokenizer, eval_text, max_windows=args.max_windows, progress=False)
    units = find_query_key_units(dense, lowrank.find_targets(dense))[: args.blocks]
    tails = _factored_tails(dense, [name for unit in units for name in unit.members], stats, "fisher-whiten")

    def measured(model) -> float:
        return math.log(lowrank.perplexity(model, tokenizer, eval_text, max_windows=args.max_windows, progress=False) / dense_ppl)

    command = "python benchmarks/modegpt_query_key.py" + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value is not None and value != parser.get_default(key)
    )
    rows = []
    for unit in units:
        predicted_shrunk = query_key_errors(dense, unit, stats, FISHER_DAMP)
        factored = pair_factored_form(dense, unit, tails)
        for pairs in (unit.size // 4, unit.size // 2, 3 * unit.size // 4):
            shrunk = copy.deepcopy(dense)
            shrink_query_key(shrunk, unit, pairs, stats, FISHER_DAMP)
            ranks = factored.ranks(pairs)
            factored_model = copy.deepcopy(dense)
            shapes = {name: tuple(dense.get_submodule(name).weight.shape) for name in unit.members}
            lowrank.compress_(factored_model, Plan(0.0, "uniform", shapes, ranks), method="fisher-whiten", stats=stats, progress=False)
            shrunk_loss, factored_loss = measured(shrunk), measured(factored_model)
            rows.append(
                f"| {unit.module} | {2 * pairs} of {unit.head_dim} | {'/'.join(map(str, ranks.values()))} "
                f"| {predicted_shrunk[pairs].item():.5f} | {shrunk_loss:.5f} | {factored.errors[pairs].item():.5f} | {factored_loss:.5f} "
                f"| {'type II' if predicted_shrunk[pairs] < factored.errors[pairs] else 'factored'} | {'type II' if shrunk_loss < factored_loss else 'factored'} |"
            )
            print(rows[-1], flush=True)
            del shrunk, factored_model
    text = "\n".join(
        [
            f"# MoDeGPT type II, one attention at a time: predicted and measured cost on {model_name}",
            "",
            f"Command: `{command}`. Machine: {machine_line()}.",
            (
                "Calibration: 64 windows × 256 tokens of `pycode-calib.txt`, seed 0, with gradients. "
                f"Dense perplexity {dense_ppl:.2f} on the first {args.max_windows} windows of `pycode-eval.txt` (held out)."
            ),
            "",
            "- Only the named block's q_proj and k_proj change; the others stay dense.",
            "- *type II*: every head keeps the *kept dims* (whole rotary pairs by MoDeGPT's CR score), the other q/k rows zero.",
            "- *factored*: q_proj and k_proj factored with `fisher-whiten` at the ranks shown (q/k), the best split of the same parameters.",
            "- *predicted*: the curve `modegpt` budgets with (½·Fisher-weighted output error per calibration token);",
            "  *measured*: log(ppl / dense ppl) on the held-out windows, the mean loss increase per token.",
            "- *fallback picks* / *better*: the form with the smaller predicted / measured cost.",
            "",
            "| block | kept dims | factored ranks (q/k) | type II predicted | type II measured | factored predicted | factored measured | fallback picks | better |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    write_markdown(output, text, echo=False)


if __name__ == "__main__":
    main()
