"""The built-in plugin: athooks' own mappings and losses, registered through the public hookspecs.

This module is registered with the plugin manager exactly as a third-party plugin would be, and
uses nothing a third-party plugin could not.
"""

from __future__ import annotations

from athooks.hookspecs import hookimpl
from athooks.losses import AT
from athooks.mappings import MaxP, Sum, SumP
from athooks.specs import LossSpec, MappingSpec


@hookimpl
def athooks_mappings() -> list[MappingSpec]:
    """The activation-based mappings of the paper (section 3.1)."""
    return [
        MappingSpec("sum", Sum, "F_sum: sum over channels of |A|"),
        MappingSpec("sum_p", SumP, "F_sum^p: sum over channels of |A|^p (p=2 default)"),
        MappingSpec("max_p", MaxP, "F_max^p: max over channels of |A|^p (p=2 default)"),
    ]


@hookimpl
def athooks_losses() -> list[LossSpec]:
    """Attention transfer."""
    return [
        LossSpec("at", AT, "activation-based attention transfer (authors' code form by default)"),
    ]
