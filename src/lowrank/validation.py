"""Checks of user-given values (counts, ratios, regular expressions, devices): one line each on failure.

The command line, :class:`lowrank.job.CompressJob` and the library functions that take the same
values call these, so every entry point refuses a bad value with the same words.
"""

from __future__ import annotations

import re

from .errors import LowrankError


def check_positive(**values: int | None) -> None:
    """One-line error for any count option that is not a positive integer (``None`` means unset)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise LowrankError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_patterns(**patterns: list[str] | None) -> None:
    """One-line error for a regular expression that does not compile."""
    for option, values in patterns.items():
        for pattern in values or []:
            try:
                re.compile(pattern)
            except re.error as error:
                raise LowrankError(f"--{option} {pattern!r} is not a valid regular expression ({error}); e.g. 'mlp' or r'layers\\.\\d+\\.self_attn'") from None


def check_ratio(ratio: float, option: str = "--ratio") -> None:
    if not (0.0 <= ratio < 1.0):  # also catches NaN
        raise LowrankError(f"{option} must be in [0, 1), got {ratio}; e.g. 0.3 removes 30 % of the targeted parameters")



def check_device(device: str) -> None:
    """One-line error for a device torch does not know or this machine lacks."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise LowrankError(f"--device {device!r} is not a device torch knows; use cpu or cuda (cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LowrankError(f"--device {device} but this machine has no CUDA GPU; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise LowrankError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise LowrankError(f"--device {device} but MPS is not available here; use --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise LowrankError(f"--device {device!r} is not supported; use cpu or cuda")
