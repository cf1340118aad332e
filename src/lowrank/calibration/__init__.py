"""Calibration: run text through the model and accumulate per-layer input statistics."""

from .calibrate import calibrate, collect_statistics
from .data import read_text, sample_windows, tokenize_stream
from .statistics import InputStatistics, LayerStatistics, StatisticsCollector, load_statistics, save_statistics

__all__ = [
    "InputStatistics",
    "LayerStatistics",
    "StatisticsCollector",
    "calibrate",
    "collect_statistics",
    "load_statistics",
    "read_text",
    "sample_windows",
    "save_statistics",
    "tokenize_stream",
]
