"""Memory layout of factor weights for one-token (decode) products on CPU.

A matrix-vector product x·Wᵀ with W of shape (out, in) stored row-major reads W as ``out`` dot
products of length ``in``; stored column-major (the same values, ``W.t()`` contiguous) it reads W
as ``in`` scaled additions of length ``out``. On this CPU (MKL, one thread, float32) the second form
is faster for tall matrices, out > in, and slower for wide ones: ``benchmarks/results/layer-speed.md``,
*Factor layout*, measured column-major at 1.42× the speed of row-major for a 5632 × 698 ``up``
factor and 1.37× at 2048 × 698, but 0.86× and 0.80× for the wide 698 × 2048 and 698 × 5632 ``down``
factors. In bfloat16 neither plain layout helps (0.97× for the tall factors): torch's plain bfloat16
product reads a one-token weight at about half the float32 rate. oneDNN's packed (blocked) weight
layout, the one ``torch.compile``'s CPU backend uses for frozen linear layers, runs the same product
with the CPU's bfloat16 dot-product instructions: 1.25–1.59× the speed of row-major for the four
factor shapes (``python benchmarks/layer_speed.py --layout-only --out layer-speed-layout`` →
``layer-speed-layout.md``); in float32 it gained 0.93–1.10×, less than column-major for the tall
factors, so float32 keeps the plain kernels.

The column-major layout is a property of the tensor in memory, not of the stored format: the shape,
the values and therefore the state dict and the safetensors file are the same, and no copy is kept.
The bfloat16 packed form is a cached run-time copy (:class:`~lowrank.nn.prepared.PreparedCache`,
rebuilt when the weight changes, never in the state dict), like the int4 tiles of a quantized
residual: a decode step reads the same bytes, the factors take their bytes twice in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from .prepared import PreparedCache, tensor_key

COLUMN_MAJOR_DTYPES = (torch.float32, torch.float64)
# Weights run from oneDNN's packed layout on CPU (no gradient); float32 gained nothing over the
# column-major layout at one token (layer-speed.md), so it keeps the plain kernels.
PACKED_DTYPES = (torch.bfloat16,)
# torch sends a bfloat16 matmul to oneDNN only above this many multiply-adds (tokens · out · in; aten's
# ``mkldnn_gemm_min_size``, 16³) and runs smaller ones in its own kernel, which has a few µs of fixed
# cost against oneDNN's ~30; a product this small stays with F.linear.
PACKED_MIN_MULTIPLY_ADDS = 16**3


def _onednn_packing() -> bool:
    """Whether this torch and this CPU can run bfloat16 from oneDNN's packed layout: oneDNN's bfloat16
    path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only CPU packing raises, so the
    factors keep torch's own kernels."""
    try:
        return (
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._linear_pointwise is not None
            and torch.ops.mkldnn._reorder_linear_weight is not None
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        )
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


ONEDNN_PACKING = _onednn_packing()


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
    """up(down(x)) + ``other``, both factors run by :func:`run_linear` (tall float32 ``up`` column-major,
    bfloat16 from the oneDNN packed form).

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
    return run_linear(up, run_linear(down, x)) + other


def packs(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`prepared_linear` runs ``x``·``weight``ᵀ from the oneDNN packed form: a bfloat16 CPU
    weight and input, no gradient recorded, oneDNN present, and a product large enough that torch
    would run it in oneDNN anyway (:data:`PACKED_MIN_MULTIPLY_ADDS`)."""
    return (
        ONEDNN_PACKING
        and weight.dtype in PACKED_DTYPES
        and x.dtype == weight.dtype
        and weight.device.type == "cpu"
        and x.numel() * weight.shape[0] > PACKED_MIN_MULTIPLY_ADDS
        and not torch.is_grad_enabled()
    )


def prepared_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache: PreparedCache) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, from the oneDNN packed form of ``weight`` where :func:`packs` says so.

    The packed form is built once into ``cache`` and rebuilt only when ``weight`` changes (new
    storage or an in-place write); the result equals ``F.linear``'s up to the order of float32
    accumulation.

    Args:
        x: (..., in) input. weight: (out, in). bias: (out,) or ``None``.
        cache: where the packed form lives (one per weight).

    Example:
        >>> weight, cache = torch.randn(64, 128).bfloat16(), PreparedCache()
        >>> x = torch.randn(2, 128).bfloat16()
        >>> with torch.no_grad():
        ...     y = prepared_linear(x, weight, None, cache)
        >>> torch.allclose(y.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2), cache.builds == ONEDNN_PACKING
        (True, True)
    """
    if not packs(weight, x):
        return F.linear(x, weight, bias)
    # The batch-size hint 1 picks the layout for one-token decode; measured no slower than plain
    # F.linear at 8-512 tokens either.
    packed = cache.get((tensor_key(weight),), lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def run_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for a factor of a compressed layer, in its fastest run-time form on CPU.

    bfloat16 without gradients: from the oneDNN packed form (:func:`prepared_linear`, cached on the
    module); float32/float64: a tall weight laid out column-major (:func:`tall_column_major_`).
    A module with forward hooks, or of another type than ``nn.Linear`` (an adapter's wrapper), is
    called as it is, so its hooks and wrappers run.

    Example:
        >>> up = nn.Linear(2, 5)
        >>> x = torch.randn(3, 2)
        >>> torch.allclose(run_linear(up, x), F.linear(x, up.weight, up.bias))
        True
    """
    if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        tall_column_major_(linear)
        return linear(x)
    weight = linear.weight
    if packs(weight, x):
        cache = linear.__dict__.get("_packed_weight")
        if cache is None:  # a plain attribute, not a buffer: never in the state dict (a deep copy starts empty)
            cache = linear.__dict__["_packed_weight"] = PreparedCache()
        return prepared_linear(x, weight, linear.bias, cache)
    tall_column_major_(linear)
    return F.linear(x, weight, linear.bias)
