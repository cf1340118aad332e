"""lowrank: find and exploit low-rank structure in the weight matrices of neural networks.

The compression pipeline is a chain of explicit stages::

    stats = lowrank.calibrate(model, tokenizer, text, num_samples=64, seq_len=256)
    plan = lowrank.allocate(model, ratio=0.3, method="whiten", stats=stats)
    lowrank.compress_(model, plan, method="whiten", stats=stats)
    lowrank.save(model, "out/", tokenizer=tokenizer)
    model = lowrank.load("out/")
    lowrank.perplexity(model, tokenizer, eval_text)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import methods  # noqa: E402, F401  (registers the built-in methods)
from .allocation import Plan, allocate  # noqa: E402
from .analysis import analyze  # noqa: E402
from .calibration import LayerStatistics, calibrate, collect_statistics  # noqa: E402
from .compress import CompressionReport, compress_  # noqa: E402
from .errors import LowrankError  # noqa: E402
from .evaluation import count_parameters, disk_size, generation_speed, perplexity  # noqa: E402
from .io import load, save  # noqa: E402
from .methods import get_method, method_names  # noqa: E402
from .nn import LowRankLinear, find_targets  # noqa: E402

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
