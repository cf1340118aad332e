"""Saving and loading compressed models as plain Hugging Face directories plus ``lowrank_config.json``."""

from .load import load, read_lowrank_config
from .paths import atomic_directory, check_output
from .save import LOWRANK_CONFIG, save

__all__ = ["LOWRANK_CONFIG", "atomic_directory", "check_output", "load", "read_lowrank_config", "save"]
