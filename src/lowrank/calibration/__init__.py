"""Calibration: run text through the model and accumulate per-layer input statistics."""

from .calibrate import calibrate, calibration_batches, collect_statistics
from .data import read_text, sample_windows, tokenize_stream
from .formats import calibration_inputs, collect_masked_statistics
from .statistics import InputStatistics, LayerStatistics, StatisticsCollector, load_statistics, save_statistics

__all__ = [
    "calibration_batches",
    "calibration_inputs",
    "collect_masked_statistics",
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
