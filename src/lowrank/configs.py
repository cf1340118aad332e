"""JSON round-trip of plain dataclass configs."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import LowrankError

T = TypeVar("T")


def config_to_dict(config: Any) -> dict:
    """A config dataclass as a JSON-serializable dict."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config dataclass; unknown keys are an error (they are usually typos)."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LowrankError(f"{cls.__name__} has no option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
    return cls(**data)


def parse_overrides(cls: type[T], pairs: list[str]) -> T:
    """Build a config from ``KEY=VALUE`` strings (the CLI's ``--option``), converting to each field's type."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise LowrankError(f"bad --option {pair!r}; use KEY=VALUE with KEY one of: {', '.join(fields) or '(none)'}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                values[key] = raw.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, (int, float)):
                values[key] = type(default)(raw)
            else:
                values[key] = raw
        except ValueError:
            raise LowrankError(f"--option {key} expects a {type(default).__name__}, got {raw!r}") from None
    return cls(**values)
