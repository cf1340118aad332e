"""Rebuilding a compressed model from its directory, without the original checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..allocation import Plan, resize_ranks
from ..compress import FORMAT_VERSION, CompressionReport, cast_, storage_bits
from ..configs import config_from_dict
from ..errors import LowrankError
from ..evaluation.size import count_parameters
from ..json_files import read_json_object
from ..methods import get_method, method_names
from ..models import DTYPES, check_finite, load_config, load_pretrained, model_class
from ..nn import STRUCTURES, set_submodule, unfuse_experts
from .save import LOWRANK_CONFIG

SUPPORTED_FORMATS = (FORMAT_VERSION,)

log = logging.getLogger("lowrank")


def read_lowrank_config(path: str | Path) -> dict | None:
    """The parsed ``lowrank_config.json`` of a directory, or ``None`` for a dense model.

    The fields :func:`load` relies on are checked here, so a damaged file is one line naming it.
    """
    file = Path(path) / LOWRANK_CONFIG
    if not file.is_file():
        return None
    data = read_json_object(file, "save the model again")
    if data.get("format_version") not in SUPPORTED_FORMATS:
        raise LowrankError(
            f"{file} has format version {data.get('format_version')}, this lowrank reads {SUPPORTED_FORMATS}; upgrade lowrank"
        )
    fields = {"method": str, "method_config": dict, "modules": dict, "plan": dict, "parameters": dict}
    for key, kind in fields.items():
        if not isinstance(data.get(key), kind):
            raise LowrankError(f"{file} lacks a valid {key!r} entry; save the model again")
    for name, spec in data["modules"].items():
        sizes = [spec.get(key) for key in ("in_features", "out_features")] if isinstance(spec, dict) else [None]
        if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes) or not isinstance(spec.get("bias"), bool):
            raise LowrankError(f"{file} has an invalid entry for layer {name!r} (in_features, out_features, bias); save the model again")
    if data["method"] in method_names():
        try:
            config_from_dict(get_method(data["method"]).config_class, data["method_config"])
        except LowrankError as error:
            raise LowrankError(f"{file}: the method's options do not read back ({error}); save the model again or upgrade lowrank") from None
    else:
        log.warning("%s was compressed with method %r, which this lowrank does not know; loading its layers anyway", file, data["method"])
    try:
        Plan.from_dict(data["plan"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise LowrankError(f"{file} has an invalid 'plan' entry; save the model again") from None
    return data


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise LowrankError(f"{index} is damaged; save the model again") from None
    else:
        names = ["model.safetensors"]
    for name in names:
        if "/" in name or "\\" in name or not (path / name).is_file():
            raise LowrankError(f"{path} lacks the weight file {name}; the directory is incomplete, save it again")
    return [path / name for name in names]


def _saved_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every saved tensor, read from the safetensors headers (no tensor is loaded)."""
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    piece = handle.get_slice(key)
                    shapes[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype()))
        except (SafetensorError, OSError) as error:
            raise LowrankError(f"{file} is not a readable safetensors file ({error}); save the model again") from None
    return shapes


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as error:
            raise LowrankError(f"{file} is not a readable safetensors file ({error}); save the model again") from None
    return state


def _truncate(meta: dict, state: dict[str, torch.Tensor], ratio: float, path: Path) -> dict:
    """Cut an elastic model's layers down to the ranks of ``ratio`` in ``state`` (each by its structure's
    ``truncate``, on the saved tensors, before the model is built); returns the updated metadata."""
    plan = Plan.from_dict(meta["plan"])
    ranks = resize_ranks(plan, ratio)
    modules = {}
    for name, spec in meta["modules"].items():
        prefix = name + "."
        keys = [key for key in state if key.startswith(prefix)]
        with torch.device("meta"):
            layer = _empty_module(name, spec, path, dtype=None)
        try:
            layer.load_state_dict({key[len(prefix) :]: state.pop(key) for key in keys}, assign=True)  # the saved tensors, not copies
        except RuntimeError:
            raise LowrankError(f"weights in {path} do not match lowrank_config.json (layer {name}); save the model again") from None
        try:
            layer = layer.truncate(ranks[name])
        except LowrankError as error:
            raise LowrankError(f"layer {name}: {error}") from None
        state.update({prefix + key: value for key, value in layer.state_dict().items()})
        modules[name] = {**spec, **layer.spec()}
    resized = Plan(ratio=ratio, strategy=plan.strategy, shapes=plan.shapes, ranks=ranks, details=plan.details)
    return {**meta, "ratio": ratio, "modules": modules, "plan": resized.to_dict()}


def load(
    path: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    ratio: float | None = None,
    trust_remote_code: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, CompressionReport | None]:
    """Load a model saved by :func:`lowrank.save` (or any dense Hugging Face model directory).

    The skeleton is built from ``config.json``, the mixture-of-experts blocks that were unfused for
    compression are unfused again, every layer named in ``lowrank_config.json`` is replaced by an
    empty module of the saved structure and rank, and the saved state dict is loaded strictly (tied
    weights re-tied).

    The model carries no record of its compression: pass ``return_report=True`` to also get the
    :class:`~lowrank.CompressionReport` that ``lowrank_config.json`` holds (resized and recounted for
    ``ratio`` and ``dtype``), which :func:`lowrank.save` needs to save the model again.

    Args:
        path: the saved directory.
        device: where to put the model.
        dtype: cast the model to this dtype (default: as saved).
        ratio: for a model saved with ``--elastic``: the size to load, as the fraction of the targeted
            weights removed; its factors are truncated to the ranks that ratio gets (no recomputation).
        trust_remote_code: allow the directory's own Python code (``auto_map``) to run; lowrank's
            own outputs never need it.
        return_report: return ``(model, report)``; ``report`` is ``None`` for a dense model.

    Returns:
        The model in eval mode, or ``(model, report)`` with ``return_report``.

    Example:
        >>> model = load("out/pycode-30")  # doctest: +SKIP
        >>> smaller, report = load("out/pycode-elastic", ratio=0.5, return_report=True)  # doctest: +SKIP
        >>> save(smaller, "out/pycode-half", report=report)  # doctest: +SKIP
    """
    path = Path(path)
    config = load_config(path, trust_remote_code)
    meta = read_lowrank_config(path)
    if meta is None:
        if ratio is not None:
            raise LowrankError(f"{path} is a dense model; resizing needs a model compressed with --elastic")
        model = load_pretrained(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return (model, None) if return_report else model

    files = _weight_files(path)
    saved = _saved_shapes(files)
    floating = [kind for _, kind in saved.values() if kind is not None and kind.is_floating_point]
    saved_dtype = floating[0] if floating else torch.float32
    # The skeleton and the replacement modules are built on the meta device first: their shapes come
    # from lowrank_config.json, which is checked against the weight files' headers before anything is
    # allocated (a damaged rank must not ask for a petabyte).
    with torch.device("meta"):
        skeleton = model_class(config)._from_config(config, dtype=saved_dtype)
        unfuse_experts(skeleton, meta.get("unfused_experts", []))
        _replace_modules(skeleton, meta, path, saved_dtype)
    _check_against_files(skeleton, saved, path)
    del skeleton

    state = _read_state_dict(files)
    if ratio is not None:
        meta = _truncate(meta, state, ratio, path)
    model = model_class(config)._from_config(config, dtype=saved_dtype)
    unfuse_experts(model, meta.get("unfused_experts", []))
    _replace_modules(model, meta, path, saved_dtype)

    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise LowrankError(f"weights in {path} do not match lowrank_config.json ({problem}); save the model again")
    for module in model.modules():  # a structure sharing a tensor across layers (SharedBasisLinear) stores it once: tie the others to it
        link = getattr(module, "link_shared", None)
        if link is not None:
            link(model)
    model.tie_weights()
    check_finite(model, path)
    plan = Plan.from_dict(meta["plan"])
    parameters = dict(meta["parameters"])
    if ratio is not None:
        parameters["targeted_after"] = sum(p.numel() for name in plan.shapes for p in model.get_submodule(name).parameters())
        parameters["model_after"] = count_parameters(model)
        parameters["targeted_bits_after"] = sum(storage_bits(model.get_submodule(name)) for name in plan.shapes)
    report = CompressionReport(method=meta["method"], method_config=meta["method_config"], plan=plan, modules=meta["modules"], parameters=parameters)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is not None:
        cast_(model, dtype, report.parameters, plan.shapes)  # quantization scales keep their stored dtype
    model = model.to(device=device).eval()
    return (model, report) if return_report else model


def _replace_modules(model: nn.Module, meta: dict, path: Path, dtype: torch.dtype) -> None:
    """Swap every layer named in ``lowrank_config.json`` for an empty module of its saved structure."""
    for name, module_spec in meta["modules"].items():
        module = _empty_module(name, module_spec, path, dtype)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise LowrankError(f"{path / LOWRANK_CONFIG} names layer {name!r}, which this architecture lacks; save the model again") from None
        set_submodule(model, name, module)


def _empty_module(name: str, module_spec: dict, path: Path, dtype: torch.dtype | None) -> nn.Module:
    """An empty module of the structure and shapes one ``modules`` entry of ``lowrank_config.json`` names."""
    spec = dict(module_spec)
    structure = STRUCTURES.get(spec.pop("structure", None))
    if structure is None:
        raise LowrankError(f"{path / LOWRANK_CONFIG} names an unknown module structure for {name}; upgrade lowrank")
    in_features, out_features, bias = spec.pop("in_features"), spec.pop("out_features"), spec.pop("bias")
    try:
        return structure.empty(in_features, out_features, bias, spec, dtype=dtype)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise LowrankError(f"{path / LOWRANK_CONFIG} has an invalid entry for layer {name!r} ({error}); save the model again") from None


def _check_against_files(skeleton: nn.Module, saved: dict, path: Path) -> None:
    """Every tensor the rebuilt model expects has the saved shape (checked on ``meta``, before allocation)."""
    for key, tensor in skeleton.state_dict().items():
        if key in saved and tuple(tensor.shape) != saved[key][0]:
            raise LowrankError(
                f"{path / LOWRANK_CONFIG} does not match the weights: {key} is {list(saved[key][0])} in the file, "
                f"{list(tensor.shape)} by the config; save the model again"
            )
