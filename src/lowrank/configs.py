"""JSON round-trip of plain dataclass configs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from .errors import LowrankError

T = TypeVar("T")


def config_to_dict(config: Any) -> dict:
    """A config dataclass as a JSON-serializable dict."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config dataclass from its JSON form, checked as a user's options are.

    Unknown keys are an error (a typo, or a file written by a newer lowrank), and so is another
    version or a value outside what the method can use (:func:`validate_config`).
    """
    if not isinstance(data, dict):
        raise LowrankError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LowrankError(f"{cls.__name__} has no option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
    config = cls(**data)
    for field in dataclasses.fields(cls):
        default = field.default
        value = getattr(config, field.name)
        if default is not dataclasses.MISSING and default is not None and type(value) is not type(default) and not (
            isinstance(default, float) and type(value) is int
        ):
            raise LowrankError(f"{cls.__name__}.{field.name} must be a {type(default).__name__}, got {value!r}")
    validate_config(config)
    return config


# Valid values of the option names the method configs share. A value outside them would fail deep
# inside a decomposition (or silently do something else), so it is refused where it is read.
PRECISIONS = ("float32", "float64")
# "mixed": the covariance's factorization (Cholesky / eigh, ill-conditioned, once per input) in
# float64, the SVD of the whitened weight (well-conditioned, the expensive part) in float32. Offered
# by the configs that set ``mixed_precision``; see benchmarks/results/precision.md.
MIXED = "mixed"
RANGES: dict[str, tuple[float, float, str]] = {
    "damp": (0.0, float("inf"), "≥ 0"),
    "fisher_damp": (0.0, float("inf"), "≥ 0"),
    "alpha": (0.0, 10.0, "in [0, 10]"),
    "nonzeros": (1e-9, 2**20, "positive (a count of atoms per row, or below 1 a fraction of the rank)"),
    "sparse_fraction": (0.0, 1.0 - 1e-9, "in [0, 1)"),
    "iterations": (0, 1000, "in [0, 1000]"),
    "bits": (2, 8, "in [2, 8]"),
    "group_size": (1, 2**20, "a positive integer"),
}


def validate_config(config: Any) -> None:
    """One-line error for a config value outside what its method can use."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "version" and value != field.default:
            raise LowrankError(f"{type(config).__name__} version {value!r} is not this lowrank's ({field.default}); upgrade lowrank")
        allowed = PRECISIONS + ((MIXED,) if getattr(type(config), "mixed_precision", False) else ())
        if field.name == "precision" and value not in allowed:
            raise LowrankError(f"option precision must be one of {', '.join(allowed)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise LowrankError(f"option {field.name} must be a finite number, got {value!r}")
        if field.name in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, text = RANGES[field.name]
            if not low <= value <= high:
                raise LowrankError(f"option {field.name} must be {text}, got {value!r}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_overrides(cls: type[T], pairs: list[str]) -> T:
    """Build a config from ``KEY=VALUE`` strings (the CLI's ``--option``), converting to each field's type."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key == "version":
            settable = [name for name in fields if name != "version"]
            raise LowrankError(f"bad --option {pair!r}; use KEY=VALUE with KEY one of: {', '.join(settable) or '(none)'}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError(raw)
                values[key] = raw.lower() in _TRUE
            elif isinstance(default, (int, float)):
                values[key] = type(default)(raw)
            else:
                values[key] = raw
        except ValueError:
            kind = "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"
            raise LowrankError(f"--option {key} expects {kind}, got {raw!r}") from None
    config = cls(**values)
    validate_config(config)
    return config
