"""Writing a compressed model: config.json + model.safetensors + lowrank_config.json + tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..compress import CompressionReport
from ..errors import LowrankError
from ..nn.experts import find_unfused_experts, fused_state_dict
from ..nn.replacement import ReplacementLinear
from .paths import atomic_directory
from .remote_code import write_remote_code

LOWRANK_CONFIG = "lowrank_config.json"


def save(
    model: nn.Module,
    out_dir: str | Path,
    report: CompressionReport | None = None,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Save a (compressed) Hugging Face model so that :func:`lowrank.load` rebuilds it alone.

    Writes the base ``config.json``, the weights as safetensors (factors plus untouched weights,
    tied weights once), ``lowrank_config.json`` (format version, method, ratio, structure and rank
    of every replaced layer, parameter counts) and the tokenizer files. Everything goes to a
    temporary directory that is renamed at the end. A compressed model's weights keep the names of its
    modules (transformers' key conversions are not applied; ``lowrank.load`` reads them as they are),
    and its mixture-of-experts blocks unfused by :func:`lowrank.nn.unfuse_experts` are listed as
    ``unfused_experts``; a dense model is written as transformers writes it (experts fused again).
    A compressed model also gets ``modeling_lowrank.py`` and an ``auto_map`` in ``config.json``, so that
    transformers alone loads it with ``trust_remote_code=True`` (:func:`lowrank.io.remote_code.write_remote_code`;
    skipped, with a logged note, for a structure that file does not implement).

    Args:
        model: a model compressed by :func:`lowrank.compress_` (a dense model saves as plain HF).
        out_dir: target directory.
        report: what :func:`lowrank.compress_` returned for ``model`` (or what
            ``lowrank.load(..., return_report=True)`` returned with it); ``None`` for a dense model.
        tokenizer: saved beside the model when given.
        overwrite: replace an existing ``out_dir``.
        max_shard_size: passed to ``save_pretrained``.

    Raises:
        LowrankError: if the report is missing for a compressed model, or names other layers than
            the model's compressed ones (the directory would not load).

    Example:
        >>> report = compress_(model, plan, method="whiten", stats=stats)  # doctest: +SKIP
        >>> save(model, "out/pycode-30", report=report, tokenizer=tokenizer)  # doctest: +SKIP
    """
    check_report(model, report)
    with atomic_directory(out_dir, overwrite) as temporary:
        unfused = find_unfused_experts(model)
        if report is None:
            state = fused_state_dict(model) if unfused else None
            model.save_pretrained(temporary, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state)
        else:
            model.save_pretrained(temporary, safe_serialization=True, max_shard_size=max_shard_size, save_original_format=False)
            config = {**report.to_dict(), **({"unfused_experts": unfused} if unfused else {})}
            (temporary / LOWRANK_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            write_remote_code(temporary, config)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return Path(out_dir)


def check_report(model: nn.Module, report: CompressionReport | None) -> None:
    """Raise a one-line error unless ``report`` names exactly the compressed layers of ``model``."""
    compressed = {name: type(module).__name__ for name, module in model.named_modules() if isinstance(module, ReplacementLinear)}
    if report is None:
        if compressed:
            raise LowrankError(
                f"this model holds compressed layers (e.g. {next(iter(compressed))}); pass the report compress_ returned: "
                "save(model, out, report=report), or load(path, return_report=True) for a loaded model"
            )
        return
    if not isinstance(report, CompressionReport):
        raise LowrankError(f"report must be the CompressionReport that compress_ returned, not a {type(report).__name__}; pass tokenizer=... by name")
    described = {name: spec.get("structure") for name, spec in report.modules.items()}
    if described != compressed:
        name = min(name for name, _ in set(described.items()) ^ set(compressed.items()))
        raise LowrankError(f"the report does not describe this model's compressed layers (layer {name}); pass the report of this model")
