"""Error compensation: low-rank corrections of quantized and pruned models (EoRA, with GPTQ / Wanda bases).

The pipeline::

    stats = lowrank.calibrate(model, tokenizer, text, gradients=True)
    report = compensate_(model, stats, CompensateConfig(base="gptq:3"), budget=0.05)
    lowrank.save(model, "out/", report=report, tokenizer=tokenizer)
"""

from .base import BaseSpec, CompressedBase, compress_base
from .eora import correction
from .layer import CompensateConfig, base_of, factorize, layer_errors
from .pipeline import compensate_, compensation_ranks

__all__ = [
    "BaseSpec",
    "CompensateConfig",
    "CompressedBase",
    "base_of",
    "compensate_",
    "compensation_ranks",
    "compress_base",
    "correction",
    "factorize",
    "layer_errors",
]
