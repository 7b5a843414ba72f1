"""Checks of the numeric options of losses and mappings (weights, temperatures, exponents).

One place for the rule every numeric option follows: any real number is accepted (``int``,
``float``, a NumPy scalar, a :class:`fractions.Fraction`: whatever :class:`numbers.Real` covers,
but not ``bool``) and stored as a Python ``float``; NaN and infinity are refused, since they
would make the loss NaN; and a value outside the option's range is refused with the range.

This module is at the bottom of athooks: it imports only :mod:`athooks.errors`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from athooks.errors import ConfigurationError

__all__ = ["NEGATIVE_WEIGHT", "check_choice", "check_real"]

#: The ``reason`` for a weight's lower bound of 0.
NEGATIVE_WEIGHT = " (a negative weight would push the student away from the teacher)"


def check_real(
    value: Any,
    *,
    owner: str,
    option: str,
    minimum: float | None = None,
    strict: bool = False,
    reason: str = "",
) -> float:
    """Check a numeric option and return it as a finite Python ``float``.

    Args:
        value: What the user gave.
        owner: Who takes the option, for messages (``"at"``, ``"kd"``, ``"sum_p"``).
        option: The option's name (``"beta"``).
        minimum: The smallest value allowed, or ``None`` for no lower bound.
        strict: Whether ``minimum`` itself is excluded (``> minimum`` instead of ``>= minimum``).
        reason: Why the bound holds, appended to the message (e.g. ``" (|A|^p ...)"``).

    Returns:
        ``float(value)``.

    Raises:
        ConfigurationError: If ``value`` is not a real number (or is a ``bool``), is NaN or
            infinite, or is below the minimum.

    Example:
        ```python
        import numpy as np
        from athooks.checks import check_real
        from athooks.errors import ConfigurationError

        beta = check_real(np.float32(1e3), owner="at", option="beta", minimum=0.0)
        assert beta == 1000.0 and type(beta) is float
        try:
            check_real(float("nan"), owner="at", option="beta", minimum=0.0)
        except ConfigurationError as err:
            print(err)  # at: beta must be finite, got nan; ...
        ```
    """
    op = ">" if strict else ">="
    bound = f" {op} {minimum:g}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # NumPy's bool is not Real
        tip = f", e.g. {option}=t.item() for a tensor t" if _is_tensor(value) else ""
        raise ConfigurationError(
            f"{owner}: {option} must be a real number{bound}, got {type(value).__name__} "
            f"{_short(value)}; pass an int or a float (a NumPy scalar works too){tip}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = -math.inf if value < 0 else math.inf
    if not math.isfinite(number):
        raise ConfigurationError(
            f"{owner}: {option} must be finite, got {number}; a NaN or infinite {option} makes "
            f"the loss NaN or infinite. Pass a finite number{bound}"
        )
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise ConfigurationError(
            f"{owner}: {option} must be {op} {minimum:g}{reason}, got {number:g}"
        )
    return number


def _is_tensor(value: Any) -> bool:
    return type(value).__name__ == "Tensor" and hasattr(value, "item")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_choice(option: str, value: Any, allowed: tuple[Any, ...], meaning: str) -> None:
    """Check that an option is one of a few values (of the same type: ``True`` is not ``1``).

    Args:
        option: The option's name, for the message.
        value: What the user gave.
        allowed: The values allowed.
        meaning: How the message lists them (``"'auto' or 'always'"``).

    Raises:
        ConfigurationError: If ``value`` is not one of ``allowed``.

    Example:
        ```python
        from athooks.checks import check_choice

        check_choice("resize", "student", ("student", "teacher"), "'student' or 'teacher'")
        ```
    """
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigurationError(f"{option} must be {meaning}, got {value!r}")
