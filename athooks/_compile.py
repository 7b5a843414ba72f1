"""torch.compile interplay: hooks that dynamo sees, and compiled code that predates them.

athooks' taps are traced into a compiled model's graph (see :mod:`athooks.taps`); the hooks on
the student's root module, which run the teacher, stay eager (:func:`eager`). Two things keep
compiled code from silently ignoring athooks' hooks:

* dynamo, by default, does not guard compiled code on the hooks of the modules it inlines
  (``torch._dynamo.config.skip_nnmodule_hook_guards``), so code compiled for a hookless model
  (the student before the Distiller, a baseline or EMA copy of the same class) would be reused for
  the hooked one. While a Distiller is attached, :func:`hold_hook_guards` turns those guards on;
  the last Distiller to detach puts the setting back.
* code compiled before the guards were on has none: :func:`forget_compiled` drops the compiled
  code of the models' classes at attach, so that their next call compiles again, with guards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any, TypeVar, cast

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["compiled_codes", "eager", "forget_compiled", "hold_hook_guards"]


def eager(fn: F) -> F:
    """Mark ``fn`` so that dynamo never traces it: inside a compiled model it runs eagerly.

    Args:
        fn: A hook callable.

    Returns:
        The same function, wrapped by :func:`torch.compiler.disable`.
    """
    disable: Callable[[F], Any] = torch.compiler.disable
    return cast(F, disable(fn))


_lock = threading.Lock()
_holders = 0
_saved: bool | None = None


def _dynamo_config() -> Any:
    try:
        import torch._dynamo.config as config
    except ImportError:  # pragma: no cover - builds without dynamo
        return None
    return config if hasattr(config, "skip_nnmodule_hook_guards") else None


def hold_hook_guards() -> Callable[[], None]:
    """Make dynamo guard compiled code on module hooks until the returned callable is called.

    Reference-counted across Distillers and threads; the setting the user had comes back when
    the last holder lets go (unless the user changed it in the meantime).

    Returns:
        The release function (idempotent).

    Example:
        ```python
        import torch._dynamo.config as config
        from athooks._compile import hold_hook_guards

        before = config.skip_nnmodule_hook_guards
        release = hold_hook_guards()
        assert config.skip_nnmodule_hook_guards is False
        release()
        release()
        assert config.skip_nnmodule_hook_guards == before
        ```
    """
    global _holders, _saved
    config = _dynamo_config()
    if config is None:  # pragma: no cover - builds without dynamo
        return lambda: None
    with _lock:
        if _holders == 0:
            _saved = bool(config.skip_nnmodule_hook_guards)
            config.skip_nnmodule_hook_guards = False
        _holders += 1
    released = False

    def release() -> None:
        global _holders, _saved
        nonlocal released
        with _lock:
            if released:
                return
            released = True
            _holders -= 1
            if _holders == 0:
                if config.skip_nnmodule_hook_guards is False and _saved is not None:
                    config.skip_nnmodule_hook_guards = _saved
                _saved = None

    return release


def _cache_entries(code: CodeType) -> int:
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - older or trimmed builds
        return 0
    return len(_debug_get_cache_entry_list(code))


def compiled_codes(models: Iterable[nn.Module]) -> list[CodeType]:
    """The code objects with compiled code that the models' calls would run.

    Each module's class ``forward`` (``torch.compile(model)`` compiles the root's ``forward``
    and inlines the submodules), and ``nn.Module._call_impl`` for a module compiled in place
    (``model.compile()``).

    Args:
        models: The models (their submodules are included).

    Returns:
        The distinct code objects that have compiled code, in the order found.
    """
    codes: dict[int, CodeType] = {}
    seen: set[type] = set()
    for model in models:
        for module in model.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                impl = nn.Module._call_impl.__code__
                if _cache_entries(impl):
                    codes.setdefault(id(impl), impl)
            if type(module) in seen:
                continue
            seen.add(type(module))
            forward = getattr(type(module), "forward", None)
            code = getattr(forward, "__code__", None)
            if isinstance(code, CodeType) and _cache_entries(code):
                codes.setdefault(id(code), code)
    return list(codes.values())


def forget_compiled(models: Iterable[nn.Module]) -> list[CodeType]:
    """Drop the compiled code the models would run, so that their next call compiles again.

    Code compiled before :func:`hold_hook_guards` has no guard on hooks and would run as if
    athooks' hooks were not there. Other models of the same classes recompile too on their next
    call (the same values, one compilation's time).

    Args:
        models: The models (the student, the teacher).

    Returns:
        The code objects whose compiled code was dropped.

    Example:
        ```python
        import torch
        from athooks._compile import compiled_codes, forget_compiled

        net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        forget_compiled([net])
        assert compiled_codes([net]) == []
        ```
    """
    codes = compiled_codes(models)
    if codes:
        from torch._C._dynamo.eval_frame import reset_code

        for code in codes:
            reset_code(code)
    return codes
