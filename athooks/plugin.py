"""The public plugin API: everything a third-party plugin package needs, and nothing else.

A plugin is a module (or object) with functions named after the hooks of
:mod:`athooks.hookspecs`, marked with :data:`hookimpl`. Plugins run arbitrary code when athooks
loads them: install only plugins you trust.

Example:
    ```python
    import torch
    import athooks
    from athooks.plugin import Mapping, MappingSpec, hookimpl

    class Energy(Mapping):
        '''Mean squared activation over channels.'''

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return features.pow(2).mean(dim=1)

    class EnergyPlugin:
        @hookimpl
        def athooks_mappings(self):
            return [MappingSpec("energy_demo", Energy, "mean of A^2 over channels")]

    plugin = EnergyPlugin()
    athooks.get_plugin_manager().register(plugin, name="energy-demo")
    print(athooks.mapping("energy_demo")(torch.randn(1, 4, 3, 3)).shape)
    athooks.get_plugin_manager().unregister(plugin)
    ```
"""

from athooks.connectors import Connector, Connectors
from athooks.hookspecs import hookimpl, hookspec
from athooks.losses.base import Loss, Step, logits_of, resize_map
from athooks.mappings import Features, Mapping
from athooks.specs import LossSpec, MappingSpec

__all__ = [
    "Connector",
    "Connectors",
    "Features",
    "Loss",
    "LossSpec",
    "Mapping",
    "MappingSpec",
    "Step",
    "hookimpl",
    "hookspec",
    "logits_of",
    "resize_map",
]
