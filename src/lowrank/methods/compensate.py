"""``compensate``: a quantized or pruned base plus the EoRA low-rank correction of its error.

The plan's rank of a layer is the rank of its *correction*; the base (codes, scales, sparse
values and indices) comes on top. ``lowrank compensate`` makes such plans from ``--rank`` or an
extra-storage ``--budget``; the math lives in :mod:`lowrank.compensate`.
"""

from __future__ import annotations

from ..compensate.layer import CompensateConfig, build, factorize
from .registry import Method, register_method

register_method(
    Method(
        name="compensate",
        config_class=CompensateConfig,
        factorize=factorize,
        build=build,
        needs_statistics=True,
        nested=False,
        description="base quantizer or pruner (gptq:4, rtn:3, wanda:2:4, ...) plus the whitened low-rank correction of its error (EoRA); "
        "the rank is the correction's, on top of the base: use `lowrank compensate`",
    )
)
