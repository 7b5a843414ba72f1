"""The pluggy hook specifications of athooks: the whole plugin contract, in one place.

A plugin is any module or object with functions of these names marked with
:data:`athooks.plugin.hookimpl`. Built-in mappings and losses register through exactly these hooks
(see ``athooks/builtins.py``); a program registers a plugin with
``athooks.get_plugin_manager().register(plugin)``. Packages will declare an entry point in group
``athooks`` for automatic discovery, which needs no change to these hooks.
Each hook returns a list, so a plugin can provide several names; a plugin may implement either
hook or both.
"""

from __future__ import annotations

import pluggy

from athooks.specs import LossSpec, MappingSpec

PROJECT = "athooks"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def athooks_mappings() -> list[MappingSpec]:  # type: ignore[empty-body]
    """Return the attention mappings this plugin provides.

    Returns:
        A list of :class:`athooks.plugin.MappingSpec`.

    Example:
        ```python
        from athooks.plugin import MappingSpec, hookimpl

        @hookimpl
        def athooks_mappings():
            return [MappingSpec("mean_abs", lambda: (lambda f: f.abs().mean(1)))]
        ```
    """


@hookspec
def athooks_losses() -> list[LossSpec]:  # type: ignore[empty-body]
    """Return the transfer losses this plugin provides.

    Returns:
        A list of :class:`athooks.plugin.LossSpec`.

    Example:
        ```python
        from athooks.plugin import LossSpec, hookimpl
        from athooks.losses import AT

        @hookimpl
        def athooks_losses():
            return [LossSpec("at_paper", lambda **kw: AT(distance="paper", **kw))]
        ```
    """
