"""The plugin: the ``ltpa`` mapping, registered through athooks' public hookspecs."""

from __future__ import annotations

from athooks.plugin import MappingSpec, hookimpl
from athooks_ltpa.mapping import LTPAMapping


@hookimpl
def athooks_mappings() -> list[MappingSpec]:
    """The mappings of this package."""
    return [
        MappingSpec(
            "ltpa",
            LTPAMapping,
            "Learn To Pay Attention: an LTPA head's attention at its layers (athooks-ltpa)",
        )
    ]
