"""Reading a checkpoint one module at a time, and writing one shard per block.

A model larger than memory is built as a skeleton whose parameters live on the ``meta`` device
(no storage); :func:`materialize` reads just one module's tensors from the safetensors shards when
it is needed and :func:`release` sends them back to ``meta`` when it is done. Shard files are
opened per call and closed again: a memory-mapped file keeps every page that was read counted in
the process's resident memory for as long as it stays mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from collections import defaultdict
from pathlib import Path

import accelerate
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import LowrankError
from ..models import DTYPES, model_class

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Which shard holds which tensor of a Hugging Face safetensors checkpoint.

    Args:
        path: the model directory (``model.safetensors`` or an index with shards).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise LowrankError(
                f"{self.path} has no safetensors weights (model.safetensors or {INDEX}); "
                "convert the checkpoint with save_pretrained(..., safe_serialization=True)"
            )
        for file in set(self.weight_map.values()):
            if not (self.path / file).is_file():
                raise LowrankError(f"{self.path} lacks the shard {file} named by its index; the download is incomplete")

    def read(self, keys: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors called ``keys`` (each shard opened once, then closed)."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.weight_map[key]].append(key)
        tensors = {}
        for file, names in by_file.items():
            with safe_open(str(self.path / file), framework="pt", device=str(device)) as handle:
                for name in names:
                    tensors[name] = handle.get_tensor(name)
        return tensors

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    @property
    def num_bytes(self) -> int:
        """Total size of the shard files on disk."""
        return sum((self.path / file).stat().st_size for file in set(self.weight_map.values()))


def empty_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``path/config.json`` with every parameter on ``meta`` (buffers are real: rotary
    frequencies and the like are computed, not stored)."""
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    with accelerate.init_empty_weights(include_buffers=False):
        model = model_class(config)._from_config(config, dtype=dtype)
    return model.eval()


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (an output head tied to the embeddings)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device: str | torch.device = "cpu", skip: set[str] = frozenset()) -> None:
    """Replace ``module``'s meta tensors by those of the checkpoint (``prefix`` = its dotted name).

    Tensors keep the dtype the checkpoint stores. Keys in ``skip`` (tied weights) are left alone.
    """
    wanted = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        key = f"{prefix}.{name}" if prefix else name
        if tensor.device.type != "meta" or key in skip:
            continue
        if key not in reader:
            raise LowrankError(
                f"the checkpoint in {reader.path} has no tensor {key!r}; its names differ from the model's, compress it without --blockwise"
            )
        wanted[key] = name
    tensors = reader.read(list(wanted), device=device)
    state = {name: tensors[key] for key, name in wanted.items()}
    module.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Free ``module``'s tensors (parameters and buffers go back to ``meta``)."""
    module.to("meta")


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` atomically (a crash leaves no half-written shard behind)."""
    partial = path.with_name(path.name + ".partial")
    save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)


def write_index(directory: Path, shards: list[str]) -> list[str]:
    """Rename ``shards`` (in order) to ``model-0000i-of-0000n.safetensors`` and write the index."""
    weight_map, total = {}, 0
    names = []
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / shard, directory / name)
        names.append(name)
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                weight_map[key] = name
                slice_ = handle.get_slice(key)
                total += _num_bytes(slice_.get_shape(), slice_.get_dtype())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return names


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _num_bytes(shape, dtype: str) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * _SAFETENSORS_BYTES.get(dtype, 4)


def return_freed_memory() -> None:
    """Ask glibc to give large freed buffers back to the system at once.

    By default glibc serves allocations of up to 32 MB from its heap after the first large free,
    and a heap fragmented by one block's weights is not returned: resident memory then creeps up
    block after block. With a 1 MB mmap threshold every weight-sized tensor gets its own mapping,
    released when freed. No-op off glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
