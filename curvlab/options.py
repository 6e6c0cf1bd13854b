"""Checks of numeric options: a nonsense value is an error naming the option, never a number.

NaN passes every ordered comparison's negation (``nan < 0`` is false), so each
check asks for what a valid value is rather than for what an invalid one is.
"""

from __future__ import annotations

import math
import numbers


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) or _is_scalar_tensor(value)


def _is_scalar_tensor(value) -> bool:
    return hasattr(value, "dim") and value.dim() == 0 and value.is_floating_point()


def check_finite(name: str, value) -> float:
    """``value`` as a float if it is a finite number, else ``ValueError`` naming ``name``."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """``value`` as a float if it is a finite number ≥ 0, else ``ValueError`` naming ``name``."""
    if not _is_real(value) or not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0, else ``ValueError`` naming ``name``."""
    if not _is_real(value) or not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _as_integer(value) -> int | None:
    """``value`` as an int if it is an integer (or an integral float), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    return None


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer ≥ ``minimum``, else ``ValueError`` naming ``name``."""
    integer = _as_integer(value)
    if integer is None or integer < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return integer


def check_integer(name: str, value) -> int:
    """``value`` as an int if it is an integer (a seed), else ``ValueError`` naming ``name``."""
    integer = _as_integer(value)
    if integer is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return integer
