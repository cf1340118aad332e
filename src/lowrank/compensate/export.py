"""Export for serving: the base as a plain Hugging Face model plus the correction as a PEFT LoRA adapter.

A quantized base plus a LoRA adapter is what serving engines run. The correction of every layer is
a LoRA pair (``lora_A`` = down, ``lora_B`` = up, scaling 1, per-layer ranks in ``rank_pattern``)
written by :func:`lowrank.adapt.peft_export.peft_adapter_config`'s conventions, so
``peft.PeftModel.from_pretrained(base, adapter_dir)`` computes base + correction.

The base is written *dequantized*, in the model's dtype: no library that transformers loads a
group-quantized checkpoint with (torchao, compressed-tensors, auto-gptq / gptqmodel, optimum-quanto,
bitsandbytes, hqq) is installed here, so no quantized format could be tested to load. Its values
are exactly the quantized (or pruned) weights, so a serving stack can re-quantize them losslessly
with the same group size; the packed form is the ``lowrank.save`` directory (``lowrank.load``, or
transformers with ``trust_remote_code=True``).

Quantized factors (``--factor-bits``, a :class:`~lowrank.nn.quantized_factors.QuantizedCorrectionLinear`)
are written *dequantized* too, in the model's dtype: PEFT's LoRA has no quantized ``lora_A`` /
``lora_B`` weights, so the adapter stores the values the codes stand for (the same as what the
layer computes with), at the model dtype's size, not the codes' (the ``lowrank.save`` directory keeps
the codes), which ``lowrank.load`` and ``trust_remote_code`` loading both read.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapt.peft_export import CONFIG_NAME, PREFIX, WEIGHTS_NAME, peft_adapter_config
from ..errors import LowrankError
from ..io import save
from ..io.paths import atomic_directory
from ..nn import LowRankPlusSparseLinear, LowRankQuantLinear, set_submodule
from ..nn.quantized_factors import QuantizedCorrectionLinear

BASE_DIR = "base"
ADAPTER_DIR = "adapter"


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) base matrix of a compensated layer, in its dtype: the dequantized codes or the sparse matrix.

    Example:
        >>> from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors
        >>> from lowrank.linalg.quantize import quantize_groups
        >>> q = quantize_groups(torch.randn(8, 32), 4, 16)
        >>> layer = LowRankQuantLinear.from_factors(LowRankQuantFactors(torch.randn(8, 2), torch.randn(2, 32), q), None, torch.float32)
        >>> torch.equal(base_weight(layer), q.dequantize(torch.float32))
        True
    """
    if isinstance(layer, LowRankQuantLinear):
        return layer.residual(layer.up.weight.dtype)
    if isinstance(layer, QuantizedCorrectionLinear):
        return layer.residual(layer.dtype)
    if isinstance(layer, LowRankPlusSparseLinear):
        rows = torch.repeat_interleave(torch.arange(layer.out_features, device=layer.sparse_values.device), layer.sparse_crow_indices.diff())
        sparse = torch.zeros(layer.out_features, layer.in_features, dtype=layer.sparse_values.dtype, device=layer.sparse_values.device)
        return sparse.index_put((rows, layer.sparse_col_indices.long()), layer.sparse_values.detach())
    raise LowrankError(f"{type(layer).__name__} is not a compensated layer")


def compensated_layers(model: nn.Module) -> dict[str, nn.Module]:
    structures = (LowRankQuantLinear, LowRankPlusSparseLinear, QuantizedCorrectionLinear)
    return {name: module for name, module in model.named_modules() if isinstance(module, structures)}


def correction_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(up (out, rank), down (rank, in), bias) of a compensated layer, in its dtype; quantized factors dequantized.

    Example:
        >>> from lowrank.nn.lowrank_quant_linear import LowRankQuantFactors
        >>> from lowrank.linalg.quantize import quantize_groups
        >>> layer = LowRankQuantLinear.from_factors(LowRankQuantFactors(torch.ones(8, 2), torch.ones(2, 32), quantize_groups(torch.randn(8, 32), 4, 16)), None, torch.float32)
        >>> [tuple(t.shape) for t in correction_of(layer)[:2]]
        [(8, 2), (2, 32)]
    """
    if isinstance(layer, QuantizedCorrectionLinear):
        up, down = layer.factors(layer.dtype)
        return up, down, None if layer.bias is None else layer.bias.detach()
    bias = layer.up.bias
    return layer.up.weight.detach(), layer.down.weight.detach(), None if bias is None else bias.detach()


@torch.no_grad()
def export_peft_compensation(
    model: nn.Module, out_dir: str | Path, tokenizer=None, base_model_name_or_path: str = "", overwrite: bool = False
) -> Path:
    """Write ``out_dir/base`` (the base, dequantized, as a plain HF model) and ``out_dir/adapter`` (the corrections as PEFT LoRA).

    Args:
        model: a model compensated by :func:`lowrank.compensate.compensate_` (or loaded with ``lowrank.load``).
        out_dir: directory to create.
        tokenizer: saved with the base when given.
        base_model_name_or_path: recorded in ``adapter_config.json`` (default: the ``base`` directory beside it).
        overwrite: replace an existing ``out_dir``.

    Example:
        >>> export_peft_compensation(model, "out/gptq3-peft", tokenizer=tokenizer)  # doctest: +SKIP
        >>> base = AutoModelForCausalLM.from_pretrained("out/gptq3-peft/base")  # doctest: +SKIP
        >>> served = peft.PeftModel.from_pretrained(base, "out/gptq3-peft/adapter")  # doctest: +SKIP
    """
    layers = compensated_layers(model)
    if not layers:
        raise LowrankError("the model has no compensated layers to export; run compensate_ first (or lowrank.load a compensated directory)")
    dense = copy.deepcopy(model)
    tensors, ranks = {}, {}
    for name, layer in layers.items():
        up, down, bias = correction_of(layer)
        replacement = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=up.device, dtype=up.dtype)
        replacement.weight.copy_(base_weight(layer))
        if bias is not None:
            replacement.bias.copy_(bias)
        set_submodule(dense, name, replacement)
        if layer.rank == 0:
            continue  # a layer the budget left uncorrected: PEFT has no rank-0 LoRA
        tensors[f"{PREFIX}{name}.lora_A.weight"] = down.contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = up.contiguous().clone()
        ranks[name] = layer.rank
    if not ranks:
        raise LowrankError("no layer has a correction (every rank is 0); nothing to export as an adapter")
    config = peft_adapter_config(ranks, fan_in_fan_out=False, base_model_name_or_path=base_model_name_or_path or f"../{BASE_DIR}")
    with atomic_directory(out_dir, overwrite) as temporary:
        save(dense, temporary / BASE_DIR, tokenizer=tokenizer)
        adapter = temporary / ADAPTER_DIR
        adapter.mkdir()
        save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
        (adapter / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)
