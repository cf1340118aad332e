"""Rebuilding a compressed model from its directory, without the original checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from ..allocation import Plan, resize_ranks
from ..compress import CompressionReport, storage_bits
from ..errors import LowrankError
from ..evaluation.size import count_parameters
from ..models import DTYPES, load_pretrained, model_class, read_model_config
from ..nn import STRUCTURES, set_submodule, unfuse_experts
from .save import LOWRANK_CONFIG

SUPPORTED_FORMATS = (1,)


def read_lowrank_config(path: str | Path) -> dict | None:
    """The parsed ``lowrank_config.json`` of a directory, or ``None`` for a dense model."""
    file = Path(path) / LOWRANK_CONFIG
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    if data.get("format_version") not in SUPPORTED_FORMATS:
        raise LowrankError(
            f"{file} has format version {data.get('format_version')}, this lowrank reads {SUPPORTED_FORMATS}; upgrade lowrank"
        )
    return data


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise LowrankError(f"{path} lacks the weight file {name}; the directory is incomplete, save it again")
        state.update(load_file(str(path / name)))
    return state


def _truncate(meta: dict, state: dict[str, torch.Tensor], ratio: float) -> dict:
    """Cut an elastic model's factors down to the ranks of ``ratio``; returns the updated metadata."""
    plan = Plan.from_dict(meta["plan"])
    ranks = resize_ranks(plan, ratio)
    modules = {}
    for name, spec in meta["modules"].items():
        if spec["structure"] != "LowRankLinear":
            raise LowrankError(f"layer {name} is a {spec['structure']}, which has no nested ranks; only whole low-rank models resize")
        rank = ranks[name]
        state[f"{name}.down.weight"] = state[f"{name}.down.weight"][:rank].clone()
        state[f"{name}.up.weight"] = state[f"{name}.up.weight"][:, :rank].clone()
        modules[name] = {**spec, "rank": rank}
    resized = Plan(ratio=ratio, strategy=plan.strategy, shapes=plan.shapes, ranks=ranks, details=plan.details)
    return {**meta, "ratio": ratio, "modules": modules, "plan": resized.to_dict()}


def load(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None, ratio: float | None = None) -> nn.Module:
    """Load a model saved by :func:`lowrank.save` (or any dense Hugging Face model directory).

    The skeleton is built from ``config.json``, the mixture-of-experts blocks that were unfused for
    compression are unfused again, every layer named in ``lowrank_config.json`` is replaced by an
    empty module of the saved structure and rank, and the saved state dict is loaded strictly (tied
    weights re-tied).

    Args:
        path: the saved directory.
        device: where to put the model.
        dtype: cast the model to this dtype (default: as saved).
        ratio: for a model saved with ``--elastic``: the size to load, as the fraction of the targeted
            weights removed; its factors are truncated to the ranks that ratio gets (no recomputation).

    Example:
        >>> model = load("out/pycode-30")  # doctest: +SKIP
        >>> smaller = load("out/pycode-elastic", ratio=0.5)  # doctest: +SKIP
    """
    path = Path(path)
    read_model_config(path)
    meta = read_lowrank_config(path)
    if meta is None:
        if ratio is not None:
            raise LowrankError(f"{path} is a dense model; resizing needs a model compressed with --elastic")
        return load_pretrained(path, dtype=dtype, device=device)

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    state = _read_state_dict(path)
    saved_dtype = next(value.dtype for value in state.values() if value.is_floating_point())
    if ratio is not None:
        meta = _truncate(meta, state, ratio)
    model = model_class(config)._from_config(config, dtype=saved_dtype)
    unfuse_experts(model, meta.get("unfused_experts", []))
    for name, module_spec in meta["modules"].items():
        spec = dict(module_spec)
        structure = STRUCTURES.get(spec.pop("structure"))
        if structure is None:
            raise LowrankError(f"{path / LOWRANK_CONFIG} names an unknown module structure for {name}; upgrade lowrank")
        in_features, out_features, bias = spec.pop("in_features"), spec.pop("out_features"), spec.pop("bias")
        set_submodule(model, name, structure.empty(in_features, out_features, bias, spec, dtype=saved_dtype))

    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise LowrankError(f"weights in {path} do not match lowrank_config.json ({problem}); save the model again")
    model.tie_weights()
    plan = Plan.from_dict(meta["plan"])
    parameters = dict(meta["parameters"])
    if ratio is not None:
        parameters["targeted_after"] = sum(p.numel() for name in plan.shapes for p in model.get_submodule(name).parameters())
        parameters["model_after"] = count_parameters(model)
        parameters["targeted_bits_after"] = sum(storage_bits(model.get_submodule(name)) for name in plan.shapes)
    model.lowrank_report = CompressionReport(
        method=meta["method"], method_config=meta["method_config"], plan=plan, modules=meta["modules"], parameters=parameters
    )
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return model.to(device=device, dtype=dtype).eval()
