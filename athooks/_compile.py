"""torch.compile interplay: athooks' hook callables always run eagerly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """Mark ``fn`` so that dynamo never traces it: inside a compiled model it runs eagerly.

    Args:
        fn: A hook callable.

    Returns:
        The same function, wrapped by :func:`torch.compiler.disable`.
    """
    disable: Callable[[F], Any] = torch.compiler.disable
    return cast(F, disable(fn))
