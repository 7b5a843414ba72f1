"""What a plugin returns from its hooks: named factories for mappings and losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LossSpec", "MappingSpec"]


@dataclass(frozen=True)
class MappingSpec:
    """A named attention mapping a plugin provides.

    Args:
        name: The registry name users pick it by (``athooks.mapping(name, **options)``).
        factory: Called with the user's options; returns an :class:`athooks.plugin.Mapping`
            (or any callable ``(B, C, *S) -> (B, *S)``, which athooks wraps); it is given
            feature maps of every layout the tapped layers produce, ``S`` being one to three
            spatial dimensions (1-D signal, image, video).
        summary: One line shown by ``athooks list``.

    Example:
        ```python
        from athooks.plugin import MappingSpec, hookimpl

        def mean_abs(features):
            return features.abs().mean(dim=1)

        @hookimpl
        def athooks_mappings():
            return [MappingSpec("mean_abs", lambda: mean_abs, "mean of |A| over channels")]
        ```
    """

    name: str
    factory: Callable[..., Any]
    summary: str = ""


@dataclass(frozen=True)
class LossSpec:
    """A named transfer loss a plugin provides.

    Args:
        name: The registry name (``athooks.loss(name, **options)``).
        factory: Called with the user's options; returns an :class:`athooks.plugin.Loss`.
        summary: One line shown by ``athooks list``.

    Example:
        ```python
        from athooks.plugin import LossSpec, hookimpl
        from athooks.losses import AT

        @hookimpl
        def athooks_losses():
            def at_max4(beta=1e3):
                return AT(beta, mapping="max_p", p=4)

            return [LossSpec("at_max4", at_max4, "AT with F_max^4")]
        ```
    """

    name: str
    factory: Callable[..., Any]
    summary: str = ""
