"""PEFT interchange: write adapters as PEFT LoRA checkpoints, read PEFT LoRA checkpoints back.

A PEFT LoRA checkpoint is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r); PEFT adds
(lora_alpha / r)·B·A to the module's output. We write lora_alpha = r, so the scaling is 1.

Two export paths, because initializations like PiSSA change the base weights:

- ``against="residual"``: the adapter as it is (B, A), to load on the *residual* base model that
  :func:`save_residual_base` writes (base + BA = the adapted weight);
- ``against="original"``: the learned change ΔW = BA − B₀A₀ = [B, −B₀]·[A; A₀] as a rank-2r LoRA,
  to load on the *original*, untouched base model.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import LowrankError
from ..io import atomic_directory, save
from ..json_files import read_json_object
from ..nn import is_linear, linear_shape, linear_weight, set_submodule
from .apply import adapter_layers, base_model, warn_base_changed
from .layer import LoraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
AGAINST = ("original", "residual")
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def changes_base(layer: nn.Module) -> bool:
    """Whether an adapter layer's base holds a residual rather than the original weight."""
    return not isinstance(layer, LoraLinear) or layer.initial_down.shape[0] > 0


def peft_adapter_config(ranks: dict[str, int], fan_in_fan_out: bool, base_model_name_or_path: str = "", task_type: str = "CAUSAL_LM") -> dict:
    """The ``adapter_config.json`` of a scaling-1 LoRA on modules ``ranks`` (``{module name: rank}``)."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    different = {name: r for name, r in ranks.items() if r != rank}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": different,
        "alpha_pattern": dict(different),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft(
    model: nn.Module, out_dir: str | Path, against: str = "original", base_model_name_or_path: str = "", overwrite: bool = False
) -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA checkpoint that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: a model adapted by :func:`adapt_` (or :func:`import_peft`).
        out_dir: the adapter directory to write (``adapter_config.json`` + ``adapter_model.safetensors``).
        against: ``"original"`` (rank 2r, ΔW = BA − B₀A₀, loads on the original base model) or
            ``"residual"`` (rank r, loads on the base written by :func:`save_residual_base`).
        base_model_name_or_path: recorded in ``adapter_config.json``.
        overwrite: replace an existing ``out_dir``.

    Example:
        >>> export_peft(model, "out/adapter", against="original")  # doctest: +SKIP
        >>> peft.PeftModel.from_pretrained(original_model, "out/adapter")  # doctest: +SKIP
    """
    if against not in AGAINST:
        raise LowrankError(f"unknown export target {against!r}; choose one of: {', '.join(AGAINST)}")
    layers = adapter_layers(model)
    if not layers:
        raise LowrankError("the model has no adapters to export; call adapt_ first")
    kinds = {isinstance(layer.base_layer, Conv1D) for layer in layers.values()}
    if len(kinds) > 1:
        raise LowrankError("PEFT needs one fan_in_fan_out for all modules; adapt Conv1D and nn.Linear layers in separate exports")
    if against == "residual" and any(changes_base(layer) for layer in layers.values()):
        warn_base_changed("export_peft(against='residual') wrote an adapter for the residual base model (save it with save_residual_base)")

    tensors, ranks = {}, {}
    for name, layer in layers.items():
        factors = layer.delta_factors() if against == "original" else layer.adapter_factors()
        tensors[f"{PREFIX}{name}.lora_A.weight"] = factors.down.float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = factors.up.float().contiguous()
        ranks[name] = factors.rank
    config = peft_adapter_config(ranks, fan_in_fan_out=kinds.pop(), base_model_name_or_path=base_model_name_or_path)
    with atomic_directory(out_dir, overwrite) as temporary:
        save_file(tensors, str(temporary / WEIGHTS_NAME), metadata={"format": "pt"})
        (temporary / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def save_residual_base(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False, *, report=None) -> Path:
    """Save ``model`` without its adapters: the residual base that ``against="residual"`` adapters load on.

    A compressed model is saved with :func:`lowrank.save` and its ``report`` (the
    :class:`~lowrank.CompressionReport` of the model the adapters were added to; load it with
    :func:`lowrank.load`); a dense one as a plain Hugging Face directory.

    Example:
        >>> model, report = lowrank.load("out/pycode-30", return_report=True)  # doctest: +SKIP
        >>> save_residual_base(model, "out/base", report=report, tokenizer=tokenizer)  # doctest: +SKIP
    """
    if any(changes_base(layer) for layer in adapter_layers(model).values()):
        warn_base_changed("save_residual_base saved residual weights W − B₀A₀ in place of the original weights")
    return save(base_model(model), out_dir, report=report, tokenizer=tokenizer, overwrite=overwrite)


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file, weights_file = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise LowrankError(f"{str(adapter_dir)!r} is not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = read_json_object(config_file, "repair or re-export the adapter")
    if config.get("peft_type") != "LORA":
        raise LowrankError(f"{config_file} is a {config.get('peft_type')} adapter; only LORA adapters can be imported")
    if config.get("use_dora") or config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise LowrankError(f"{config_file} uses DoRA or LoRA biases, which lowrank cannot import; merge it with peft instead")
    for key in ("lora_alpha", "r"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
            raise LowrankError(f"{config_file} has {key} = {value!r}; it must be a positive finite number")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise LowrankError(f"{config_file} has a {key} that is not a mapping of layer patterns to numbers")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise LowrankError(f"{config_file} has an invalid {key} regular expression {pattern!r} ({error})") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LowrankError(f"{config_file} has {key}[{pattern!r}] = {value!r}; it must be a positive finite number")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise LowrankError(f"{weights_file} is not a readable safetensors file ({error}); re-export the adapter") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LowrankError(f"{weights_file} has NaN or Inf values in {key}; the adapter is damaged, re-export it")
    return config, tensors


def _pattern_value(patterns: dict, name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", name):
            return value
    return default


@torch.no_grad()
def import_peft(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Load a PEFT LoRA checkpoint into ``model`` as trainable :class:`LoraLinear` adapters (in place).

    The scaling (lora_alpha / r, or / √r with rsLoRA) is folded into B, so the adapted model computes
    what the PEFT model computes. The base weights are not touched; everything else is frozen.

    Args:
        model: the base model the adapter was trained on (a plain Hugging Face model, not a PeftModel).
        adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The adapted module names.

    Example:
        >>> import_peft(model, "out/adapter")  # doctest: +SKIP
    """
    config, tensors = _read_adapter(Path(adapter_dir))
    if adapter_layers(model):
        raise LowrankError("this model already has adapters; merge them (merge_adapters_) before importing another")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise LowrankError(f"{adapter_dir} holds {key!r}, which is not a LoRA linear weight; lowrank imports LoRA on linear layers only")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    model.requires_grad_(False)
    for name, pair in factors.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LowrankError(f"the adapter targets {name!r}, which this model lacks; load it on the model it was trained for") from None
        if not is_linear(layer) or set(pair) != {"A", "B"}:
            raise LowrankError(f"the adapter's entry for {name!r} is not a LoRA pair on a linear layer")
        down, up = pair["A"], pair["B"]
        out_features, in_features = linear_shape(layer)
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
            raise LowrankError(
                f"the adapter's LoRA factors for {name!r} have shapes A {list(down.shape)}, B {list(up.shape)}, "
                f"which do not fit its {out_features}×{in_features} weight; load it on the model it was trained for"
            )
        rank = pair["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank))
        scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        dtype = linear_weight(layer).dtype
        up = (pair["B"].to(torch.float64) * scaling).to(dtype)
        set_submodule(model, name, LoraLinear(layer, up=up, down=pair["A"].to(dtype)))
    return sorted(factors)
