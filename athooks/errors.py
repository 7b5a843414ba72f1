"""Exceptions raised by athooks.

Every error athooks raises on purpose derives from :class:`AthooksError`, so a training script
can catch them all in one place. Messages say what was wrong, what was expected, and the fix.
"""

from __future__ import annotations

__all__ = [
    "AthooksError",
    "CaptureError",
    "ConfigurationError",
    "LayerResolutionError",
    "PairingWarning",
    "PluginError",
    "UnknownNameError",
]


class AthooksError(Exception):
    """Base class of every error athooks raises on purpose.

    Example:
        ```python
        import athooks

        try:
            athooks.mapping("no_such_map")
        except athooks.AthooksError as err:
            print(err)
        ```
    """


class ConfigurationError(AthooksError, ValueError):
    """The arguments given to athooks are invalid (wrong type, bad value, impossible mix)."""


class LayerResolutionError(ConfigurationError):
    """A layer name or pattern could not be resolved to modules, or the two sides do not pair up."""


class UnknownNameError(ConfigurationError, KeyError):
    """A mapping or loss name is not registered by any plugin."""

    def __str__(self) -> str:
        # KeyError's str() wraps the message in quotes; keep the message readable.
        return str(self.args[0]) if self.args else ""


class PluginError(AthooksError):
    """A plugin misbehaved: it failed to load, raised, or registered something invalid."""


class CaptureError(AthooksError, RuntimeError):
    """What a forward pass captured cannot be used (missing, stale, or without gradient)."""


class PairingWarning(UserWarning):
    """``layers="auto"`` picked a pair a researcher would not call a pair of stages.

    Emitted once, when a Distiller resolves ``"auto"``/``"blocks"``; the message says why (a
    stem with a deep stage, very different relative depths, a head, an input-independent or
    one-cell map) and how to name the layers instead. Make it an error with
    ``warnings.simplefilter("error", athooks.PairingWarning)``.
    """
