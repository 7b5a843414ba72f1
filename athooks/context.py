"""Which model runs are athooks' own: per thread and per context, never process-wide.

athooks runs models itself: a Distiller runs its teacher inside the student's forward, a loss may
run the student again, and the probes (:func:`athooks.describe`, :func:`athooks.viz.attention_maps`,
the first-call resolution of ``layers="auto"``) run a model on a sample input. Such a run must be
invisible to every attached :class:`athooks.Distiller`: it never starts a step, and no tap armed
for a user's forward captures anything from it. This module keeps the count of those runs in a
:class:`contextvars.ContextVar`, so that each thread (and each asyncio task) has its own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextvars import ContextVar

import torch

__all__ = ["functorch_active", "in_backward", "internal_depth", "internal_run"]

_DEPTH: ContextVar[int] = ContextVar("athooks_internal_runs", default=0)


class _InternalRun:
    """The context manager :func:`internal_run` returns (a class: cheaper than a generator)."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _DEPTH.set(_DEPTH.get() + 1)

    def __exit__(self, *exc: object) -> None:
        _DEPTH.reset(self._token)


def internal_run() -> AbstractContextManager[None]:
    """Mark the models run inside this block as athooks' own (invisible to attached Distillers).

    Returns:
        A context manager; each ``with`` needs its own (``with internal_run():``).

    Example:
        ```python
        from athooks.context import internal_depth, internal_run

        with internal_run():
            assert internal_depth() == 1
        assert internal_depth() == 0
        ```
    """
    return _InternalRun()


def internal_depth() -> int:
    """How many of athooks' own model runs enclose the caller (0: the user's own code).

    Returns:
        The nesting depth, in this thread or context.
    """
    return _DEPTH.get()


def in_backward() -> bool:
    """Whether the caller runs inside a backward pass (e.g. a checkpointed segment's recompute).

    Returns:
        ``True`` while autograd executes a graph task in this thread.

    Example:
        ```python
        from athooks.context import in_backward

        assert not in_backward()
        ```
    """
    return bool(torch._C._current_graph_task_id() != -1)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap...) is running.

    Such transforms forbid saved-tensor hooks and reading values back (``int(tensor)``).

    Example:
        ```python
        import torch
        from athooks.context import functorch_active

        assert not functorch_active()
        seen = []
        torch.func.grad(lambda x: (seen.append(functorch_active()), x.sum())[1])(torch.ones(2))
        assert seen == [True]
        ```
    """
    return torch._C._functorch.peek_interpreter_stack() is not None
