"""Evaluation: perplexity, size and speed, measured the same way for dense and compressed models."""

from .perplexity import perplexity
from .size import count_parameters, disk_size
from .speed import generation_speed

__all__ = ["count_parameters", "disk_size", "generation_speed", "perplexity"]
