"""Is this value acceptable? Checks shared by the plan, its specs and the methods.

Each check raises ``ValueError`` whose message names the value and the valid range, so the CLI
and the app can show it as it is.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_BLOCKS", "MAX_RANK", "MAX_RATIO", "check_bool", "check_float", "check_int"]

MAX_BLOCKS = 4096  # far above any real model; guards against absurd input
MAX_RANK = 65536
MAX_RATIO = 0.9


def check_int(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``; bool is refused (a plan never means True for a block id)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value!r}")
    return value


def check_float(value: Any, what: str, lo: float, hi: float) -> float:
    """``value`` as a finite float in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value
