"""Taps: athooks' forward hooks, which turn a module's output into attention maps as it is produced.

A :class:`Tap` watches one module of one model. When the module fires while the tap is active, the
tap selects a tensor from the output, optionally copies it (see below), applies the layer's
transform and every mapping the losses asked for, and keeps only their results in
:attr:`Tap.capture`.

In-place overwrites (``ReLU(inplace=True)`` after a tapped BatchNorm, ``x += shortcut``): the maps
are computed at capture, so their values are those of the output as it was produced. For backward,
a map needs the feature map it was computed from; if a later in-place op changes it, autograd
cannot differentiate the map. A student tap therefore copies its output during the first forward
("probing") and watches the output's version counter; taps whose output was overwritten keep
copying, the others stop. If an output that was not overwritten while probing is overwritten later,
:meth:`athooks.Distiller.loss` raises a clear error instead of autograd's.

Saved-tensor hooks (non-reentrant gradient checkpointing, ``save_on_cpu``) do not apply to the
tensors the maps save for backward: the tapped feature map stays referenced until the backward
pass, as it would without checkpointing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from athooks._compile import eager
from athooks.errors import CaptureError
from athooks.layers import Layer
from athooks.mappings import Mapping as AttentionMapping
from athooks.mappings import apply_mapping

__all__ = ["Capture", "Tap", "select_tensor"]


def _first_tensor(output: Any, depth: int = 0) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if depth > 4:
        return None
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return None
    for item in items:
        found = _first_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def select_tensor(
    output: Any, select: int | str | Callable[[Any], Tensor] | None, where: str
) -> Tensor:
    """Pick the tensor to use from a module's output.

    Args:
        output: What the module returned.
        select: ``None`` for the first tensor (depth first, in order), an index into a tuple or
            list, a key of a dict (or an attribute name), or a callable.
        where: The layer, for error messages.

    Returns:
        The selected tensor.

    Raises:
        CaptureError: If nothing usable is found.

    Example:
        ```python
        import torch
        from athooks.taps import select_tensor

        out = (torch.zeros(1), {"b": torch.ones(2)})
        assert select_tensor(out, None, "x").shape == (1,)
        assert select_tensor(out, 1, "x") is not None
        ```
    """
    if select is None:
        found = _first_tensor(output)
        if found is None:
            raise CaptureError(
                f"{where} returned a {type(output).__name__} with no tensor in it; tap another "
                "layer, or say which part to use with athooks.Layer(name, select=...)"
            )
        return found
    try:
        if callable(select):
            picked = select(output)
        elif isinstance(select, str) and not isinstance(output, Mapping):
            picked = getattr(output, select)
        else:
            picked = output[select]
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise CaptureError(
            f"select={select!r} failed on the output of {where} (a {type(output).__name__}): "
            f"{type(err).__name__}: {err}"
        ) from None
    if isinstance(picked, (tuple, list, Mapping)):
        inner = _first_tensor(picked)
        if inner is not None:
            return inner
    if not isinstance(picked, Tensor):
        raise CaptureError(
            f"select={select!r} on the output of {where} gave a {type(picked).__name__}, not a "
            "tensor"
        )
    return picked


@dataclass
class Capture:
    """What a tap kept from its module's last call in the current step."""

    values: dict[AttentionMapping, Tensor]
    source: Tensor | None  # the student output, held until the end of the forward
    version: int
    calls: int
    grad_enabled: bool
    overwritten: bool = False


def _keep(t: Tensor) -> Tensor:
    return t


class _TapHook:
    """The callable registered with ``register_forward_hook``.

    It holds its tap weakly and checks the module identity, so that a deep copy of the model (an
    EMA copy, which copies hooks along with the modules) never writes into the original's captures,
    and pickling a model that carries it does not fail.
    """

    __slots__ = ("__weakref__", "_tap_ref")

    def __init__(self, tap: Tap) -> None:
        self._tap_ref = weakref.ref(tap)

    @eager  # run eagerly inside a compiled model: a graph break per tap
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        tap = self._tap_ref()
        if tap is not None and tap.active and module is tap.module:
            tap.on_output(output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _TapHook:
        return self

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_InertHook, ())


class _InertHook:
    """What a pickled athooks hook becomes when unpickled: a hook that does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class Tap:
    """A forward hook on one module that keeps attention maps of its output.

    Args:
        side: ``"teacher"`` or ``"student"``.
        name: The module's name in its model.
        module: The module.
        layer: The layer spec (pattern, ``select``, ``transform``).
        mappings: The mappings to compute at capture.
        copy: ``"auto"`` (probe on the first call, see the module docs) or ``"always"``; ignored
            for the teacher, which runs without gradient.
    """

    def __init__(
        self,
        side: str,
        name: str,
        module: nn.Module,
        layer: Layer,
        mappings: Sequence[AttentionMapping],
        copy: str = "auto",
    ) -> None:
        self.side = side
        self.name = name
        self.module = module
        self.layer = layer
        self.mappings = tuple(mappings)
        self.where = f"{side} layer {name!r}"
        self.copy = copy == "always"
        self.probing = side == "student" and copy == "auto"
        self.active = False
        self.capture: Capture | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self) -> torch.utils.hooks.RemovableHandle:
        """Register the forward hook; returns its handle."""
        self._handle = self.module.register_forward_hook(_TapHook(self))
        return self._handle

    def detach(self) -> None:
        """Remove the forward hook and drop what was captured."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.active = False
        self.capture = None

    def on_output(self, output: Any) -> None:
        """Compute and keep the maps of one call of the module (the last call wins)."""
        raw = select_tensor(output, self.layer.select, self.where)
        student = self.side == "student"
        copy = student and (self.copy or self.probing)
        source = raw.clone() if copy else raw
        features = self.layer.transform(source) if self.layer.transform is not None else source
        if not isinstance(features, Tensor):
            raise CaptureError(
                f"the transform of {self.where} returned a {type(features).__name__}, not a tensor"
            )
        values: dict[AttentionMapping, Tensor] = {}
        for mapping in self.mappings:
            # Our own saved tensors bypass any saved-tensor hooks in force: inside a
            # non-reentrant checkpoint they would count as the segment's, and its recompute
            # (where taps are inactive) would then save fewer tensors and fail.
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                value = apply_mapping(mapping, features, self.where)
            if not student:
                value = value.detach()
                if value.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
                    value = value.clone()  # a view of the output could be overwritten later
            values[mapping] = value
        calls = self.capture.calls + 1 if self.capture is not None else 1
        self.capture = Capture(
            values=values,
            source=raw if student else None,
            version=raw._version,
            calls=calls,
            grad_enabled=torch.is_grad_enabled(),
        )

    def check_overwrite(self) -> None:
        """After the model's forward: note an in-place overwrite of the captured output."""
        cap = self.capture
        if cap is None or cap.source is None:
            return
        bumped = cap.source._version != cap.version
        cap.source = None  # the version is all we needed it for
        if self.probing:
            self.probing = False
            self.copy = bumped
        elif bumped and not self.copy:
            cap.overwritten = True
