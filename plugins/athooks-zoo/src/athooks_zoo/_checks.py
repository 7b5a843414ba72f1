"""The zoo's option checks (it uses only athooks' public API, so it checks its options itself)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor

from athooks import ConfigurationError


def real(
    value: Any,
    owner: str,
    option: str,
    *,
    minimum: float | None = 0.0,
    strict: bool = False,
    why: str = "",
) -> float:
    """``value`` as a finite ``float`` ``>= minimum`` (``> minimum`` with ``strict``).

    Args:
        value: What the user gave.
        owner: The loss, for the message.
        option: The option's name.
        minimum: The lower bound (``None``: any finite number).
        strict: Whether the bound itself is refused.
        why: Why the bound holds, appended to the message.

    Returns:
        The number.

    Raises:
        ConfigurationError: For a non-real value (``bool`` included), NaN or infinity, or a
            value out of range, saying what was expected.
    """
    op = ">" if strict else ">="
    bound = f" {op} {minimum:g}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        tip = f", e.g. {option}=t.item() for a tensor t" if isinstance(value, Tensor) else ""
        raise ConfigurationError(
            f"{owner}: {option} must be a real number{bound}, got {type(value).__name__} "
            f"{value!r:.60}; pass an int or a float{tip}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise ConfigurationError(
            f"{owner}: {option} must be finite, got {number}; a NaN or infinite {option} makes "
            f"the loss NaN or infinite. Pass a finite number{bound}"
        )
    if minimum is not None and (number < minimum or (strict and number == minimum)):
        raise ConfigurationError(f"{owner}: {option} must be{bound}{why}, got {number:g}")
    return number
