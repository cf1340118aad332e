"""Writing a compressed model: config.json + model.safetensors + lowrank_config.json + tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..nn.experts import find_unfused_experts, fused_state_dict
from .paths import atomic_directory
from .remote_code import write_remote_code

LOWRANK_CONFIG = "lowrank_config.json"


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
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
        model: a model returned by :func:`lowrank.compress_` (a dense model saves as plain HF).
        out_dir: target directory.
        tokenizer: saved beside the model when given.
        overwrite: replace an existing ``out_dir``.
        max_shard_size: passed to ``save_pretrained``.

    Example:
        >>> save(model, "out/pycode-30", tokenizer=tokenizer)  # doctest: +SKIP
    """
    report = getattr(model, "lowrank_report", None)
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
