"""Saving and loading compressed models as plain Hugging Face directories plus ``lowrank_config.json``."""

from .load import load, read_lowrank_config
from .save import LOWRANK_CONFIG, atomic_directory, save

__all__ = ["LOWRANK_CONFIG", "atomic_directory", "load", "read_lowrank_config", "save"]
