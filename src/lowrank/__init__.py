"""lowrank: find and exploit low-rank structure in the weight matrices of neural networks.

The compression pipeline is a chain of explicit stages::

    stats = lowrank.calibrate(model, tokenizer, text, num_samples=64, seq_len=256)
    plan = lowrank.allocate(model, ratio=0.3, method="whiten", stats=stats)
    lowrank.compress_(model, plan, method="whiten", stats=stats)
    lowrank.save(model, "out/", tokenizer=tokenizer)
    model = lowrank.load("out/")
    lowrank.perplexity(model, tokenizer, eval_text)
"""

# Every loader here reads local files only (``local_files_only=True``); the ``lowrank`` command also
# sets ``HF_HUB_OFFLINE=1`` for its process, but importing the library changes no environment.
from . import methods  # noqa: F401  (registers the built-in methods)
from .allocation import Plan, allocate
from .analysis import analyze
from .calibration import LayerStatistics, calibrate, collect_statistics
from .compress import CompressionReport, compress_
from .errors import LowrankError
from .evaluation import count_parameters, disk_size, generation_speed, perplexity
from .io import load, save
from .methods import get_method, method_names
from .nn import LowRankLinear, find_targets

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "LayerStatistics",
    "LowRankLinear",
    "LowrankError",
    "Plan",
    "allocate",
    "analyze",
    "calibrate",
    "collect_statistics",
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
