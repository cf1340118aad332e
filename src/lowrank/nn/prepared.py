"""Run-time forms of stored tensors, built once and rebuilt only when what they derive from changes.

A compressed layer stores its weights in the form that is smallest on disk (packed codes, int16
indices); the fastest kernels want another form (int4 tiles, int32 indices, a sparse tensor). The
run-time form is kept here, as a plain attribute rather than a buffer, so it never enters the state
dict, the buffer list or the storage accounting; a model saved after running is byte for byte the
model saved before.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def tensor_key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents cheaply: its storage, its in-place version, its dtype and device.

    ``_version`` counts in-place writes (``copy_`` in ``load_state_dict``, an optimizer step), and
    ``data_ptr`` changes when the tensor is replaced (``.to()``, ``param.data = ...``).
    """
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)


class PreparedCache:
    """One cached value, rebuilt when its key changes.

    Example:
        >>> cache, source = PreparedCache(), torch.ones(3)
        >>> first = cache.get((tensor_key(source),), lambda: source * 2)
        >>> first is cache.get((tensor_key(source),), lambda: source * 2)
        True
        >>> _ = source.add_(1)  # an in-place write bumps the version, so the next get rebuilds
        >>> cache.get((tensor_key(source),), lambda: source * 2).tolist()
        [4.0, 4.0, 4.0]
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None
        self.builds = 0

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key != self.key:
            with torch.no_grad():
                self.value = build()
            self.key = key
            self.builds += 1
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None

    def __deepcopy__(self, memo: dict) -> "PreparedCache":
        return PreparedCache()  # a copy of a model rebuilds its own run-time tensors from its own weights

    def __getstate__(self) -> dict:
        return {}  # nor is the cache pickled with the model

    def __setstate__(self, state: dict) -> None:
        self.__init__()
