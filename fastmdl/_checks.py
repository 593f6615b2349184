"""Argument checks shared by the public functions: a wrong type is a TypeError, a
value out of range a ValueError, and both name the argument and what it must be."""

from __future__ import annotations

import math
import numbers


def positive(value, name: str) -> float:
    """``value`` if it is a finite real number > 0 (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def count(value, name: str) -> int:
    """``value`` as an int if it is an integer >= 0 (a bool is not a count here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)
