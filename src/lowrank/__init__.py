"""lowrank: find and exploit low-rank structure in the weight matrices of neural networks.

The compression pipeline is a chain of explicit stages::

    stats = lowrank.calibrate(model, tokenizer, text, num_samples=64, seq_len=256)
    plan = lowrank.allocate(model, ratio=0.3, method="whiten", stats=stats)
    report = lowrank.compress_(model, plan, method="whiten", stats=stats)
    lowrank.save(model, "out/", report=report, tokenizer=tokenizer)
    model = lowrank.load("out/")
    lowrank.perplexity(model, tokenizer, eval_text)
"""

# Every loader here reads local files only (``local_files_only=True``); the ``lowrank`` command also
# sets ``HF_HUB_OFFLINE=1`` for its process, but importing the library changes no environment.
#
# The public names are imported on first use (PEP 562), so ``import lowrank`` does not load torch:
# the ``lowrank`` command can then set ``OMP_WAIT_POLICY`` before torch's OpenMP runtime starts.
import importlib

_EXPORTS = {
    "Plan": "allocation", "allocate": "allocation", "analyze": "analysis",
    "LayerStatistics": "calibration", "calibrate": "calibration", "collect_statistics": "calibration",
    "CompressionReport": "compress", "compress_": "compress", "LowrankError": "errors",
    "CompensateConfig": "compensate", "compensate_": "compensate",
    "count_parameters": "evaluation", "disk_size": "evaluation", "generation_speed": "evaluation", "perplexity": "evaluation",
    "load": "io", "save": "io", "get_method": "methods", "method_names": "methods",
    "LowRankLinear": "nn", "find_targets": "nn",
}  # fmt: skip


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:  # a submodule: lowrank.io, lowrank.nn, ...
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "CompensateConfig",
    "CompressionReport",
    "LayerStatistics",
    "LowRankLinear",
    "LowrankError",
    "Plan",
    "allocate",
    "analyze",
    "calibrate",
    "collect_statistics",
    "compensate_",
    "compress_",
    "count_parameters",
    "disk_size",
    "find_targets",
    "generation_speed",
    "get_method",
    "load",
    "method_names",
    "perplexity",
    "save",
]
