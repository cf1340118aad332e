"""Memory layout of factor weights for one-token (decode) products on CPU.

A matrix-vector product x·Wᵀ with W of shape (out, in) stored row-major reads W as ``out`` dot
products of length ``in``; stored column-major (the same values, ``W.t()`` contiguous) it reads W
as ``in`` scaled additions of length ``out``. On this CPU (MKL, one thread, float32) the second form
is faster for tall matrices, out > in, and slower for wide ones: ``benchmarks/results/layer-speed.md``,
*Factor layout*, measured column-major at 1.42× the speed of row-major for a 5632 × 698 ``up``
factor and 1.37× at 2048 × 698, but 0.86× and 0.80× for the wide 698 × 2048 and 698 × 5632 ``down``
factors. In bfloat16 the tall factors gained nothing (0.97× both), so only float32 and float64
weights are re-laid out.

The layout is a property of the tensor in memory, not of the stored format: the shape, the values
and therefore the state dict and the safetensors file are the same, and no copy is kept.
"""

from __future__ import annotations

import torch
from torch import nn

COLUMN_MAJOR_DTYPES = (torch.float32, torch.float64)


def tall_column_major_(linear: nn.Linear) -> bool:
    """Lay a tall float32/float64 CPU weight (out > in) out column-major in place, same shape and values; ``True`` if it changed.

    Meant to be called at a layer's forward pass (a check of two strides when already laid out), so
    that every way a weight arrives (``from_factors``, ``load_state_dict(assign=True)``, ``.to()``)
    ends up in the faster layout at its first call. The old storage is released: no copy is kept.

    Args:
        linear: an ``nn.Linear`` whose ``weight`` is re-laid out (``weight.data`` is replaced; the
            parameter object, and so an optimizer's reference to it, stays the same).

    Example:
        >>> layer = nn.Linear(3, 8)
        >>> before = layer.weight.detach().clone()
        >>> tall_column_major_(layer), layer.weight.stride(), torch.equal(layer.weight, before)
        (True, (1, 8), True)
        >>> tall_column_major_(layer)  # already laid out
        False
    """
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return False  # wrapped by an adapter (its own layer type, no plain weight): left as it is
    out_features, in_features = weight.shape
    if weight.device.type != "cpu" or weight.dtype not in COLUMN_MAJOR_DTYPES or out_features <= in_features or weight.stride() == (1, out_features):
        return False
    # Outside inference mode even when called inside it: the parameter must stay an ordinary tensor,
    # usable for training after a first call made under ``torch.inference_mode()``.
    with torch.inference_mode(False), torch.no_grad():
        weight.data = weight.data.t().contiguous().t()
    return True


def low_rank_plus(x: torch.Tensor, down: nn.Linear, up: nn.Linear, other: torch.Tensor) -> torch.Tensor:
    """up(down(x)) + ``other``, with ``up`` laid out by :func:`tall_column_major_` at the first call.

    The sum stays a separate step after the ``up`` matmul (and its bias), in the order of the plain
    modules and of the ``trust_remote_code`` modeling file: folding it into the matmul (``addmm``)
    saved one pass over the output, too little to measure at one token, and changed bfloat16
    outputs by rounding.

    Args:
        x: (..., in) input.
        down: the (rank, in) factor, bias-free. up: the (out, rank) factor, with or without bias.
        other: (..., out), what the layer adds (its quantized residual's or sparse part's product).

    Example:
        >>> down, up = nn.Linear(6, 2, bias=False), nn.Linear(2, 5)
        >>> x, other = torch.randn(3, 6), torch.randn(3, 5)
        >>> torch.allclose(low_rank_plus(x, down, up, other), up(down(x)) + other, atol=1e-6)
        True
    """
    tall_column_major_(up)
    return up(down(x)) + other
