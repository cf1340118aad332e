"""Generation speed at batch size 1, and an interleaved comparison of several models.

On a machine shared with other jobs, timings drift by more than the differences between models
from one minute to the next, so measuring models one after the other (minutes apart) compares the
machine's load, not the models. :func:`compare_generation_speed` interleaves them: every round
times each model once, in a rotating order, and each model's speed-up is the median over rounds of
its time against the baseline's time *in the same round*.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn



@torch.no_grad()
def generation_speed(model: nn.Module, tokenizer, prompt: str = "def main():\n", new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy decoding throughput in tokens per second (batch 1, KV cache on, best of ``repeats``).

    One untimed warm-up run comes first; the best of the timed runs is reported because on a shared
    machine the minimum is the least noisy estimate of what the model costs. To compare models, use
    :func:`compare_generation_speed`, which interleaves them.
    """
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    model.generate(input_ids, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(input_ids, **kwargs)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


@dataclass
class Spread:
    """Median and range of a measured quantity over rounds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.low:.3g}–{self.high:.3g}]"


@dataclass
class SpeedComparison:
    """One model's speed, measured interleaved with the others.

    Attributes:
        decode: tokens per second generating ``new_tokens`` one at a time with the KV cache (batch 1).
        prefill: tokens per second of one forward pass over ``prefill_tokens`` tokens (batch 1).
        decode_vs_baseline, prefill_vs_baseline: per round, baseline time / this model's time.
        bytes_per_token: weight bytes one decode step reads (:func:`bytes_per_token`).
    """

    decode: Spread | None
    prefill: Spread | None
    decode_vs_baseline: Spread | None
    prefill_vs_baseline: Spread | None
    bytes_per_token: int
    times: dict[str, list[float]] = field(default_factory=dict, repr=False)


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter and buffer once, except that an embedding
    table read by lookup costs one row (a table tied to the output layer is read whole there), and a
    compressed layer costs what its forward pass reads (its ``runtime_bits()``, e.g. int32 indices
    where int16 are stored). KV-cache reads are not included.

    Example:
        >>> bytes_per_token(torch.nn.Linear(4, 2))
        40
    """
    total, seen = 0, set()
    read_whole = {id(p) for m in model.modules() if not isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}

    def visit(module: nn.Module) -> None:
        nonlocal total
        if hasattr(module, "runtime_bits"):
            total += module.runtime_bits() // 8
            seen.update(id(t) for t in list(module.parameters()) + list(module.buffers()))
            return
        if isinstance(module, nn.Embedding):
            weight = module.weight
            if id(weight) not in seen and id(weight) not in read_whole:
                total += weight.shape[1] * weight.element_size()
                seen.add(id(weight))
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        for child in module.children():
            visit(child)

    visit(model)
    return total


def _forward_kwargs(model: nn.Module) -> dict:
    # Only the last position's logits are needed to continue generating (what ``generate`` asks for).
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _cache_argument(model: nn.Module) -> str:
    # transformers ≥ 5.2x names the KV cache ``cache``; earlier versions ``past_key_values``.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache, after an untimed prefill of ``prompt``."""
    kwargs, cache_name = _forward_kwargs(model), _cache_argument(model)
    output = model(input_ids=prompt, use_cache=True, **kwargs)
    cache, token = output[cache_name], output.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        output = model(input_ids=token, use_cache=True, **{cache_name: cache}, **kwargs)
        cache, token = output[cache_name], output.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def _time_prefill(model: nn.Module, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=tokens, use_cache=True, **_forward_kwargs(model))
    return time.perf_counter() - start


@torch.no_grad()
def compare_generation_speed(
    models: Mapping[str, nn.Module],
    *,
    new_tokens: int = 64,
    prefill_tokens: int = 512,
    prompt_tokens: int = 8,
    rounds: int = 5,
    threads: int | None = 1,
    baseline: str | None = None,
    decode: bool = True,
    prefill: bool = True,
    seed: int = 0,
) -> dict[str, SpeedComparison]:
    """Decode and prefill speed of several causal LMs, measured interleaved (batch 1, greedy, KV cache).

    Every model first runs a short untimed warm-up (building any run-time forms its layers cache). Then each of
    ``rounds`` rounds times every model once, the order rotating from round to round, so slow
    phases of a shared machine hit every model alike. Reported: tokens/s as median [min–max] over
    rounds and, against ``baseline`` (default: the first model), the median of the per-round time
    ratios. Decode times ``new_tokens`` steps after an untimed prompt of ``prompt_tokens``; prefill
    times one forward pass over ``prefill_tokens`` tokens. The token ids are seeded random ids below
    every model's vocabulary size (speed does not depend on the text).

    Args:
        models: name → causal LM (all on the same device).
        threads: torch threads during the measurement (restored afterwards); ``None`` keeps the current.
        decode, prefill: which phases to time.

    Returns:
        name → :class:`SpeedComparison`, in the order of ``models``.

    Example:
        >>> results = compare_generation_speed({"dense": dense, "whiten@0.4": compressed}, rounds=5)  # doctest: +SKIP
        >>> print(results["whiten@0.4"].decode_vs_baseline)  # doctest: +SKIP
        1.43 [1.31–1.5]
    """
    names = list(models)
    if not names or rounds < 1:
        raise ValueError("compare_generation_speed needs at least one model and one round")
    baseline = baseline or names[0]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = next(next(iter(models.values())).parameters()).device
        vocab = min(m.config.vocab_size for m in models.values())
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=generator).to(device)
        long_prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=generator).to(device)
        phases = {"decode": lambda m: _time_decode(m, prompt, new_tokens)} if decode else {}
        if prefill:
            phases["prefill"] = lambda m: _time_prefill(m, long_prompt)
        times = {name: {phase: [] for phase in phases} for name in names}
        for model in models.values():  # warm-up, untimed: first touches of the weights, run-time forms built
            model.eval()
            if decode:
                _time_decode(model, prompt, min(new_tokens, 2))
            if prefill:
                _time_prefill(model, long_prompt[:, : min(prefill_tokens, 32)])
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for phase, measure in phases.items():
                for name in order:
                    times[name][phase].append(measure(models[name]))
    finally:
        torch.set_num_threads(previous_threads)

    counts = {"decode": new_tokens, "prefill": prefill_tokens}
    results = {}
    for name in names:
        speed = {phase: Spread.of([counts[phase] / t for t in times[name][phase]]) for phase in phases}
        ratio = {phase: Spread.of([b / t for b, t in zip(times[baseline][phase], times[name][phase])]) for phase in phases}
        results[name] = SpeedComparison(
            decode=speed.get("decode"),
            prefill=speed.get("prefill"),
            decode_vs_baseline=ratio.get("decode"),
            prefill_vs_baseline=ratio.get("prefill"),
            bytes_per_token=bytes_per_token(models[name]),
            times=times[name],
        )
    return results


def describe_measurement(rounds: int, threads: int | None, new_tokens: int = 64, prefill_tokens: int = 512) -> str:
    """One line saying how :func:`compare_generation_speed` measured, for printing beside its numbers.

    Example:
        >>> describe_measurement(5, 1).endswith("1 torch thread")
        True
    """
    threads = threads if threads is not None else torch.get_num_threads()
    return (
        f"batch 1, greedy; decode: {new_tokens} new tokens with the KV cache; prefill: 1 × {prefill_tokens} tokens; "
        f"{rounds} interleaved rounds (rotating order), median [min–max]; ratios are per-round time ratios to the baseline; "
        f"{threads} torch thread{'s' if threads != 1 else ''}"
    )
