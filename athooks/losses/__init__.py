"""Transfer losses. Each is registered as a plugin (see :mod:`athooks.builtins`)."""

from athooks.losses.at import AT
from athooks.losses.base import Loss, Step

__all__ = ["AT", "Loss", "Step"]
