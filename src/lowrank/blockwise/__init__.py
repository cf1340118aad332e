"""Block-by-block compression of models larger than memory (lazy loading, resumable)."""

from .capture import BlockInputs, capture_block_inputs, run_block
from .checkpoint import CheckpointReader, empty_model, materialize, release
from .pipeline import collect_blockwise_statistics, compress_blockwise

__all__ = [
    "BlockInputs",
    "CheckpointReader",
    "capture_block_inputs",
    "collect_blockwise_statistics",
    "compress_blockwise",
    "empty_model",
    "materialize",
    "release",
    "run_block",
]
